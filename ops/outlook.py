"""Outlook attention (Yuan et al., "VOLO: Vision Outlooker for Visual Recognition", TPAMI 2022).

Every window of ``k x k`` pixels (windows placed with ``stride`` and zero ``padding``, like a convolution) owns a
``k^2 x k^2`` attention matrix that is *predicted* from the window's pooled features by a linear layer, not computed
from query/key products. Row ``i`` of that matrix mixes the window's ``k^2`` values into the value written at the
window's ``i``-th pixel; windows overlap, and the overlapping writes are summed (a "fold")::

    P[n, head]  = softmax(scale * attn[n, head].view(k*k, k*k), dim=-1)           # per window n
    out[loc(n, i)] += sum_j P[n, head, i, j] * v[loc(n, j), head]                   # for every window n, row i
    loc(n, i) = (n_y * stride - padding + i // k,  n_x * stride - padding + i % k)

Values outside the image read as zero and writes outside it are dropped. The model computes ``v`` (a linear map of
the tokens) and ``attn`` (a linear map of the tokens average-pooled by ``stride``); this op does the rest.

Backends:
    ``reference``: plain PyTorch ``unfold -> softmax-weighted sum -> fold``; the definition, any device and dtype,
        differentiable. It performs the same operations in the same order as the official code.
    ``triton``: fused Triton kernels, per output pixel: the softmaxed weights of every (window, row) that writes the
        pixel are summed per pixel offset (they reach only the (2k-1)^2 pixels around it), then each neighbour's
        channels are read once; no unfolded copies. One launch per residue class of pixels (y % stride,
        x % stride): within a class the window rows that write a pixel, and the offsets they reach, are
        compile-time constants (k3/s2: 9, 15, 15 and 25 offsets, against 25 for every pixel otherwise). The
        backward's grad-of-``v`` kernel works the same way; its grad-of-``attn`` kernel gathers grad_out and ``v``
        at each window's pixels and takes every window's dP = grad_out @ v^T in one batched dot (tensor cores
        for 16-bit inputs).
        Deterministic (gathers, no atomics). CUDA in fp32/fp16/bf16; on CPU only under ``TRITON_INTERPRET=1``
        (fp32/fp16). No attention dropout.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F

from .triton import (device_reason, direct, dot_precision, interpreter_requested, kernel_op, needs_grad, next_pow2,
                     no_device_reason, on_device, override_knobs, traced)
from ._checks import check_float_tensors
from ._dispatch import call_key, dispatch, planned, register_backend, validated

__all__ = ["outlook_attention", "outlook_window_grid", "use_tiles"]

_OP = "outlook_attention"


def outlook_window_grid(height: int, width: int, kernel_size: int, stride: int, padding: int) -> tuple[int, int]:
    """Number of windows ``(h, w)`` along each axis: ``(size + 2 * padding - kernel_size) // stride + 1``.

    VOLO predicts the attention from the tokens average-pooled by ``stride`` with ``ceil_mode``, i.e. a grid of
    ``ceil(size / stride)``; the two agree for VOLO's ``kernel_size=3, padding=1``.
    """
    return ((height + 2 * padding - kernel_size) // stride + 1, (width + 2 * padding - kernel_size) // stride + 1)


def outlook_attention(v: torch.Tensor, attn: torch.Tensor, num_heads: int, kernel_size: int = 3, stride: int = 1,
                      padding: int = 1, scale: float | None = None, dropout_p: float = 0.0,
                      backend: str | None = None) -> torch.Tensor:
    """Outlook attention: per-window predicted ``k^2 x k^2`` weights aggregate values, overlaps are summed.

    Args:
        v: values, channels last (B, H, W, C) with ``C = num_heads * head_dim``; channel ``c`` belongs to head
            ``c // head_dim``.
        attn: attention logits, channels last (B, h, w, num_heads * k^4) with ``(h, w) =``
            :func:`outlook_window_grid`; feature ``head * k^4 + i * k^2 + j`` is the logit of window pixel ``i``
            reading window pixel ``j`` (the layout of VOLO's ``attn`` linear layer output).
        num_heads: number of heads.
        kernel_size: window side ``k``.
        stride: window step (VOLO uses 2).
        padding: zero padding of the image on each side (VOLO uses 1).
        scale: logit multiplier before the softmax; ``head_dim ** -0.5`` when None.
        dropout_p: dropout on the softmaxed weights (pass 0 in eval; the triton backend refuses > 0).
        backend: ``"reference"``, ``"triton"`` or None for automatic choice (see :mod:`zoo.ops._dispatch`).

    Returns:
        (B, H, W, C) in the dtype of ``v``.
    """
    key = call_key(v, attn, num_heads, kernel_size, stride, padding, scale, dropout_p)
    if not validated(_OP, key):
        _check_inputs(v, attn, num_heads, kernel_size, stride, padding, dropout_p)
    if scale is None:
        scale = (v.shape[-1] // num_heads) ** -0.5
    return dispatch(_OP, backend, v, attn, int(num_heads), int(kernel_size), int(stride), int(padding),
                    float(scale), float(dropout_p), key=key)


def _check_inputs(v, attn, num_heads, kernel_size, stride, padding, dropout_p) -> None:
    for name, t in (("v", v), ("attn", attn)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"outlook_attention: {name} must be a 4-d channels-last tensor, got {got}")
    check_float_tensors("outlook_attention", same_dtype=False, v=v, attn=attn)  # the backends cast attn to v's dtype
    for name, value, low in (("num_heads", num_heads, 1), ("kernel_size", kernel_size, 1), ("stride", stride, 1),
                             ("padding", padding, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"outlook_attention: {name} must be an int >= {low}, got {value!r}")
    b, height, width, channels = v.shape
    if channels % num_heads:
        raise ValueError(f"outlook_attention: v channels ({channels}) must be divisible by num_heads ({num_heads})")
    grid = outlook_window_grid(height, width, kernel_size, stride, padding)
    if min(grid) < 1:
        raise ValueError(f"outlook_attention: a {height}x{width} input has no {kernel_size}x{kernel_size} window "
                         f"with padding={padding}")
    expected = (b, *grid, num_heads * kernel_size ** 4)
    if tuple(attn.shape) != expected:
        raise ValueError(f"outlook_attention: attn must have shape (B, h, w, num_heads * k^4) = {expected} for v of "
                         f"shape {tuple(v.shape)}, kernel_size={kernel_size}, stride={stride}, padding={padding}; "
                         f"got {tuple(attn.shape)}")
    if v.device != attn.device:
        raise ValueError(f"outlook_attention: v and attn must be on one device, got {v.device} and {attn.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"outlook_attention: dropout_p must be in [0, 1), got {dropout_p}")


# ----------------------------------------------------------------------------------------------------------------
# reference backend


def _reference(v: torch.Tensor, attn: torch.Tensor, num_heads: int, kernel_size: int, stride: int, padding: int,
               scale: float, dropout_p: float) -> torch.Tensor:
    b, height, width, channels = v.shape
    _, h, w, _ = attn.shape
    kk = kernel_size * kernel_size
    head_dim = channels // num_heads
    # (B, C*k^2, L) columns, channel-major: column feature index = c * k^2 + j
    cols = F.unfold(v.permute(0, 3, 1, 2), kernel_size, padding=padding, stride=stride)
    cols = cols.reshape(b, num_heads, head_dim, kk, h * w).permute(0, 1, 4, 3, 2)  # B, heads, L, k^2 (j), d
    weights = attn.reshape(b, h * w, num_heads, kk, kk).permute(0, 2, 1, 3, 4)  # B, heads, L, k^2 (i), k^2 (j)
    weights = (weights * scale).softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    out = (weights @ cols.to(weights.dtype)).to(v.dtype)  # B, heads, L, k^2 (i), d
    out = out.permute(0, 1, 4, 3, 2).reshape(b, channels * kk, h * w)
    out = F.fold(out, output_size=(height, width), kernel_size=kernel_size, padding=padding, stride=stride)
    return out.permute(0, 2, 3, 1)


register_backend(_OP, "reference", _reference, priority=0)


# ----------------------------------------------------------------------------------------------------------------
# triton backend
#
# Three kernels, all "gather" style so that every output element is written by exactly one program (deterministic):
#   forward  (one program = BLOCK_P pixels of one residue class (y % s, x % s) x one (batch, head), a launch per
#            class): for each pixel, visit the <= ceil(k/s)^2 windows that write to it, softmax the row of logits
#            that targets it and add each probability P[n, i, j] to the slot of its pixel offset j - i (the
#            class's (k + s(ny-1)) x (k + s(nx-1)) offsets), then read the value at each offset once and sum.
#            Also stores the row's log-sum-exp, reused by the backward.
#   grad_v   (pixels of one class x (batch, head)): for each pixel q, visit the windows that read it (as column j),
#            add P[n, i, j] to the slot of offset i - j over the rows i, then read grad_out at each offset once.
#   grad_attn (BLOCK_N windows x (batch, head)): dP[i, j] = <grad_out[loc(n, i)], v[loc(n, j)]>, one batched dot
#            of the windows' (k^2, d) tiles of grad_out and v (both gathered at loc(n, .)), then the softmax
#            backward scale * P * (dP - sum_j P dP). H200, bf16, VOLO-D1 stage 1 (batch 64, 28x28, 6 heads of 32,
#            k3/s2): 64.0 us against 91.8 for per-row sums over the head channels (172.1 -> 124.2 at batch 128).
#            BLOCK_N swept with 2 / 4 / 8 warps: 4 -> 56.3 / 59.3 / 89.2, 8 -> 61.2 / 55.6 / 63.2, 16 -> 64.4 /
#            63.9 / 61.2 (the default, 4 warps), 32 -> 167.9 / 70.7 / 76.4 us.


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_supports(v, attn, num_heads, kernel_size, stride, padding, scale, dropout_p) -> str | None:
    if dropout_p > 0.0:
        return f"attention dropout (dropout_p={dropout_p}) is not implemented"
    if v.dtype not in _TRITON_DTYPES or attn.dtype != v.dtype:
        return f"dtypes v={v.dtype}, attn={attn.dtype}; needs one of float32/float16/bfloat16 for both"
    reason = device_reason(v.device, (v.dtype,), interpreter_requested())
    if reason is not None:
        return reason
    if kernel_size * kernel_size > 64 or v.shape[-1] // num_heads > 256:
        return f"kernel_size={kernel_size} (max 8) or head_dim={v.shape[-1] // num_heads} (max 256) too large"
    return None


# Launch knobs of the per-pixel kernels (forward, grad_v); None: chosen by tile size (see _gather_warps).
_TILES: dict[str, int | None] = {"rows": None, "num_warps": None}


def use_tiles(rows: int | None = None, num_warps: int | None = None) -> contextlib.AbstractContextManager:
    """Temporarily override the launch knobs of the forward and grad_v kernels (None keeps the current value).

    Args:
        rows: output pixels per program, a power of two (default: 8 at 32 head channels, see _gather_rows).
        num_warps: Triton launch option, a power of two (default: one warp per 8 rows).
    """
    if rows is not None and (not isinstance(rows, int) or rows < 1 or rows & (rows - 1)):
        raise ValueError(f"rows must be a power of two (1, 2, 4, ...) or None, got {rows!r}")
    return override_knobs(_TILES, rows=rows, num_warps=num_warps)


@functools.cache
def _kernels():
    """The Triton kernels, created on first use (so TRITON_INTERPRET is read then, and importing zoo is cheap)."""
    from .triton.kernels import outlook as kernels

    return kernels.forward_kernel, kernels.grad_v_kernel, kernels.grad_attn_kernel


def _block_sizes(kernel_size: int, head_dim: int) -> tuple[int, int]:
    """Tile edges: window positions (k^2), head channels."""
    return max(next_pow2(kernel_size * kernel_size), 2), max(next_pow2(head_dim), 2)


def _covering(position: int, kernel_size: int, stride: int, padding: int) -> int:
    """How many windows cover a pixel at ``position`` mod ``stride`` along one axis: the window positions
    ``(position + padding) % stride + stride * t`` below ``kernel_size``."""
    first = (position + padding) % stride
    return max(0, -(-(kernel_size - first) // stride))


def _pixel_classes(height: int, width: int, kernel_size: int, stride: int, padding: int):
    """The residue classes (y % stride, x % stride) that have pixels: (cy, cx, windows covering along y and x,
    number of pixels)."""
    for cy in range(min(stride, height)):
        for cx in range(min(stride, width)):
            count = -(-(height - cy) // stride) * -(-(width - cx) // stride)
            yield (cy, cx, _covering(cy, kernel_size, stride, padding), _covering(cx, kernel_size, stride, padding),
                   count)


def _class_tile_slots(kernel_size: int, stride: int, covering_y: int, covering_x: int) -> int:
    """Pixel-offset slots a class's windows reach (a power of two): (k + s (ny - 1)) x (k + s (nx - 1))."""
    return max(2, next_pow2((kernel_size + stride * (covering_y - 1)) * (kernel_size + stride * (covering_x - 1))))


def _rows_per_program(block_slots: int, block_d: int) -> int:
    # grad_attn's (windows, k^2, d) tiles of grad_out and v: near 8K elements each, and at least one window per warp
    return max(4, min(64, 8192 // (block_slots * block_d)))


def _gather_rows(block_e: int, block_d: int) -> int:
    """Pixels a program of the per-pixel kernels (forward, grad_v) takes: 8 for 32 head channels, whatever the
    class's offset slots at k3 (16 or 32), with one warp (see :func:`_gather_warps`); fewer where the (pixels, slots,
    head_dim) register tile would pass 8K elements (larger kernels)."""
    return _TILES["rows"] or max(1, min(64, 256 // block_d, 8192 // (block_e * block_d)))


def _gather_warps(rows: int) -> int:
    """Warps of the per-pixel kernels (forward, grad_v): one per 8 pixel rows.

    Swept on an H200 at VOLO-D1 stage 1 (bf16, batch 128; rows, warps -> forward us, grad_v + grad_attn us), one
    launch per residue class of pixels (9, 15, 15 and 25 offsets in 16, 16, 16 and 32 slots): 8, 1 -> 149.8, 356.1
    (the default); 4, 1 -> 175.5, 356.0; 16, 1 -> 160.6, 367.6; 16, 2 -> 168.3, 360.5; 32, 2 -> 174.6, 373.0;
    32, 4 -> 185.2, 362.3; two or more warps on 4-8 rows, four on 16: 331-972, 451-988. Before the classes (every
    pixel 25 offsets in 32 slots) the best was 8, 1 too: 227, 435.
    """
    return _TILES["num_warps"] or max(1, min(8, rows // 8))


def _launch_gather(kernel, grid_args, batch, height, width, num_heads, head_dim, kernel_size, stride, padding,
                   launch, **constants) -> None:
    """Launch a per-pixel kernel (forward or grad_v) once per residue class of pixels that windows cover."""
    _, block_d = _block_sizes(kernel_size, head_dim)
    for cy, cx, covering_y, covering_x, count in _pixel_classes(height, width, kernel_size, stride, padding):
        if covering_y and covering_x:
            block_e = _class_tile_slots(kernel_size, stride, covering_y, covering_x)
            block_p = _gather_rows(block_e, block_d)
            launch(kernel)[(math.ceil(count / block_p), batch * num_heads)](
                *grid_args, K=kernel_size, S=stride, PAD=padding, CY=cy, CX=cx, NY=covering_y, NX=covering_x,
                BLOCK_P=block_p, BLOCK_E=block_e, BLOCK_D=block_d, num_warps=_gather_warps(block_p), **constants)


def _pixels_like(v: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """An output buffer like ``v`` for the per-pixel kernels: zeros where some pixels have no window over them
    (kernel_size < stride; no kernel writes them), else uninitialised."""
    return torch.zeros_like(v) if kernel_size < stride else torch.empty_like(v)


def _launch_forward(v, attn, num_heads, kernel_size, stride, padding, scale, launch=direct, stats: bool = True,
                    defined: bool = True):
    """The output and, with ``stats``, the row log-sum-exps the backward needs (else None: inference).

    Window rows that fall in the zero padding have no output pixel, so the kernel never writes their log-sum-exp
    (the backward masks those rows): ``defined`` zeroes them, so that the op's saved output is fully defined
    (torch.compile's AOT tracing compares every output element); the eager node leaves them unwritten, so that its
    forward only allocates and launches (a call plan can replay it: ``zoo.ops._dispatch.planned``)."""
    b, height, width, channels = v.shape
    _, h, w, _ = attn.shape
    out = _pixels_like(v, kernel_size, stride)
    lse = None
    if stats:
        lse = (torch.zeros if defined else torch.empty)((b, h, w, num_heads, kernel_size * kernel_size),
                                                        device=v.device, dtype=torch.float32)
    head_dim = channels // num_heads
    args = (v, attn, out, out if lse is None else lse, height, width, channels, h, w, num_heads, head_dim, scale)
    _launch_gather(_kernels()[0], args, b, height, width, num_heads, head_dim, kernel_size, stride, padding, launch,
                   STATS=stats)
    return out, lse


def _launch_backward(grad_out, v, attn, lse, num_heads, kernel_size, stride, padding, scale, launch=direct):
    b, height, width, channels = v.shape
    _, h, w, _ = attn.shape
    head_dim = channels // num_heads
    grad_v = _pixels_like(v, kernel_size, stride)
    grad_attn = torch.empty_like(attn)
    args = (grad_out, attn, lse, grad_v, height, width, channels, h, w, num_heads, head_dim, scale)
    _launch_gather(_kernels()[1], args, b, height, width, num_heads, head_dim, kernel_size, stride, padding, launch)
    block_kk, block_d = (max(16, edge) for edge in _block_sizes(kernel_size, head_dim))  # the dot's edges
    rows = _rows_per_program(block_kk, block_d)
    launch(_kernels()[2])[(math.ceil(h * w / rows), b * num_heads)](
        grad_out, v, attn, grad_attn, height, width, channels, h, w, num_heads, head_dim, scale,
        K=kernel_size, S=stride, PAD=padding, BLOCK_N=rows, BLOCK_KK=block_kk, BLOCK_D=block_d,
        PRECISION=dot_precision(v.dtype), num_warps=4)
    return grad_v, grad_attn


def _triton_forward_fake(v, attn, num_heads, kernel_size, stride, padding, scale):
    b, _, _, _ = v.shape
    _, h, w, _ = attn.shape
    return torch.empty_like(v), v.new_empty((b, h, w, num_heads, kernel_size * kernel_size), dtype=torch.float32)


@kernel_op("zoo::outlook_attention_fwd", fake=_triton_forward_fake)
def _triton_forward(v: torch.Tensor, attn: torch.Tensor, num_heads: int, kernel_size: int, stride: int,
                    padding: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: (B, H, W, C) output and the (B, h, w, heads, k^2) float32 row log-sum-exp."""
    v, attn = v.contiguous(), attn.contiguous()
    with on_device(v):
        return _launch_forward(v, attn, num_heads, kernel_size, stride, padding, scale, traced)


def _triton_backward_fake(grad_out, v, attn, lse, num_heads, kernel_size, stride, padding, scale):
    return torch.empty_like(v), torch.empty_like(attn)


@kernel_op("zoo::outlook_attention_bwd", fake=_triton_backward_fake)
def _triton_backward(grad_out: torch.Tensor, v: torch.Tensor, attn: torch.Tensor, lse: torch.Tensor, num_heads: int,
                     kernel_size: int, stride: int, padding: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused backward: gradients of ``v`` (B, H, W, C) and of the logits ``attn`` (B, h, w, heads * k^4)."""
    grad_out, v, attn = grad_out.contiguous(), v.contiguous(), attn.contiguous()
    with on_device(v):
        return _launch_backward(grad_out, v, attn, lse, num_heads, kernel_size, stride, padding, scale, traced)


def _setup_context(ctx, inputs, output) -> None:
    v, attn, num_heads, kernel_size, stride, padding, scale = inputs
    _, lse = output
    ctx.save_for_backward(v, attn, lse)
    ctx.params = (num_heads, kernel_size, stride, padding, scale)


def _backward(ctx, grad_out, _grad_lse):
    v, attn, lse = ctx.saved_tensors
    grad_v, grad_attn = _triton_backward(grad_out, v, attn, lse, *ctx.params)
    return grad_v, grad_attn, None, None, None, None, None


_triton_forward.register_autograd(_backward, setup_context=_setup_context)


def _launch_node_forward(v, attn, num_heads, kernel_size, stride, padding, scale):
    """The eager node's forward launch: output and log-sum-exps, the padding rows' left unwritten."""
    return _launch_forward(v, attn, num_heads, kernel_size, stride, padding, scale, direct, True, False)


class _EagerOutlook(torch.autograd.Function):
    """The same kernels without the custom-op layer, for eager calls (``torch.library`` dispatch costs tens of
    microseconds of host time a call); graphs under ``torch.compile`` use the ``torch.library`` ops."""

    @staticmethod
    def forward(ctx, v, attn, num_heads, kernel_size, stride, padding, scale):
        v, attn = v.contiguous(), attn.contiguous()
        with on_device(v):  # (the launches replayed from a call plan where plans are on: zoo.ops._dispatch.planned)
            out, lse = planned("outlook_attention.forward", _launch_node_forward, v, attn, num_heads, kernel_size,
                               stride, padding, scale)
        ctx.save_for_backward(v, attn, lse)
        ctx.params = (num_heads, kernel_size, stride, padding, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        v, attn, lse = ctx.saved_tensors
        with on_device(v):
            grad_v, grad_attn = planned("outlook_attention.backward", _launch_backward, grad_out.contiguous(), v,
                                        attn, lse, *ctx.params)
        return grad_v, grad_attn, None, None, None, None, None


def _triton(v: torch.Tensor, attn: torch.Tensor, num_heads: int, kernel_size: int, stride: int, padding: int,
            scale: float, dropout_p: float) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _triton_forward(v, attn, num_heads, kernel_size, stride, padding, scale)[0]
    if not needs_grad(v, attn):  # inference: no autograd node, no saved statistics
        with on_device(v):
            return _launch_forward(v.contiguous(), attn.contiguous(), num_heads, kernel_size, stride, padding, scale,
                                   stats=False)[0]
    return _EagerOutlook.apply(v, attn, num_heads, kernel_size, stride, padding, scale)


register_backend(_OP, "triton", _triton, supports=_triton_supports, priority=10, available=no_device_reason)
