"""LayerNorm over the last dimension, with a Triton backend for the narrow widths of vision backbones.

For ``x`` of shape (..., C), every row of ``C`` values is normalized with its own mean and biased variance, computed
in float32 (float64 for float64 inputs), then scaled and shifted::

    y = (x - mean) * rsqrt(var + eps) * weight + bias

the semantics of ``F.layer_norm(x, (C,), weight, bias, eps)``. The output dtype follows autocast (see
:func:`layer_norm`): under autocast the op writes the autocast dtype directly, rounded once from float32, where
``nn.LayerNorm`` writes float32 and the next op pays a separate cast kernel.

Why a kernel of our own: PyTorch's CUDA LayerNorm (``vectorized_layer_norm_kernel``) is far from memory bandwidth at
small ``C`` (reported on an H200 with torch 2.11: ``nn.LayerNorm(64)`` on a (128, 56, 56, 64) bf16 tensor under
autocast, 154 MB moved, takes 665 us, 231 GB/s), and its backward likewise. The Triton forward normalizes a tile of
``BLOCK_ROWS x BLOCK_C`` values per program (``BLOCK_C`` = the next power of two of ``C``, about 4096 values a
tile), so that even ``C = 64`` rows give each program enough bytes in flight to approach memory bandwidth; its GPU
speed is measured with ``zoo bench ops --ops layer_norm`` (the tile sizes are not tuned yet).

Backends:
    ``reference``: ``F.layer_norm`` on the inputs cast to float32 (float64 if any input is float64), then cast to
        the output dtype. The definition; any device and dtype, differentiable.
    ``triton``: a forward kernel that also saves each row's mean and rstd (float32), a backward kernel that writes
        ``dx`` and per-program float32 partial sums of ``dweight``/``dbias``, reduced by a second kernel in a fixed
        order: deterministic, no atomics. CUDA in float32/float16/bfloat16; on CPU only under ``TRITON_INTERPRET=1``
        (float32/float16); ``C <= 8192``; non-contiguous inputs are copied to contiguous ones. Chosen automatically
        on CUDA only (on CPU the interpreter is a test vehicle, far slower than the reference), in eager code only
        (under ``torch.compile`` inductor fuses the reference's LayerNorm with the ops around it), and from the
        sizes where it measured faster (see ``_triton_is_faster``).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional  # custom_op schemas: Optional is read by every torch >= 2.5

import torch
import torch.nn.functional as F
from torch import nn

from ._amp import compute_dtype
from ._dispatch import call_key, dispatch, planned, register_backend, validated
from .triton import (contiguous_or_none, direct, inputs_reason, interpreter_requested, kernel_op, needs_grad,
                     no_device_reason, on_device, sm_count, traced)

__all__ = ["LayerNorm", "add_layer_norm", "layer_norm"]

_OP = "layer_norm"


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
               backend: str | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension: ``(x - mean) * rsqrt(var + eps) * weight + bias`` per row.

    Args:
        x: (..., C) floating-point input; any number of leading dimensions, possibly zero rows.
        weight: (C,) scale, or None for none.
        bias: (C,) shift, or None for none.
        eps: added to the biased variance, >= 0.
        backend: ``"reference"``, ``"triton"`` or None for automatic choice (see :mod:`zoo.ops._dispatch`).

    Returns:
        (..., C). Mean and variance are computed in float32 (float64 when an input is float64). The dtype is the one
        ``nn.LayerNorm`` followed by the next autocast op would consume: when autocast is enabled for ``x``'s device
        type and ``x`` is float32/float16/bfloat16, the autocast dtype (bf16/fp16), rounded once from the float32
        result; otherwise the dtype of ``x``. Under autocast this saves ``nn.LayerNorm``'s float32 output and the cast
        kernel the next op would run on it. Gradients come back in the dtypes of ``x``, ``weight`` and ``bias``.
    """
    out_dtype = compute_dtype(x) if isinstance(x, torch.Tensor) else None
    key = call_key(x, weight, bias, eps, out_dtype)  # the output dtype follows autocast, and so may the choice
    if not validated(_OP, key):
        _check_inputs(x, weight, bias, eps)
    return dispatch(_OP, backend, x, weight, bias, float(eps), out_dtype, key=key)


def _check_inputs(x, weight, bias, eps) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or not x.is_floating_point():
        got = (f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__)
        raise ValueError(f"layer_norm: x must be a floating-point tensor of shape (..., C), got {got}")
    channels = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (channels,) or not t.is_floating_point():
            got = (f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__)
            raise ValueError(f"layer_norm: {name} must be None or a floating-point ({channels},) tensor for x of "
                             f"shape {tuple(x.shape)}, got {got}")
        if t.device != x.device:
            raise ValueError(f"layer_norm: {name} must be on the device of x ({x.device}), got {t.device}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 <= eps < math.inf:
        raise ValueError(f"layer_norm: eps must be a finite real number >= 0, got {eps!r}")


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension through :func:`layer_norm` (Triton on CUDA).

    Same constructor, parameters and state-dict keys as ``nn.LayerNorm``, so its checkpoints load unchanged; only a
    one-dimensional ``normalized_shape`` (an int or a 1-tuple). The output dtype follows :func:`layer_norm`: the
    autocast dtype under autocast (``nn.LayerNorm`` gives float32 there), else the input's dtype.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                         dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"LayerNorm: normalized_shape must be one dimension (an int or a 1-tuple), got "
                             f"{normalized_shape!r}; use torch.nn.LayerNorm for several trailing dimensions")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != self.normalized_shape[0]:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"LayerNorm: x must have last dimension normalized_shape={self.normalized_shape[0]}, "
                             f"got shape {got}")
        if type(self) is LayerNorm:  # its parameters from its dict (nn.Module.__getattr__ costs eager calls host time)
            params = self._parameters
            return layer_norm(x, params["weight"], params["bias"], self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)  # (a parametrized weight is a property of a subclass)


# ----------------------------------------------------------------------------------------------------------------
# reference backend


def _reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               out_dtype: torch.dtype) -> torch.Tensor:
    f32 = torch.float32
    if x.dtype is f32 and (weight is None or weight.dtype is f32) and (bias is None or bias.dtype is f32):
        y = torch.layer_norm(x, (x.shape[-1],), weight, bias, eps)  # the usual call: nothing to convert
    else:
        dtypes = [t.dtype for t in (x, weight, bias) if t is not None]
        compute = torch.float64 if torch.float64 in dtypes else f32
        weight, bias, x = (_as_dtype(t, compute) for t in (weight, bias, x))
        y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return _as_dtype(y, out_dtype)


def _as_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t.to(dtype)`` only where it changes something (a no-op ``.to`` still costs a dispatcher round trip; this
    runs on every eager LayerNorm call, where host time is what a fast GPU waits for)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


register_backend(_OP, "reference", _reference, priority=0)


# ----------------------------------------------------------------------------------------------------------------
# triton backend
#
# x is viewed as (M, C) rows. Forward: program p normalizes rows [p * BLOCK_ROWS, (p + 1) * BLOCK_ROWS) as one
# (BLOCK_ROWS, BLOCK_C) register tile (two-pass mean / variance in float32 on the tile) and stores y, mean, rstd.
# Backward: a fixed number G of programs (a few per SM) each loop over row blocks p, p + G, ...; per row
#     xhat = (x - mean) * rstd,  g = dy * weight,  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
# and each program sums dy * xhat and dy over its rows into one float32 row of a (G, C) partials tensor; the
# partials are reduced by .sum(0) outside the kernel (deterministic for a given device and shape, no atomics).

_MAX_C = 8192
_TILE = 4096  # register-tile elements per program (BLOCK_ROWS * BLOCK_C, BLOCK_ROWS >= 1)
_MAX_ROWS = 128
_BACKWARD_PROGRAMS_PER_SM = 4  # not tuned: the partials cost G * C * 8 bytes, G = programs


def _triton_supports(x, weight, bias, eps, out_dtype) -> str | None:
    reason = inputs_reason(x.device, interpreter_requested(), x=x, output=out_dtype, weight=weight, bias=bias)
    if reason is not None:
        return reason
    if x.shape[-1] > _MAX_C:
        return f"C={x.shape[-1]} is larger than {_MAX_C} (one row must fit a program's registers)"
    return None


# Measured on an H200 (torch 2.11, bf16 autocast, batch 128), first when eager calls went through the custom op
# (about 230 us of host time a call; wall us fwd / fwd+bwd, nn.LayerNorm vs triton): C64 56x56 667/1205 vs 172/784;
# C96 56x56 721/1367 vs 180/819; C128 28x28 189/505 vs 111/854; C192 28x28 229/522 vs 163/901; C256 14x14 67/284
# vs 178/856; C512 7x7 61/349 vs 193/742. Then with direct launches (`zoo bench ops`, sixteenth session; forward
# kernel / wall ms, reference vs triton): C64 56x56 0.723 / 0.785 vs 0.026 / 0.118; C128 28x28 0.212 / 0.314 vs
# 0.013 / 0.073; C256 14x14 0.076 / 0.187 vs 0.006 / 0.149; C512 7x7 0.034 / 0.178 vs 0.004 / 0.138: the forward
# wins at every measured size up to 512 channels; wider rows keep the first rule (from about 8M values). Forward and
# backward: kernels 1.227 / 0.406 / 0.242 / 0.085 vs 0.091 / 0.069 / 0.061 / 0.051 ms, but a lone call's wall
# 1.300 / 0.732 / 0.634 / 0.670 vs 0.669 / 0.754 / 0.849 / 0.864 (the backward's host work): training keeps the rule.
# Measured again in the seventy-fifth session, with the training node's forward and backward replayed from call plans
# and no casts around it (H100 machine, bf16, batch 64, whole eager training steps with AdamW; three rounds of 15
# steps, the two choices in turn in one process; ms a step, the Triton norm at every width up to 512 / this rule):
# Agent-PVT-T 24.41, 24.48, 23.87 / 28.11, 23.46, 23.39; Agent-Swin-T 34.51, 32.15, 33.59 / 30.52, 39.07, 36.41;
# Agent-DeiT-T 40.14, 23.09, 23.37 / 29.59, 22.50, 23.43; VOLO-D1 36.08, 35.89, 37.31 / 35.95, 35.69, 36.56. No gain
# beyond the rounds' spread, and no less host time a forward or backward (medians of 7 steps): those steps wait on the
# host. Steps that wait on the GPU gain (seventy-sixth session, another H100 machine, the same kind of A/B; ms a step,
# medians of three rounds: VOLO's channels-last average pool and the old rule (1 << 24 values, 96 channels) / its
# window means and the old rule / window means and this rule, Triton from 1M values up to 512 channels): VOLO-D2
# 47.18 / 45.76 / 41.16, VOLO-D3 65.13 / 63.30 / 59.52; VOLO-D1, Agent-Swin-T and Agent-PVT-T within their spreads.
# VOLO-D2's kernel time went from 44.6 to 35.7 ms a step, 4.8 of it ATen's gamma/beta backward. The 1M floor (not
# measured) keeps small calls, one image's norms among them, on the reference.
_FASTER_FORWARD_MAX_C, _FASTER_FORWARD_FROM = 512, 1 << 23
_FASTER_TRAINING_FROM, _FASTER_TRAINING_MAX_C = 1 << 20, 512


def _triton_is_faster(numel: int, channels: int, training: bool) -> bool:
    """The measured rule above: is the Triton path faster than the reference for this size on a GPU?"""
    if training:
        return numel >= _FASTER_TRAINING_FROM and channels <= _FASTER_TRAINING_MAX_C
    return channels <= _FASTER_FORWARD_MAX_C or numel >= _FASTER_FORWARD_FROM


def _triton_prefer(x, weight, bias, eps, out_dtype) -> str | None:
    if x.device.type != "cuda":
        return f"on {x.device.type} the reference is faster than Triton's interpreter"
    if torch.compiler.is_compiling():
        return "under torch.compile the reference lets inductor fuse the norm with its neighbours"
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not _triton_is_faster(x.numel(), x.shape[-1], training):
        return (f"{x.numel()} values of width {x.shape[-1]} ({'training' if training else 'inference'}): the "
                "reference measured faster at this size and width")
    return None


@functools.cache
def _kernels():
    """The Triton kernels, created on first use (so TRITON_INTERPRET is read then, and importing zoo is cheap)."""
    from .triton.kernels import layer_norm as kernels

    return kernels.forward_kernel, kernels.backward_kernel, kernels.sum_parts_kernel


def _tiles(channels: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_C, num_warps): a register tile of about _TILE elements, at least one whole row."""
    block_c = max(16, 1 << max(channels - 1, 0).bit_length())  # next power of two, at least 16
    block_rows = max(1, min(_MAX_ROWS, _TILE // block_c))
    num_warps = min(16, max(4, block_rows * block_c // 512))
    return block_rows, block_c, num_warps


def _backward_programs(x: torch.Tensor, num_blocks: int) -> int:
    """Programs of the backward (rows of the partials): a few per SM on the GPU; 3 in the interpreter, so that tests
    with a handful of row blocks take the loop and several partial rows."""
    if x.is_cuda:
        limit = _BACKWARD_PROGRAMS_PER_SM * sm_count(x)
    else:
        limit = 3
    return max(1, min(num_blocks, limit))


def _launch_forward(x, weight, bias, eps, out_dtype, launch=direct, stats: bool = True):
    """x contiguous (..., C) -> y (..., C) in out_dtype and, with ``stats``, mean and rstd (...) float32 for the
    backward (else None: inference)."""
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = rstd = None
    if stats:
        mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
        rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if y.numel() == 0:  # no rows, or rows of no values
        return y, *((mean.zero_(), rstd.zero_()) if stats else (None, None))
    _forward_kernel_call(x, weight, bias, eps, y, mean, rstd, None, None, launch)
    return y, mean, rstd


def _launch_add_forward(x, residual, weight, bias, eps, sum_dtype, out_dtype, launch=direct):
    """x, residual contiguous (..., C) -> (s, y): s = x + residual in ``sum_dtype`` and y its norm in ``out_dtype``,
    one kernel, no statistics (inference)."""
    total = torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if y.numel() > 0:
        _forward_kernel_call(x, weight, bias, eps, y, None, None, residual, total, launch)
    return total, y


def _forward_kernel_call(x, weight, bias, eps, y, mean, rstd, residual, total, launch) -> None:
    """Launch the forward kernel over x's rows: statistics where ``mean`` is given, the residual sum into ``total``
    where ``residual`` is."""
    channels = x.shape[-1]
    rows = x.numel() // channels  # (Size.numel() would specialise a symbolic batch)
    stats, add = mean is not None, residual is not None
    forward_kernel = launch(_kernels()[0])
    block_rows, block_c, num_warps = _tiles(channels)
    with on_device(x):
        forward_kernel[(_cdiv(rows, block_rows),)](
            x, x if weight is None else weight, x if bias is None else bias, y, *((mean, rstd) if stats else (y, y)),
            *((residual, total) if add else (x, y)), rows, channels, eps, HAS_W=weight is not None,
            HAS_B=bias is not None, BLOCK_ROWS=block_rows, BLOCK_C=block_c, STATS=stats, HAS_RES=add,
            num_warps=num_warps)


def _launch_backward(dy, x, weight, mean, rstd, need_dx, need_dw, need_db, launch=direct):
    """dy, x contiguous (..., C) -> dx (x's dtype; empty (0,) when not needed) and the float32 sums of the
    parameters asked for, (need_dw + need_db, C): dweight's row first, then dbias's. One buffer for both sums' partial
    rows, reduced by one launch of a kernel of ours (a launch costs eager training about what its kernel takes, in
    host time; and a call that only allocates and launches can be replayed from a call plan)."""
    channels = x.shape[-1]
    rows = mean.numel()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_dx else x.new_empty((0,))
    if x.numel() == 0:  # no rows (the sums are zeros), or rows of no values
        return dx, x.new_zeros((need_dw + need_db, channels), dtype=torch.float32)
    backward_kernel = launch(_kernels()[1])
    block_rows, block_c, num_warps = _tiles(channels)
    num_blocks = _cdiv(rows, block_rows)
    programs = _backward_programs(x, num_blocks)
    parts = torch.empty((need_dw + need_db, programs, channels), dtype=torch.float32, device=x.device)
    dw = parts[0] if need_dw else None
    db = parts[-1] if need_db else None
    with on_device(x):
        backward_kernel[(programs,)](
            dy, x, x if weight is None else weight, mean, rstd, dx if need_dx else x, x if dw is None else dw,
            x if db is None else db, rows, channels, num_blocks, HAS_W=weight is not None, DX=need_dx, DW=need_dw,
            DB=need_db, BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps)
        if not (need_dw or need_db):
            return dx, parts[:, 0]  # frozen parameters: no reduction
        sums = torch.empty((need_dw + need_db, channels), dtype=torch.float32, device=x.device)
        sum_c = min(block_c, 128)  # the reduction's column tile: (32, sum_c) partials a step
        launch(_kernels()[2])[(need_dw + need_db, _cdiv(channels, sum_c))](
            parts, sums, programs, channels, BLOCK_P=32, BLOCK_C=sum_c, num_warps=4)
    return dx, sums


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _triton_forward_fake(x, weight, bias, eps, out_dtype):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@kernel_op("zoo::layer_norm_fwd", fake=_triton_forward_fake)
def _triton_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],  # noqa: UP045
                    eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: y (..., C) in ``out_dtype``, per-row mean and rstd (...) float32."""
    return _launch_forward(x.contiguous(), contiguous_or_none(weight), contiguous_or_none(bias), eps, out_dtype, traced)


def _triton_backward_fake(grad_out, x, weight, mean, rstd, need_dx, need_dw, need_db):
    return (x.new_empty(x.shape if need_dx else (0,)),
            x.new_empty((need_dw + need_db, x.shape[-1]), dtype=torch.float32))


@kernel_op("zoo::layer_norm_bwd", fake=_triton_backward_fake)
def _triton_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],  # noqa: UP045
                     mean: torch.Tensor, rstd: torch.Tensor, need_dx: bool, need_dw: bool,
                     need_db: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward: dx (..., C) in x's dtype (empty (0,) when not needed) and the float32 sums (need_dw + need_db, C):
    dweight's row, then dbias's."""
    return _launch_backward(grad_out.contiguous(), x.contiguous(), contiguous_or_none(weight), mean.contiguous(),
                            rstd.contiguous(), need_dx, need_dw, need_db, traced)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    return _input_grads(_triton_backward(grad_out, x, weight, mean, rstd, *need[:3]), need, weight, ctx.bias_dtype)


def _input_grads(grads, need, weight, bias_dtype) -> tuple:
    """(dx, float32 sums (asked, C)) -> the gradients of (x, weight, bias, eps, out_dtype) as autograd wants them:
    None where not needed, the parameter sums in their parameters' dtypes."""
    dx, sums = grads
    return (dx if need[0] else None, sums[0].to(weight.dtype) if need[1] else None,
            sums[-1].to(bias_dtype) if need[2] else None, None, None)


_triton_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerLayerNorm(torch.autograd.Function):
    """The same kernels without the custom-op layer, for eager calls (``torch.library`` dispatch costs tens of
    microseconds of host time a call); graphs under ``torch.compile`` use the ``torch.library`` ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        x, weight = x.contiguous(), contiguous_or_none(weight)
        # (the launch replayed from a call plan where plans are on: zoo.ops._dispatch.planned)
        y, mean, rstd = planned("layer_norm.forward", _launch_forward, x, weight, contiguous_or_none(bias), eps,
                                out_dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = planned("layer_norm.backward", _launch_backward, grad_out.contiguous(), x, weight, mean, rstd,
                        *need[:3])
        return _input_grads(grads, need, weight, ctx.bias_dtype)


def _triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
            out_dtype: torch.dtype) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _triton_forward(x, weight, bias, eps, out_dtype)[0]
    if not needs_grad(x, weight, bias):  # inference: no autograd node, no saved statistics
        return _launch_forward(x.contiguous(), contiguous_or_none(weight), contiguous_or_none(bias), eps, out_dtype,
                               stats=False)[0]
    return _EagerLayerNorm.apply(x, weight, bias, eps, out_dtype)


register_backend(_OP, "triton", _triton, supports=_triton_supports, priority=10, available=no_device_reason,
                 prefer=_triton_prefer)


# ----------------------------------------------------------------------------------------------------------------
# the residual sum and the norm that follows it: add_layer_norm

_ADD_OP = "add_layer_norm"


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + residual`` and ``layer_norm(s, weight, bias, eps)``: a pre-norm block's residual sum and the norm
    of its next branch.

    Args:
        x, residual: (..., C) floating-point tensors of one shape.
        weight, bias, eps: as :func:`layer_norm`.
        backend: ``"reference"``, ``"triton"`` or None for automatic choice (see :mod:`zoo.ops._dispatch`).

    Returns:
        (s, y), both (..., C): ``s`` as ``x + residual`` gives it (the promotion of both dtypes), ``y`` as
        :func:`layer_norm` gives it for ``s`` (the autocast dtype under autocast).

    Backends: ``reference`` is ``x + residual`` then :func:`layer_norm` (differentiable; the norm picks its own
    backend). ``triton`` is one kernel for inference (a call autograd would record takes the reference; eager code
    only, inductor fuses the reference's sum and norm itself): it reads both rows, writes the sum and normalizes it
    from registers, so eager inference saves the add's launch, which costs the host about what the kernel does (an
    H200 waits for Python at the released sizes). The sum is bitwise ``x + residual``'s; the norm is the
    ``layer_norm`` kernel's.
    """
    sum_dtype = (torch.promote_types(x.dtype, residual.dtype)
                 if isinstance(x, torch.Tensor) and isinstance(residual, torch.Tensor) else None)
    out_dtype = compute_dtype(x, sum_dtype) if sum_dtype is not None else None  # what layer_norm writes for the sum
    key = call_key(x, residual, weight, bias, eps, out_dtype)
    if not validated(_ADD_OP, key):
        _check_add_inputs(x, residual, weight, bias, eps)
    return dispatch(_ADD_OP, backend, x, residual, weight, bias, float(eps), sum_dtype, out_dtype, key=key)


def _check_add_inputs(x, residual, weight, bias, eps) -> None:
    if not isinstance(residual, torch.Tensor) or not residual.is_floating_point():
        got = type(residual).__name__ if not isinstance(residual, torch.Tensor) else f"dtype {residual.dtype}"
        raise ValueError(f"add_layer_norm: residual must be a floating-point tensor, got {got}")
    _check_inputs(x, weight, bias, eps)
    if residual.shape != x.shape or residual.device != x.device:
        raise ValueError(f"add_layer_norm: residual must have the shape and device of x ({tuple(x.shape)} on "
                         f"{x.device}), got {tuple(residual.shape)} on {residual.device}")


def _add_reference(x, residual, weight, bias, eps, sum_dtype, out_dtype):
    total = x + residual
    return total, layer_norm(total, weight, bias, eps)


def _add_triton_supports(x, residual, weight, bias, eps, sum_dtype, out_dtype) -> str | None:
    if needs_grad(x, residual, weight, bias):
        return "no backward kernel: calls autograd records (training) take the reference"
    return (inputs_reason(x.device, interpreter_requested(), residual=residual, sum=sum_dtype)
            or _triton_supports(x, weight, bias, eps, out_dtype))


def _add_triton_prefer(x, residual, weight, bias, eps, sum_dtype, out_dtype) -> str | None:
    return _triton_prefer(x, weight, bias, eps, out_dtype)  # the norm's rule: the sum adds no launch of its own


def _add_triton(x, residual, weight, bias, eps, sum_dtype, out_dtype):
    return _launch_add_forward(x.contiguous(), residual.contiguous(), contiguous_or_none(weight),
                               contiguous_or_none(bias), eps, sum_dtype, out_dtype)


register_backend(_ADD_OP, "reference", _add_reference, priority=0)
register_backend(_ADD_OP, "triton", _add_triton, supports=_add_triton_supports, priority=10,
                 available=no_device_reason, prefer=_add_triton_prefer)
