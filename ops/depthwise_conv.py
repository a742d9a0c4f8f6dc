"""Depthwise convolution of a channels-last map plus a residual, with fused Triton kernels.

For ``x`` of shape (B, H_in, W_in, C), a (C, 1, K, K) ``weight`` (odd K) and ``size`` = (H, W)::

    y = residual + depthwise_conv2d(resize(x, size), weight, bias, padding=K // 2)        # (B, H, W, C)

with ``resize`` the bilinear ``F.interpolate(..., align_corners=False)`` (the identity when ``size`` is x's own).
This is the "conv of the values" term the Agent backbones add to their attention output (Agent-Swin per window;
Agent-DeiT on its patch tokens, the residual a view past each class token; Agent-PVT on its token grid, upsampling
the values first when ``agent_sr_ratios`` reduce them, which the released models do not; Agent-CSwin per window or
stripe, CSWin's LePE) and BiFormer's LePE and position-embedding conv.

Why a kernel of our own: the values are a slice of the qkv (or kv) projection, so the unfused term is a strided copy
into the layout cuDNN takes, the conv and the residual add: three kernels and as many passes over the map, and on the
host a convolution call (about 75 us on the H200 machine's host, in eager code and in compiled graphs alike). The
kernel reads the values where they lie and adds the residual: one pass, one launch. A resize stays ``F.interpolate``,
written channels-last for the kernel (resizing inside the kernel, four gathers per tap, measured 11x slower than the
unfused layers for 7x7 values resized to 56x56). A program computes a block of whole rows (up to 64 columns) of one
map, its pixels' rows and columns shifts of a power-of-two tile index; the first kernel took runs of consecutive
flat pixel numbers and divided them (64-bit) per pixel, and its runs' tap rows lay in other programs' runs. Which of
the two differences gives the speed was not isolated. Measured on an H200 (torch 2.11, triton 3.6, bf16, batch 128,
kernel us; cuDNN's conv on a channels-last copy plus the add / the flat-pixel kernel / this kernel with the weights
channels-innermost as the models cache them): Agent-DeiT-S 78.8 / 53.5 / 36.6; Agent-Swin-T's stage-0 windows
336.2 / 208.4 / 170.9; Agent-PVT-T stage 0 (a slice of kv) 218.9 / 135.2 / 86.3; BiFormer-T stage-0 position conv
156.9 / 134.8 / 83.7 and 5x5 LePE 264.6 / 259.8 / 180.4. With the weights in the parameter's layout: Agent-DeiT-T
41.2 / 26.2 / 17.4, Agent-Swin-T stage 2 80.0 / 53.8 / 41.3, BiFormer-T stage-2 LePE 68.5 / 67.3 / 55.9. On the
host the fused call replaces the convolution call and its copies with one launch.

Backends:
    ``reference``: ``F.interpolate``, ``F.conv2d``, ``+``: the definition; any device and dtype, differentiable, and
        autocast applies to it as to the layers it is made of.
    ``triton``: one forward kernel; in eager training one autograd node whose backward is :func:`conv_backward`:
        for a 3x3 conv one pass computing the input's gradient and the weight's and bias's float32 partial sums, then
        their fixed-order total, rounded to the compute dtype as the conv's backward writes them (other sizes: the
        input's gradient by the forward kernel with the taps reversed, then a tiled weight-gradient kernel and the
        total); no atomics: the same bits every call. In a traced training graph the forward is the kernel's
        ``torch.library`` op and the backward the 3x3 pass's op (other sizes ATen's ``convolution_backward``, cuDNN;
        forward and backward at batch 64 on the H200 before the 3x3 pass, ms, reference against triton:
        Agent-Swin-T stage-0 windows 0.564 / 0.626, Agent-PVT-T stage 0 0.276 / 0.238, BiFormer-T LePE 0.364 /
        0.662, its position conv 0.211 / 0.235): see
        :func:`_traced_backward` for why the graph must not hold an ``aten.convolution``. CUDA in
        float32/float16/bfloat16; on CPU only under ``TRITON_INTERPRET=1`` (float32/float16).
        Under autocast it computes in the autocast dtype and rounds where the unfused layers write: the conv's output
        (the autocast dtype) and the sum, so it matches them up to the order of float32 accumulation. A resize runs
        first, as ``F.interpolate`` on a channels-last map (one more kernel). Chosen automatically on CUDA.
"""
from __future__ import annotations

import functools
from typing import Optional  # custom_op schemas: Optional is read by every torch >= 2.5

import torch
import torch.nn.functional as F

from ._amp import autocast_dtype, compute_dtype
from ._dispatch import call_key, dispatch, planned, register_backend, validated
from .triton import (contiguous_or_none, direct, inputs_reason, item_extent, kernel_op, kernels_interpreted,
                     needs_grad, next_pow2, no_device_reason, on_device, prev_pow2, sm_count, traced, INT32_MAX)

__all__ = ["depthwise_conv"]

_OP = "depthwise_conv"


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   residual: torch.Tensor | None = None, size: tuple[int, int] | None = None,
                   inplace: bool = False, backend: str | None = None) -> torch.Tensor:
    """``residual + conv2d(resize(x, size), weight, bias, padding=K // 2, groups=C)`` on channels-last maps.

    Args:
        x: (B, H_in, W_in, C) floating point, any strides (a slice of a projection is read in place).
        weight: (C, 1, K, K), K odd (zero padding K // 2 keeps the map's size).
        bias: (C,) or None.
        residual: (B, H, W, C) added to the conv's output, or None.
        size: (H, W) to resize x to first (bilinear, ``align_corners=False``, as ``F.interpolate``); None keeps
            (H_in, W_in).
        inplace: write the sum into ``residual`` (any strides, its dtype the sum's) and return it, as
            ``residual.add_(conv)`` does; for calls autograd does not record (an attention output that later layers
            read whole: Agent-DeiT's patch rows past the class token, which then need no concatenation). ``x`` must
            not overlap ``residual``.
        backend: ``"reference"``, ``"triton"`` or None for automatic choice (see :mod:`zoo.ops._dispatch`).

    Returns:
        (B, H, W, C). The conv's dtype is the autocast dtype under autocast (x float32/float16/bfloat16), else x's
        (the weights must then have x's dtype); with a residual, the sum's dtype is the promotion of both, as ``+``
        gives it.
    """
    size = tuple(size) if size is not None else (tuple(x.shape[1:3]) if isinstance(x, torch.Tensor) else None)
    compute = compute_dtype(x) if isinstance(x, torch.Tensor) else None
    key = call_key(x, weight, bias, residual, size, compute, inplace)
    if not validated(_OP, key):
        _check_inputs(x, weight, bias, residual, size, compute, inplace)
    return dispatch(_OP, backend, x, weight, bias, residual, size, compute, inplace, key=key)


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, torch.Tensor) else repr(t)


def _check_inputs(x, weight, bias, residual, size, compute, inplace=False) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"depthwise_conv: x must be a floating-point (B, H, W, C) tensor, got {_describe(x)}")
    c = x.shape[-1]
    if (not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.ndim != 4
            or weight.shape[:2] != (c, 1) or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0):
        raise ValueError(f"depthwise_conv: weight must be a floating-point (C, 1, K, K) tensor with odd K for x of "
                         f"shape {tuple(x.shape)} (C={c}), got {_describe(weight)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or not bias.is_floating_point()
                             or tuple(bias.shape) != (c,)):
        raise ValueError(f"depthwise_conv: bias must be None or a floating-point (C,) tensor (C={c}), got "
                         f"{_describe(bias)}")
    if len(size) != 2 or not all(type(s) is int and s > 0 for s in size):
        raise ValueError(f"depthwise_conv: size must be None or two positive ints (H, W), got {size!r}")
    expected = (x.shape[0], *size, c)
    if residual is not None and (not isinstance(residual, torch.Tensor) or not residual.is_floating_point()
                                 or tuple(residual.shape) != expected):
        raise ValueError(f"depthwise_conv: residual must be None or a floating-point tensor of shape {expected} "
                         f"(B, H, W, C) for x of shape {tuple(x.shape)} and size {size}, got {_describe(residual)}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"depthwise_conv: {name} must be on the device of x ({x.device}), got {t.device}")
    if inplace:
        _check_inplace(x, weight, bias, residual, compute)
    if compute == x.dtype and autocast_dtype(x.device.type) is None:
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != x.dtype:
                raise ValueError(f"depthwise_conv: {name} has dtype {t.dtype} but x has {x.dtype}; outside autocast "
                                 "they must match (or run under torch.autocast)")


def _check_inplace(x, weight, bias, residual, compute) -> None:
    if residual is None:
        raise ValueError("depthwise_conv: inplace=True adds into residual, which is None; pass residual= or "
                         "inplace=False")
    if torch.promote_types(residual.dtype, compute) != residual.dtype:
        raise ValueError(f"depthwise_conv: inplace=True writes the sum in residual's dtype {residual.dtype}, but the "
                         f"sum is {torch.promote_types(residual.dtype, compute)} (conv in {compute}); use "
                         "inplace=False")
    if needs_grad(x, weight, bias, residual):
        raise ValueError("depthwise_conv: inplace=True is for calls autograd does not record (torch.no_grad, "
                         "torch.inference_mode, or no input requiring grad); use inplace=False in training")


# ----------------------------------------------------------------------------------------------------------------
# reference backend


def _reference(x, weight, bias, residual, size, compute, inplace=False) -> torch.Tensor:
    maps = x.permute(0, 3, 1, 2)
    if size != tuple(x.shape[1:3]):
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    y = F.conv2d(maps, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[-1]).permute(0, 2, 3, 1)
    if residual is None:
        return y
    return residual.add_(y) if inplace else residual + y


register_backend(_OP, "reference", _reference, priority=0)


# ----------------------------------------------------------------------------------------------------------------
# triton backend

_MAX_K = 7  # the K*K taps are unrolled


def _triton_supports(x, weight, bias, residual, size, compute, inplace=False) -> str | None:
    reason = inputs_reason(x.device, _kernels_interpreted(), compute=compute, x=x, weight=weight, bias=bias,
                           residual=residual)
    if reason is not None:
        return reason
    if weight.shape[-1] > _MAX_K:
        return f"kernel size {weight.shape[-1]}: at most {_MAX_K} (the taps are unrolled)"
    for name, t in (("x", x), ("residual", residual)):
        if t is not None and item_extent(t) >= INT32_MAX:
            return f"{name}: one batch item spans more than 2**31 elements (in-item offsets are int32)"
    if size[0] * size[1] * x.shape[-1] > INT32_MAX:
        return f"size {size} x {x.shape[-1]} channels: more than 2**31 elements an item (in-item offsets are int32)"
    return None


def _triton_prefer(x, weight, bias, residual, size, compute, inplace=False) -> str | None:
    if x.device.type != "cuda":
        return f"on {x.device.type} the reference is faster than Triton's interpreter"
    return None


def _kernels_interpreted() -> bool:
    return kernels_interpreted(f"{__package__}.triton.kernels.depthwise_conv")


@functools.cache
def _kernels():
    """The Triton kernels' module, imported on first use (so TRITON_INTERPRET is read then, and importing zoo is
    cheap)."""
    from .triton.kernels import depthwise_conv as kernels

    return kernels


def _kernel():
    """The forward kernel."""
    return _kernels().forward_kernel


def _tiles(h: int, w: int, c: int) -> tuple[int, int, int, int]:
    """(TILE_H, TILE_W, BLOCK_C, num_warps) for (H, W, C) maps: 4096 elements a program, a block of whole rows of
    up to 64 columns (a power of two, ≥ W where W ≤ 64), 32 channels where C has no 64-channel blocks or the rows are
    long, else 64. Within 5% of the best of 24 tiles (1-8 rows, 32-128 channels, 4/8 warps; channels-innermost
    weights) at eight of the models' shapes on the H200 (Agent-DeiT-S/T, Agent-Swin-T stages 0 and 2, Agent-PVT-T
    stage 0, BiFormer-T's stage-0 position conv and LePE and stage-2 LePE)."""
    tile_w = min(64, next_pow2(w))
    block_c = 64 if c % 64 == 0 and tile_w < 64 else 32
    tile_h = max(1, min(4096 // (block_c * tile_w), prev_pow2(h)))
    return tile_h, tile_w, block_c, 4


def _launch(x, weight, bias, residual, compute, out_dtype, launch=direct, inplace: bool = False,
            flip: bool = False) -> torch.Tensor:
    """x (B, H, W, C) any strides, weight (C, 1, K, K) with stride(2) == K * stride(3) and bias contiguous, both in
    ``compute`` (the kernel reads the compute dtype from the weight) -> (B, H, W, C) contiguous, or ``residual``
    itself written in place with ``inplace``. ``flip`` reads the taps in reverse (the input gradient's conv)."""
    b, h, w, c = x.shape
    y = residual if inplace else torch.empty((b, h, w, c), dtype=out_dtype, device=x.device)
    if y.numel() == 0:
        return y
    r = residual if residual is not None else y
    tile_h, tile_w, block_c, num_warps = _tiles(h, w, c)
    blocks = b * -(-h // tile_h) * -(-w // tile_w)
    with on_device(x):
        launch(_kernel())[(blocks, -(-c // block_c))](
            x, weight, weight if bias is None else bias, r, y, h, w, c, *x.stride(), *r.stride(),
            weight.stride(0), weight.stride(3), K=weight.shape[-1], HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None, IN_PLACE=inplace, TILE_H=tile_h, TILE_W=tile_w, BLOCK_C=block_c,
            FLIP=flip, num_warps=num_warps)
    return y


def input_grad(grad: torch.Tensor, weight: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of the conv's input (B, H, W, C) from its output's ``grad`` (B, H, W, C), as the same kernel's
    conv with the taps reversed (stride 1, padding K // 2), rounded to the compute dtype; with ``into`` (B, H, W, C,
    any strides) added into it in place and returned, as autograd sums two gradients of one tensor.

    ``weight`` (C, 1, K, K, its taps readable through two strides) is in the compute dtype, ``grad`` too."""
    compute = weight.dtype
    if into is None:
        return _launch(grad, weight, None, None, compute, compute, flip=True)
    return _launch(grad, weight, None, into, compute, into.dtype, inplace=True, flip=True)


def conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, k: int,
                  dtypes: tuple[torch.dtype | None, torch.dtype | None], into: torch.Tensor | None = None,
                  launch=direct) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The conv's gradients from its output's ``grad`` (B, H, W, C, compute dtype) and its input ``x`` (B, H, W,
    C, any strides, rounded to the compute dtype): the input's (with ``weight``, (C, 1, K, K) in the compute dtype,
    else None: as :func:`input_grad`, added into ``into`` in place when given), the weight's and the bias's (None
    where ``dtypes``' entry is None, else in that dtype: the parameters'), float32 sums in a fixed order (no atomics)
    rounded to the compute dtype as the conv's backward writes them under autocast. A 3x3 conv's are one pass over
    ``grad`` and ``x`` (:func:`~zoo.ops.triton.kernels.depthwise_conv.backward3_kernel`) and a sum; other sizes take
    the input gradient's kernel and the tiled weight-gradient kernel.

    H200, bf16, batch 64, us for the three gradients with x a slice of a qkv projection and dx fresh (one
    ``triton.testing.do_bench`` median each, host launches included, 2026-12-01): cuDNN's ``convolution_backward`` /
    this kernel walking one row a step in programs of 8 rows (before) / this, four rows a step in programs of 56 (the
    tiles of then; ``_BACKWARD3_TILES`` has the current tiles' kernel times with CUDA graphs).
    56x56x96 (Agent-Swin-T stage 0) 241.9 / 199.4 / 89.6; 28x28x192 188.2 / 105.9 / 51.3; 14x14x384 76.1 / 59.6 /
    39.7; 56x56x64 (Agent-PVT-T stage 0) 179.0 / 143.7 / 63.3; 28x28x128 121.1 / 76.1 / 37.2; 14x14x320 87.6 / 61.3
    / 39.8. The input gradient alone (:func:`input_grad`) took 58.1 us at 56x56x96: the weight gradient's sums cost
    about as much again.
    """
    if dtypes[0] is None:
        return None if weight is None else input_grad(grad, weight, into), None, None
    b, h, w, c = grad.shape
    dw = torch.empty((c, 1, k, k), dtype=dtypes[0], device=grad.device)
    db = None if dtypes[1] is None else torch.empty((c,), dtype=dtypes[1], device=grad.device)
    if grad.numel() == 0:
        dx = None
        if weight is not None:
            dx = into if into is not None else grad.new_empty(grad.shape, dtype=weight.dtype)
        return dx, dw.zero_(), None if db is None else db.zero_()
    if k != 3:
        dx = None if weight is None else input_grad(grad, weight, into)
        return (dx, *_tiled_weight_grads(grad, x, k, dw, db, launch))
    dx = None
    if weight is not None:
        dx = into if into is not None else torch.empty((b, h, w, c), dtype=weight.dtype, device=grad.device)
    rows, tile_w, block_c, num_warps = _backward3_tiles(w)
    blocks = b * -(-h // rows) * -(-w // tile_w)
    parts = torch.empty((blocks, 10, c), dtype=torch.float32, device=grad.device)
    r = into if into is not None else (dx if dx is not None else grad)
    wt = weight if weight is not None else grad
    with on_device(grad):
        launch(_kernels().backward3_kernel)[(blocks, -(-c // block_c))](
            grad, x, wt, r, dx if dx is not None else grad, parts, h, w, c, -(-h // rows), -(-w // tile_w),
            *grad.stride(), *x.stride(), *r.stride(), wt.stride(0), wt.stride(-1), ROWS=rows, TILE_W=tile_w,
            BLOCK_C=block_c, INPUT_GRAD=weight is not None, INTO=into is not None, num_warps=num_warps)
    _sum_parts(parts, 10, grad, dw, db, launch)
    return dx, dw, db


# (ROWS, TILE_W, BLOCK_C, num_warps) of conv_backward's 3x3 kernel by map width, widest first: programs of 56 rows
# (four a step; a whole map up to 56 rows, so few partial sums). Maps of 28 columns or more take 16 columns x 16
# channels in 4 warps, narrower ones 8 columns x 32 channels in 2 warps (a 16-column tile of a 14- or 7-column map is
# mostly padding). Kernel us with CUDA graphs (``triton.testing.do_bench_cudagraph`` medians; H200, bf16, batch 64, x
# a slice of a qkv projection), the single (56, 16, 16, 4) tiling with 32 columns from 56 up (before) / these:
# 56x56x96 80.6 / 76.5, 56x56x64 54.8 / 52.9, 28x28x192 43.6 / 43.6, 28x28x128 29.3 / 29.3, 14x14x384 28.9 / 26.0,
# 14x14x320 24.6 / 23.2, 7x7x512 24.5 / 13.2; each within 1.7 us of the best of 32 tilings tried at its shape (8-56
# rows, 8-32 columns, 16-64 channels, 2-8 warps). ROWS must be a multiple of the kernel's four-row step.
_BACKWARD3_TILES: dict[int, tuple[int, int, int, int]] = {28: (56, 16, 16, 4), 0: (56, 8, 32, 2)}


def _backward3_tiles(w: int) -> tuple[int, int, int, int]:
    """(ROWS, TILE_W, BLOCK_C, num_warps) of the one-pass 3x3 backward for maps ``w`` columns wide."""
    return next(tiles for min_w, tiles in _BACKWARD3_TILES.items() if w >= min_w)


def _tiled_weight_grads(grad, x, k, dw, db, launch):
    """dw, db (in place) of a K x K conv by :func:`~zoo.ops.triton.kernels.depthwise_conv.weight_grad_kernel` (any K;
    :func:`conv_backward` takes it for K != 3)."""
    b, h, w, c = grad.shape
    tile_h, tile_w, block_c, num_warps = _tiles(h, w, c)
    tiles, c_blocks = b * -(-h // tile_h) * -(-w // tile_w), -(-c // block_c)
    splits = _weight_grad_splits(tiles, c_blocks, grad)
    taps = next_pow2(k * k + 1)
    parts = torch.empty((splits, taps, c), dtype=torch.float32, device=grad.device)
    with on_device(grad):
        launch(_kernels().weight_grad_kernel)[(splits, c_blocks)](
            grad, x, parts, h, w, c, tiles, *grad.stride(), *x.stride(), K=k, TAPS=taps, TILE_H=tile_h,
            TILE_W=tile_w, BLOCK_C=block_c, num_warps=num_warps)
    _sum_parts(parts, taps, grad, dw, db, launch)
    return dw, db


def _sum_parts(parts: torch.Tensor, taps: int, like: torch.Tensor, dw: torch.Tensor, db: torch.Tensor | None,
               launch) -> None:
    """dw (C, 1, K, K) and db (C,) or None, in place, from (splits, taps, C) float32 partial sums."""
    c, kk = dw.shape[0], dw.shape[-1] * dw.shape[-2]
    # 512 partials a step in 8 warps: the one-pass 3x3 backward's 8-row programs left 1,792 of them at Agent-Swin-T
    # stage 0 (batch 64), and 64 a step made the sum most of that backward's time (H200: 216 -> 195 us with the pass);
    # its 56-row programs leave 128 there, and the tiled weight-gradient kernel up to four a SM per channel block
    with on_device(like):
        launch(_kernels().weight_grad_sum_kernel)[(-(-c // 32), kk + (db is not None))](
            parts, dw, dw if db is None else db, like, c, parts.shape[0], taps, KK=kk, BLOCK_S=512, BLOCK_C=32,
            num_warps=8)


def _weight_grad_splits(tiles: int, c_blocks: int, like: torch.Tensor) -> int:
    """How many programs share the pixel blocks of each channel block in :func:`_tiled_weight_grads`: enough to fill
    the GPU four times over (each sums a strided share of the blocks), at most one a block."""
    return min(tiles, max(1, 4 * sm_count(like) // c_blocks)) if like.is_cuda else min(tiles, 3)


class _DepthwiseConv(torch.autograd.Function):
    """Training calls of the triton backend: the forward kernel, and a backward of :func:`conv_backward` (a 3x3
    conv's: two launches); the residual's gradient is the output's. The conv's weight and bias are cast to the
    compute dtype inside (autograd sees the parameters, the gradients come back in their dtypes)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, compute):
        w, b = _conv_weights(weight, bias, compute)
        # (the launch replayed from a call plan where plans are on: zoo.ops._dispatch.planned)
        y = planned("depthwise_conv.forward", _launch, x, w, b, residual, compute, _out_dtype(residual, compute))
        ctx.save_for_backward(x, w)  # w: in the compute dtype
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        wants = ctx.needs_input_grad
        g = grad if grad.dtype == w.dtype else grad.to(w.dtype)  # the conv's output gradient, as autograd casts it
        dtypes = (ctx.dtypes[0] if wants[1] or wants[2] else None, ctx.dtypes[1] if wants[2] else None)
        dx, dw, db = planned("depthwise_conv.backward", conv_backward, g, x, w if wants[0] else None, w.shape[-1],
                             dtypes)  # to the output's dtype
        return dx, dw if wants[1] else None, db, grad if wants[3] else None, None


def _out_dtype(residual, compute) -> torch.dtype:
    return compute if residual is None else torch.promote_types(residual.dtype, compute)


def _fake(x, weight, bias, residual, compute):
    return x.new_empty(x.shape, dtype=_out_dtype(residual, compute))


@kernel_op("zoo::depthwise_conv_fwd", fake=_fake)
def _triton_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045
               residual: Optional[torch.Tensor], compute: torch.dtype) -> torch.Tensor:  # noqa: UP045
    """The fused depthwise conv plus residual (B, H, W, C), as a ``torch.library`` op for torch.compile."""
    return _launch(x, weight, bias, residual, compute, _out_dtype(residual, compute), traced)


def _setup_traced(ctx, inputs, output) -> None:
    x, weight, bias, residual, _compute = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype


def _traced_backward(ctx, grad):
    """The gradients of :func:`_triton_op` (x, weight, bias, residual, compute) from its output's ``grad``
    (B, H, W, C), in the compute dtype (the weight's), then each in its input's dtype; the residual's is the
    output's. A 3x3 conv's come from :func:`_backward3_op` (one pass of :func:`conv_backward`'s kernel); other sizes'
    from ATen's ``convolution_backward`` on the channels-last maps (cuDNN).

    Why not the reference's ``aten.convolution`` in traced training graphs: inductor turns on its layout optimization
    for a graph with few nodes per convolution (under 300), and then gives every dense 4-D tensor it saves for the
    backward near a convolution the channels-last order of an NCHW tensor. The backbones' (B, H, W, C) maps are not
    NCHW, so H became their fastest dimension: in the compiled Agent-Swin-T training step (ten value convs) the
    stage-0 LayerNorm backward reductions read their saved normalized rows across a stride of H, six kernels taking
    1.08 ms of the step's 16.9. Neither ``aten.convolution_backward`` nor this op is a convolution node to that rule.
    Measured on an H200 (torch 2.11, batch 64, bf16 autocast, kernel ms a compiled Agent-Swin-T training step): 16.93
    with the reference's convolutions, 14.51 with them and inductor's layout optimization turned off, 14.06 with
    ``convolution_backward`` (the official model's step: 19.91); Agent-PVT-T 9.27 -> 8.94 (official 12.23).
    """
    x, weight = ctx.saved_tensors
    wants = ctx.needs_input_grad
    mask = [wants[0], wants[1], wants[2] and ctx.bias_dtype is not None]
    dx = dw = db = None
    if any(mask) and weight.shape[-1] == 3:
        dx, dw, db = _backward3_op(grad.to(weight.dtype), x, weight, mask[0], mask[2])
        dx = dx.to(x.dtype) if mask[0] else None
        dw = dw if mask[1] else None
        db = db.to(ctx.bias_dtype) if mask[2] else None
    elif any(mask):  # (convolution_backward returns None where the mask is off)
        compute, k = weight.dtype, weight.shape[-1]
        dx, dw, db = torch.ops.aten.convolution_backward(
            grad.to(compute).permute(0, 3, 1, 2), x.to(compute).permute(0, 3, 1, 2), weight,
            [weight.shape[0]] if mask[2] else None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], weight.shape[0],
            mask)
        dx = None if dx is None else dx.permute(0, 2, 3, 1).to(x.dtype)
        db = None if db is None else db.to(ctx.bias_dtype)
    dr = grad.to(ctx.residual_dtype) if wants[3] and ctx.residual_dtype is not None else None
    return dx, dw, db, dr, None


def _backward3_fake(grad, x, weight, input_grad, bias_grad):
    c = weight.shape[0]
    return (grad.new_empty(grad.shape if input_grad else (0,), dtype=weight.dtype),
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device),
            grad.new_empty((c,) if bias_grad else (0,), dtype=weight.dtype))


@kernel_op("zoo::depthwise_conv3_bwd", fake=_backward3_fake)
def _backward3_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, input_grad: bool,
                  bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 3x3 conv's backward (:func:`conv_backward`) as a ``torch.library`` op for torch.compile: the input's
    gradient (B, H, W, C) (empty without ``input_grad``), the weight's (C, 1, 3, 3) and the bias's (C,) (empty
    without ``bias_grad``), all in the compute dtype (``weight``'s, ``grad``'s)."""
    dx, dw, db = conv_backward(grad, x, weight if input_grad else None, 3,
                               (weight.dtype, weight.dtype if bias_grad else None), launch=traced)
    return (grad.new_empty((0,), dtype=weight.dtype) if dx is None else dx, dw,
            grad.new_empty((0,), dtype=weight.dtype) if db is None else db)


_triton_op.register_autograd(_traced_backward, setup_context=_setup_traced)


def _resized_channels_last(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w, C) -> (B, H, W, C) through ``F.interpolate`` as the reference calls it, written channels-last (the
    small source map is made channels-last first: the resize then writes the layout the kernel reads densely)."""
    maps = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def channels_innermost(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of the (C, 1, K, K) ``weight`` (in ``dtype``, default its own) whose channel dimension is innermost
    (strides (1, ., K*C, C)): the kernel then reads each tap's channels contiguously, where the parameter's own
    layout is a gather with a stride of K*K elements (H200 bf16 batch 128, kernel us, parameter layout against this:
    Agent-DeiT-S 42.5 / 36.4, Agent-Swin-T stage-0 windows 203.8 / 170.5, BiFormer-T stage-0 5x5 LePE 234.0 /
    180.7, its position conv 86.7 / 83.8). Same values; ``F.conv2d`` takes it too. Off CUDA, where the reference
    computes the conv, the copy keeps the parameter's layout."""
    if weight.device.type != "cuda":
        return weight.to(dtype or weight.dtype, copy=True)
    out = torch.empty_permuted(weight.shape, (1, 2, 3, 0), dtype=dtype or weight.dtype, device=weight.device)
    return out.copy_(weight)


def _taps_readable(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (C, 1, K, K) if the kernel can read it as (C, K*K) through two strides, else a contiguous copy."""
    k = weight.shape[-1]
    return weight if k == 1 or weight.stride(2) == k * weight.stride(3) else weight.contiguous()


def _conv_weights(weight: torch.Tensor, bias: torch.Tensor | None, compute: torch.dtype):
    """The conv's weight and bias in ``compute`` as the kernel reads them (taps readable through two strides, bias
    contiguous). Under autocast these casts are the ones ``F.conv2d`` would make (the models pass autocast's cached
    copies in eager inference, made channels-innermost; training calls and graphs under torch.compile cast here,
    into the same layout, in one copy kernel)."""
    if weight.dtype != compute:
        weight = channels_innermost(weight, compute)
    bias = bias if bias is None or bias.dtype == compute else bias.to(compute)
    return _taps_readable(weight), contiguous_or_none(bias)


def _triton(x, weight, bias, residual, size, compute, inplace=False) -> torch.Tensor:
    if size != tuple(x.shape[1:3]):
        x = _resized_channels_last(x, size)
    tracing = torch.compiler.is_compiling()
    if needs_grad(x, weight, bias, residual) and not tracing:
        return _DepthwiseConv.apply(x, weight, bias, residual, compute)
    weight, bias = _conv_weights(weight, bias, compute)
    if tracing:  # inference, or training through the op's registered autograd
        y = _triton_op(x, weight, bias, residual, compute)
        return residual.copy_(y) if inplace else y
    return _launch(x, weight, bias, residual, compute, _out_dtype(residual, compute), inplace=inplace)


register_backend(_OP, "triton", _triton, supports=_triton_supports, priority=10, available=no_device_reason,
                 prefer=_triton_prefer)
