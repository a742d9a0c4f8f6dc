"""The ``triton`` backend of :func:`zoo.ops.window_attention`: (shifted) window attention in one kernel launch.

Importing this module registers the backend (priority 20, above ``sdpa``) and the two ``torch.library`` ops
``zoo::window_attention_fwd`` / ``zoo::window_attention_bwd``; it does not import triton.
The kernels (:mod:`zoo.ops.triton.kernels`) are imported on first use, so ``TRITON_INTERPRET`` is read then (set
it before the first call to run them on CPU).

Computation (same definition as the reference backend, :mod:`zoo.ops.window`): one program per (batch, head,
window) holds the window's ``N = wh * ww`` keys and values in one tile (``BLOCK_N = max(16, next_pow2(N))``, at
most :data:`MAX_WINDOW_TOKENS`) and walks its queries in blocks of ``BLOCK_M`` rows. Nothing is partitioned, rolled
or masked in memory:

* **Geometry from indices.** Token ``t`` of rolled window ``(wy, wx)`` sits at rolled position
  ``(ry, rx) = (wy * wh + t // ww, wx * ww + t % ww)``; the cyclic roll by ``-(sy, sx)`` means it is read from, and
  its output written to, image position ``((ry + sy) mod H, (rx + sx) mod W)``. q, k, v (and dO) are read there
  through their strides (the models' permuted views of one qkv projection are read in place).
* **Shift mask from indices.** The roll wraps rows ``ry >= H - sy`` and columns ``rx >= W - sx`` in from the other
  side of the map, so the shift region of a token is ``2 * [ry >= H - sy] + [rx >= W - sx]`` and two tokens of one
  window attend to each other exactly when their regions are equal (the reference's mask, ``-inf``, not Swin's
  -100). Without a shift every region is 0.
* **Bias** is read through its strides broadcast to (nW, heads, N, N) (stride 0 on broadcast dims), in float32
  whatever its dtype (the reference rounds it to the logits' dtype first: for 16-bit inputs this backend is the
  closer of the two to exact arithmetic).

Forward (``_forward_kernel``, the only launch): logits ``q k^T * scale + bias`` of a query block over all keys of
its window, softmax in float32 (base 2, the row max and sum in registers: a whole row is one tile, so there is no
online rescaling and nothing is saved for the backward), ``P V``, stored into a contiguous (B, H, W, heads, d_v)
buffer at the un-rolled image positions. The op returns its (B, heads, H, W, d_v) permuted view, so the models'
``out.permute(0, 2, 3, 1, 4).reshape(b, h, w, heads * d_v)`` is free.

Backward (``_backward_kernel``, one launch; plus one ``torch.sum`` launch when the bias needs a gradient): the
same programs recompute ``P`` bit for bit, then per query block ``dV += P^T dO``, ``dP = dO V^T``,
``dS = P * (dP - rowsum(P * dP))`` (``rowsum(P * dP) = rowsum(dO * O)``, so the output is not needed),
``dQ = dS K * scale`` (stored), ``dK += dS^T Q * scale``; dK and dV are stored after the last block. All three
gradients are contiguous (B, H, W, heads, d) buffers returned as permuted views. The bias gradient is ``dS`` summed
over the batch and the bias's broadcast dims, deterministically: with a bias gradient a program owns a fixed chunk
of batch items (chunk size from the shapes only) and sums their ``dS`` in batch order into its own float32 slice of
a (chunks, nW, heads, N, N) buffer (a read-modify-write of memory no other program touches, behind a barrier), which
``torch.sum`` reduces over the chunks and the broadcast dims (no sum when one chunk holds the batch and the bias is
full-sized; one more launch, a cast, when the bias is not float32). No atomics anywhere: results are bitwise
repeatable for a given launch configuration.

Windows of one query block with a bias (Swin's 49 tokens in 16 bits) take the items kernels
(``_forward_items_kernel``, ``_backward_items_kernel``) instead: the same computation, but a program takes a chunk of
batch items of one (window, head) in its innermost loop, so that Triton pipelines the next item's loads, loads the
bias block once (Swin's gathered table is read through a permuted view, a 32-byte sector a value) and sums the bias
gradient of its chunk in registers, stored once; the chunk size (``programs`` knob) depends on the shapes only.
Outputs and q/k/v gradients are bitwise those of the per-item kernels; the bias gradient is summed in other chunks.

Numerics: float32 accumulation for every product; fp32 inputs use IEEE dots (no TF32, like torch's default
matmul); fp16/bf16 probabilities and ``dS`` are rounded to the input dtype before their products (as flash
attention). The scale multiplies the float32 logits (the reference scales q first: a rounding difference in fp32,
a smaller error than the reference's in 16 bits).

Limits: windows of at most :data:`MAX_WINDOW_TOKENS` tokens, head dims of at most :data:`MAX_HEAD_DIM`, no dropout;
``supports`` refuses anything else (and mixed dtypes, devices other than CUDA, 32-bit offset overflow) with a
reason, and dispatch falls back to ``sdpa``.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch.autograd.function import once_differentiable

from .._dispatch import planned, register_backend
from . import (INT32_MAX, broadcast_strides, check_tile_edge, device_reason, direct, dot_precision,
               item_extent, kernel_op, kernels_interpreted, needs_grad, next_pow2, on_device, override_knobs, traced,
               triton_missing_reason)

__all__ = ["window_attention_triton", "use_tiles", "SUPPORTED_DTYPES", "MAX_WINDOW_TOKENS", "MAX_HEAD_DIM"]

_OP = "window_attention"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_WINDOW_TOKENS = 256  # a window's keys and values are one tile each: 256 x 128 fp32 is half an SM's registers
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634

# Launch knobs. block_m: the query rows a program handles at a time (None: as many as fit, see _Geometry); tests
# lower it to run the multi-block loops on tiny windows. bias_programs: the most programs of a backward that also
# sums the bias gradient over the batch (each program then takes a chunk of batch items; the chunk size depends on
# the shapes and this number only, so the summation order is the same on every GPU); 4096 is ~8 waves of 4 programs
# per SM on an H200 (not measured), and fewer for large windows so that the float32 partial sums stay under
# _BIAS_PARTIAL_FLOATS (32 MiB). programs: the same bound for the items kernels (a window of one query block with a
# bias, forward and backward): 256 took Agent-Swin-S stage 2 (batch 64, bf16, H200) to 21.7 / 52.3 us forward /
# backward, against 25.8 / 57.6 at 1024, 59.2 / 96.5 at 4096 (one item a program) and 43.8 / 94.0 in the per-item
# kernels. num_warps / num_stages: None picks by tile size (see _Geometry). No autotuner
# (as in the routing backend: its timing runs allocate memory inside the caller's first call and may pick different
# configurations in different processes).
_TILES: dict[str, int | None] = {"block_m": None, "bias_programs": 4096, "programs": 256, "num_warps": None,
                                  "num_stages": None}
_BIAS_PARTIAL_FLOATS = 2**23


def use_tiles(block_m: int | None = None, bias_programs: int | None = None, programs: int | None = None,
              num_warps: int | None = None, num_stages: int | None = None) -> contextlib.AbstractContextManager:
    """Temporarily override the launch knobs (None keeps the current value).

    Args:
        block_m: query rows per block, a power of two >= 16 (smaller than the window runs several blocks).
        bias_programs: most programs of a backward with a bias gradient (>= 1; fewer means larger chunks of batch
            items per program; at least one program per (head, window) in any case).
        programs: most programs of a launch of the items kernels (windows of one query block; >= 1, same rules).
        num_warps, num_stages: Triton launch options of both kernels (default: chosen by tile size).
    """
    check_tile_edge("block_m", block_m)
    for name, value in (("bias_programs", bias_programs), ("programs", programs)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return override_knobs(_TILES, block_m=block_m, bias_programs=bias_programs, programs=programs,
                          num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------------------------
# kernels (built on first use)

def _kernels_interpreted() -> bool:
    """Whether the kernels run (or, not yet built, will run) in Triton's CPU interpreter."""
    return kernels_interpreted(f"{__package__}.kernels.window")


@functools.cache
def _kernels():
    """The kernels' module (imports triton on first use)."""
    from .kernels import window as kernels

    return kernels


# ----------------------------------------------------------------------------------------------------------------
# launches


class _Geometry:
    """Sizes of one pass: map (H, W), window grid, shift, heads, head dims, tiles and launch options.

    q and v are the kernels' views, (B, H, W, heads, d) and (B, H, W, heads, d_v).
    """

    def __init__(self, q: torch.Tensor, v: torch.Tensor, window: tuple[int, int], shift: tuple[int, int],
                 backward: bool = False, has_bias: bool = False):
        self.b, self.h, self.w, self.heads, self.d = q.shape
        self.dv = v.shape[-1]
        (self.wh, self.ww), (self.sy, self.sx) = window, shift
        self.n = self.wh * self.ww
        self.nwx = self.w // self.ww
        self.nwin = (self.h // self.wh) * self.nwx
        self.block_n = max(16, next_pow2(self.n))
        fp32 = q.dtype == torch.float32
        # Query rows per block: the largest score tile that compiles without register spills for sm_90 at head dim
        # 32 (ptxas -v on the kernels built for the Swin / CSWin windows of 49, 98 and 144 tokens): 8K floats in
        # the forward (64 x 128, 32 x 256), in the backward (three live score tiles, dK and dV) 4K for 16-bit inputs
        # and 2K for fp32 (whose IEEE dots hold more registers).
        budget = 8192 if not backward else 4096 if not fp32 else 2048
        self.block_m = min(self.block_n, _TILES["block_m"] or min(64, max(16, budget // self.block_n)))
        if backward:
            wide = self.block_n >= (64 if fp32 else 128)
        else:
            wide = self.block_m * self.block_n >= (4096 if fp32 else 8192)
        self.num_warps = _TILES["num_warps"] or (8 if wide else 4)
        # windows of one query block with a bias take the items kernels (see kernels.window): batch items in the
        # inner loop; without a bias one item a program runs as fast (CSWin's stripes, H200, not worth a kernel)
        self.items = self.block_m >= self.n and has_bias
        # the items forward, three stages: 21.7 us against two's 24.7 at Agent-Swin-S stage 2 (batch 64, bf16, H200)
        self.num_stages = _TILES["num_stages"] or (3 if self.items and not backward else 2)

    def programs(self, items_per_program: int = 1) -> int:
        return -(-self.b // items_per_program) * self.heads * self.nwin

    def items_per_program(self, bias_grad: bool = False) -> int:
        """Batch items per program: a chunk for the items kernels and for a backward that sums the bias gradient,
        else one. The chunk depends on the shapes and the knobs only, so the bias sums' order is the same on every
        GPU; the float32 partial sums of the bias gradient stay under _BIAS_PARTIAL_FLOATS."""
        if not (self.items or bias_grad):
            return 1
        programs = _TILES["programs"] if self.items else _TILES["bias_programs"]
        if bias_grad:
            programs = min(programs, _BIAS_PARTIAL_FLOATS // (self.n * self.n))
        chunks = min(self.b, max(1, programs // (self.heads * self.nwin)))
        return -(-self.b // chunks)

    def runtime(self) -> tuple[int, ...]:
        return self.h, self.w, self.nwx, self.nwin, self.heads, self.sy, self.sx

    def constexprs(self) -> dict:
        """Compile-time arguments and launch options of this pass's kernel (the items kernels have no BLOCK_M)."""
        blocks = dict(BLOCK_N=self.block_n) if self.items else dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n)
        return dict(WH=self.wh, WW=self.ww, D=self.d, DV=self.dv, **blocks, BLOCK_D=max(16, next_pow2(self.d)),
                    BLOCK_DV=max(16, next_pow2(self.dv)), num_warps=self.num_warps, num_stages=self.num_stages)


def _bias_strides(bias: torch.Tensor | None) -> tuple[int, ...]:
    """Strides of ``bias`` broadcast to (nW, heads, N, N): 0 along broadcast dims (all 0 without a bias)."""
    return (0, 0, 0, 0) if bias is None else broadcast_strides(bias.shape, bias.stride(), 4)


def _launch_forward(q, k, v, bias, window, shift, scale, launch=direct) -> torch.Tensor:
    """One kernel: (B, H, W, heads, d) views in, contiguous (B, H, W, heads, d_v) out."""
    geo = _Geometry(q, v, window, shift, has_bias=bias is not None)
    out = torch.empty((geo.b, geo.h, geo.w, geo.heads, geo.dv), device=q.device, dtype=q.dtype)
    if out.numel() == 0:  # empty batch or map: nothing to launch (a zero-size grid is an error)
        return out
    args = (q, k, v, q if bias is None else bias, out, *q.stride(), *k.stride(), *v.stride(), *_bias_strides(bias))
    options = dict(PRECISION=dot_precision(q.dtype), **geo.constexprs())
    if geo.items:
        chunk = geo.items_per_program()
        launch(_kernels()._forward_items_kernel)[(geo.programs(chunk),)](
            *args, geo.b, chunk, *geo.runtime(), scale * _LOG2E, **options)
    else:
        launch(_kernels()._forward_kernel)[(geo.programs(),)](
            *args, *geo.runtime(), scale * _LOG2E, HAS_BIAS=bias is not None, **options)
    return out


def _launch_backward(grad_out, q, k, v, bias, window, shift, scale, bias_grad: bool, launch=direct):
    """One kernel (plus a torch sum for the bias gradient): contiguous (B, H, W, heads, d) dq, dk, dv and the bias
    gradient in the bias's shape and dtype (None unless ``bias_grad``)."""
    dq, dk, dv, partial = _launch_backward_kernel(grad_out, q, k, v, bias, window, shift, scale, bias_grad, launch)
    return dq, dk, dv, _bias_grad(partial, bias, bias_grad)


def _launch_backward_kernel(grad_out, q, k, v, bias, window, shift, scale, bias_grad: bool, launch=direct):
    """The backward's launch: contiguous (B, H, W, heads, d) dq, dk, dv and, with ``bias_grad``, the bias
    gradient's float32 partial sums (chunks, nW, heads, N, N) (:func:`_reduce_bias_grad` sums them), else None. It
    only allocates and launches (a call plan can replay it: ``zoo.ops._dispatch.planned``), unless ``grad_out``'s
    strides overflow int32 indexing (a copy)."""
    geo = _Geometry(q, v, window, shift, backward=True, has_bias=bias is not None)
    dq, dk = (torch.empty((geo.b, geo.h, geo.w, geo.heads, geo.d), device=q.device, dtype=q.dtype) for _ in "qk")
    dv = torch.empty((geo.b, geo.h, geo.w, geo.heads, geo.dv), device=q.device, dtype=q.dtype)
    if geo.programs() == 0:  # empty batch or map: nothing to launch (a zero-size grid is an error), no partial sums
        return dq, dk, dv, None
    chunk, partial = geo.items_per_program(bias_grad), None
    if bias_grad:
        partial = torch.empty((-(-geo.b // chunk), geo.nwin, geo.heads, geo.n, geo.n), device=q.device,
                              dtype=torch.float32)
    if item_extent(grad_out) > INT32_MAX:  # an odd stride pattern; contiguous it fits (checked in supports)
        grad_out = grad_out.contiguous()
    options = dict(BIAS_GRAD=bias_grad, PRECISION=dot_precision(q.dtype), **geo.constexprs())
    if not geo.items:
        options["HAS_BIAS"] = bias is not None
    kernel = _kernels()._backward_items_kernel if geo.items else _kernels()._backward_kernel
    launch(kernel)[(geo.programs(chunk),)](
        q, k, v, q if bias is None else bias, grad_out, dq, dk, dv, dq if partial is None else partial,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *_bias_strides(bias),
        geo.b, chunk, *geo.runtime(), scale, scale * _LOG2E, **options)
    return dq, dk, dv, partial


def _bias_grad(partial: torch.Tensor | None, bias: torch.Tensor | None, wanted: bool) -> torch.Tensor | None:
    """The bias's gradient from the backward launch's partial sums (zeros where it launched nothing), None unless
    ``wanted``."""
    if not wanted:
        return None
    return torch.zeros_like(bias) if partial is None else _reduce_bias_grad(partial, bias)


def _reduce_bias_grad(partial: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Sum the (chunks, nW, heads, N, N) float32 partial sums over the chunks and the bias's broadcast dims."""
    shape = (1,) * (4 - bias.ndim) + tuple(bias.shape)
    dims = [0] + [1 + i for i, (size, full) in enumerate(zip(shape, partial.shape[1:])) if size == 1 < full]
    grad = partial[0] if dims == [0] and partial.shape[0] == 1 else partial.sum(dims, keepdim=True)
    return grad.reshape(bias.shape).to(bias.dtype)


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops (for torch.compile: see ops.triton.kernel_op) and autograd


def _forward_fake(q, k, v, bias, window_h, window_w, shift_y, shift_x, scale):
    return q.new_empty((*q.shape[:4], v.shape[-1]))


@kernel_op("zoo::window_attention_fwd", fake=_forward_fake)
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, window_h: int,
                window_w: int, shift_y: int, shift_x: int, scale: float) -> torch.Tensor:
    """Fused window attention on (B, H, W, heads, d) views (any strides) with an optional bias broadcastable to
    (nW, heads, N, N); returns the contiguous (B, H, W, heads, d_v) output in q's dtype."""
    with on_device(q):
        return _launch_forward(q, k, v, bias, (window_h, window_w), (shift_y, shift_x), scale, traced)


def _backward_fake(grad_out, q, k, v, bias, window_h, window_w, shift_y, shift_x, scale, bias_grad):
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


@kernel_op("zoo::window_attention_bwd", fake=_backward_fake)
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 bias: torch.Tensor | None, window_h: int, window_w: int, shift_y: int, shift_x: int, scale: float,
                 bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic fused backward: contiguous (B, H, W, heads, d) gradients of q, k and v, and the bias gradient
    (an empty tensor unless ``bias_grad``)."""
    with on_device(q):
        dq, dk, dv, dbias = _launch_backward(grad_out, q, k, v, bias, (window_h, window_w), (shift_y, shift_x),
                                             scale, bias_grad, traced)
    return dq, dk, dv, q.new_empty(0) if dbias is None else dbias


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bias, *params = inputs
    ctx.save_for_backward(q, k, v, bias)
    ctx.params = tuple(params)


def _backward(ctx, grad_out):
    q, k, v, bias = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = _backward_op(grad_out, q, k, v, bias, *ctx.params, bias_grad)
    return dq, dk, dv, dbias if bias_grad else None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerWindow(torch.autograd.Function):
    """The same kernels without the custom-op layer, for eager calls.

    ``torch.library`` dispatch costs tens of microseconds of host time per call, as much as a stage's whole kernel
    on an H200; graphs under ``torch.compile`` use the ``torch.library`` ops (no graph break).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, window_h, window_w, shift_y, shift_x, scale):
        with on_device(q):  # (the launches replayed from a call plan where plans are on: zoo.ops._dispatch.planned)
            out = planned("window_attention.forward", _launch_forward, q, k, v, bias, (window_h, window_w),
                          (shift_y, shift_x), scale)
        ctx.save_for_backward(q, k, v, bias)
        ctx.params = (window_h, window_w, shift_y, shift_x, scale)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, bias = ctx.saved_tensors
        window_h, window_w, shift_y, shift_x, scale = ctx.params
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        with on_device(q):
            dq, dk, dv, partial = planned("window_attention.backward", _launch_backward_kernel, grad_out, q, k, v,
                                          bias, (window_h, window_w), (shift_y, shift_x), scale, bias_grad)
        return dq, dk, dv, _bias_grad(partial, bias, bias_grad), None, None, None, None, None


def _attend(q, k, v, bias, window: tuple[int, int], shift: tuple[int, int], scale: float) -> torch.Tensor:
    """Fused window attention on (B, H, W, heads, d) views: the ``torch.library`` op inside ``torch.compile``, the bare
    autograd function in eager."""
    if torch.compiler.is_compiling():
        return _forward_op(q, k, v, bias, *window, *shift, scale)
    if not needs_grad(q, k, v, bias):  # inference: no autograd node
        with on_device(q):
            return _launch_forward(q, k, v, bias, window, shift, scale)
    return _EagerWindow.apply(q, k, v, bias, *window, *shift, scale)


# ----------------------------------------------------------------------------------------------------------------
# the backend


def window_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size: tuple[int, int],
                            shift_size: tuple[int, int], scale: float, bias: torch.Tensor | None = None,
                            dropout_p: float = 0.0) -> torch.Tensor:
    """Window attention with the fused Triton kernels (the checked arguments of :func:`window_attention`).

    Args:
        q, k: (B, heads, H, W, d), any strides; v: (B, heads, H, W, d_v); one dtype among float32/float16/bfloat16,
            on CUDA (or CPU under ``TRITON_INTERPRET=1``, not bf16).
        window_size: (wh, ww) dividing (H, W), at most :data:`MAX_WINDOW_TOKENS` tokens.
        shift_size: (sy, sx), ``0 <= s < window``.
        scale: logit scale.
        bias: float, broadcastable to (nW, heads, N, N), or None.
        dropout_p: must be 0 (the kernels have no dropout).

    Returns:
        (B, heads, H, W, d_v) in q's dtype: a view of a contiguous (B, H, W, heads, d_v) buffer.
    """
    if dropout_p > 0.0:
        raise ValueError("window_attention_triton: dropout_p > 0 is not supported")
    q, k, v = (t.permute(0, 2, 3, 1, 4) for t in (q, k, v))
    return _attend(q, k, v, bias, window_size, shift_size, scale).permute(0, 3, 1, 2, 4)


def _triton_available() -> str | None:
    return triton_missing_reason()


def _triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window_size: tuple[int, int],
                     shift_size: tuple[int, int], scale: float, bias: torch.Tensor | None = None,
                     dropout_p: float = 0.0) -> str | None:
    """Why the triton backend cannot serve these arguments, or None."""
    if dropout_p > 0.0:
        return "dropout_p > 0 (attention dropout) is not supported by the kernels"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        return f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}; needs one of float32/float16/bfloat16 for all"
    if not (q.device == k.device == v.device) or (bias is not None and bias.device != q.device):
        where = f"{q.device}, {k.device}, {v.device}" + ("" if bias is None else f", bias {bias.device}")
        return f"inputs on different devices ({where})"
    tokens = window_size[0] * window_size[1]
    if tokens > MAX_WINDOW_TOKENS:
        return (f"windows of {tokens} tokens; the kernels hold a window's keys in one tile of at most "
                f"{MAX_WINDOW_TOKENS} tokens")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims q/k {q.shape[-1]}, v {v.shape[-1]}; the kernels take at most {MAX_HEAD_DIM}"
    if _offsets_overflow(q, k, v, bias, tokens):
        return "tensors too large for the kernels' 32-bit in-image offsets"
    dtypes = (q.dtype,) if bias is None else (q.dtype, bias.dtype)
    return device_reason(q.device, dtypes, _kernels_interpreted())


def _offsets_overflow(q, k, v, bias, tokens: int) -> bool:
    """Whether an offset the kernels compute in int32 could overflow (batch offsets are int64)."""
    _, heads, h, w, _ = q.shape
    n_win = (h * w) // tokens
    item = h * w * heads * max(q.shape[-1], v.shape[-1])  # the contiguous outputs and gradients
    bias_extent = 0 if bias is None else sum((s - 1) * st for s, st in zip(bias.shape, bias.stride()))
    return max(item, bias_extent, n_win * heads * tokens * tokens, *(item_extent(t) for t in (q, k, v))) > INT32_MAX


register_backend(_OP, "triton", window_attention_triton, supports=_triton_supports, priority=20,
                 available=_triton_available)
