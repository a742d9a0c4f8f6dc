"""The ``triton`` backend of :func:`zoo.ops.neighborhood_attention`: tiled neighbourhood attention, forward and
backward.

Importing this module registers the backend and the ``torch.library`` ops ``zoo::neighborhood_attention_fwd`` /
``zoo::neighborhood_attention_bwd``; it does not import triton. The kernels
(:mod:`zoo.ops.triton.kernels.neighborhood`) are imported on first use, so ``TRITON_INTERPRET`` is read then.

Computation (NATTEN's semantics, as the reference backend defines them in :mod:`zoo.ops.neighborhood`). Dilation
splits each axis into interleaved groups and a query only sees keys of its own group, on the group's coordinates,
so one program takes a ``TY x TX`` tile of one dilation group (1 x 64 in 1-D, 8 x 8 in 2-D):

* **Forward** (``_forward_kernel``): the tile's queries' windows start and end monotonically with the query, so
  together they see one box of at most ``(TY + ky - 1) x (TX + kx - 1)`` keys of the group (14 x 14 for an 8 x 8
  tile and a 7 x 7 kernel, against 49 keys per query: the dense tile work is 4x the exact neighbourhood work, and
  1/16 of dense attention over a 56 x 56 map). The program walks that box ``BLOCK_N`` keys at a time with an online
  softmax (base 2, float32), masking each (query, key) pair to the query's own window, and stores the normalised
  output into a contiguous (B, heads, *spatial, d_v) tensor and, for training, the per-query log-sum-exp.
* **dQ** (``_dq_kernel``): the same query tiles over the same key boxes recompute ``P``, accumulate
  ``dQ = (P * (dO V^T - delta)) K * scale`` and store ``delta = rowsum(dO * O)``.
* **dK, dV** (``_dkv_kernel``): a tile of keys walks the box of queries whose windows can hold them (the inverse of
  the window bounds) and accumulates ``dV = P^T dO`` and ``dK = dS^T Q * scale``. Each program owns its outputs:
  no atomics, bitwise repeatable.

q, k and v are read through their strides; outputs and gradients are contiguous. Numerics: float32 accumulation;
fp32 inputs use IEEE dots (no TF32); fp16/bf16 probabilities and ``dS`` are rounded to the input dtype before their
products (as flash attention).

Automatic dispatch picks it on CUDA wherever it can serve the input, unless NATTEN is installed (priority 15:
after ``natten``, before ``flex``); the measurements are beside the registration below.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence  # custom_op schemas: torch 2.5 reads typing's Sequence, not list[int]

import torch

from .._dispatch import register_backend
from . import (INT32_MAX, device_reason, direct, dot_precision, item_extent, kernel_op, kernels_interpreted,
               needs_grad, next_pow2, on_device, traced, triton_missing_reason)

__all__ = ["neighborhood_attention_triton", "SUPPORTED_DTYPES", "MAX_HEAD_DIM"]

_OP = "neighborhood_attention"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
_BLOCK_N = 64


def _kernels_interpreted() -> bool:
    """Whether the kernel runs (or, not yet built, will run) in Triton's CPU interpreter."""
    return kernels_interpreted(f"{__package__}.kernels.neighborhood")


@functools.cache
def _kernels():
    """The forward, dQ and dK/dV kernels (imports triton on first use)."""
    from .kernels import neighborhood as kernels

    return kernels._forward_kernel, kernels._dq_kernel, kernels._dkv_kernel


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, ...) -> (B, heads, 1, L, ...) view for 1-D calls; 2-D inputs as they are."""
    return x.unsqueeze(2) if x.ndim == 4 else x


def _per_2d(values: tuple, one_d_value) -> tuple:
    """Per-axis arguments as (y, x): a 1-D call has a unit y axis."""
    return (one_d_value, *values) if len(values) == 1 else tuple(values)


def _tiles(spatial_2d: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """(TY, TX, tiles per group along y, along x): 8 x 8 query tiles on maps, 1 x 64 on sequences."""
    h, w = spatial_2d
    ty, tx = (1, 64) if h == 1 else (8, 8)
    longest_y, longest_x = -(-h // dilation[0]), -(-w // dilation[1])  # the first group of each axis
    return ty, tx, -(-longest_y // ty), -(-longest_x // tx)


class _Launch:
    """Grid, runtime arguments and constexprs shared by the three kernels of one call."""

    def __init__(self, q2: torch.Tensor, v2: torch.Tensor, kernel_size, dilation, is_causal):
        self.b, self.heads, self.h, self.w, self.d = q2.shape
        self.dv = v2.shape[-1]
        ky, kx = _per_2d(tuple(kernel_size), 1)
        self.dil = _per_2d(tuple(dilation), 1)
        cy, cx = _per_2d(tuple(is_causal), False)
        ty, tx, tiles_y, tiles_x = _tiles((self.h, self.w), self.dil)
        self.grid = (self.dil[0] * self.dil[1] * tiles_y * tiles_x, self.b * self.heads)
        self.runtime = (self.heads, self.h, self.w, *self.dil, tiles_y, tiles_x)
        # query rows per step of the dK/dV kernel: with fp32 (IEEE dots on CUDA cores) 64 rows spill 6.7 KB per
        # thread on sm_90 (ptxas -v, triton 3.6); 16 rows do not
        self.block_m_dkv = 16 if q2.dtype == torch.float32 else _BLOCK_N
        self.constexprs = dict(KY=ky, KX=kx, CAUSAL_Y=cy, CAUSAL_X=cx, D=self.d, DV=self.dv, TY=ty, TX=tx,
                               BLOCK_D=max(16, next_pow2(self.d)), BLOCK_DV=max(16, next_pow2(self.dv)),
                               PRECISION=dot_precision(q2.dtype), num_stages=2,
                               # fp32 runs IEEE dots on CUDA cores, which hold whole tiles in registers: at 4 warps
                               # the dK/dV kernel spills 12 KB per thread on sm_90 (ptxas -v, triton 3.6)
                               num_warps=8 if q2.dtype == torch.float32 else 4)

    def stats_buffer(self, device: torch.device) -> torch.Tensor:
        return torch.empty((self.b, self.heads, self.h, self.w), device=device, dtype=torch.float32)


def _launch_forward(q, k, v, kernel_size, dilation, is_causal, scale, launch=direct, stats: bool = False):
    """The (B, heads, *spatial, d_v) output (q's dtype, contiguous) and, with ``stats``, the float32 base-2
    log-sum-exps (B, heads, H, W) (H = 1 in 1-D) the backward needs; else an empty tensor."""
    out = torch.empty((*q.shape[:-1], v.shape[-1]), device=q.device, dtype=q.dtype)
    q2, k2, v2, o2 = (_as_2d(t) for t in (q, k, v, out))
    geo = _Launch(q2, v2, kernel_size, dilation, is_causal)
    lse = geo.stats_buffer(q.device) if stats else q.new_empty((0,), dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    launch(_kernels()[0])[geo.grid](
        q2, k2, v2, o2, lse if stats else o2, *q2.stride(), *k2.stride(), *v2.stride(), *o2.stride(),
        *geo.runtime, scale * _LOG2E, BLOCK_N=_BLOCK_N, STATS=stats, **geo.constexprs)
    return out, lse


def _launch_backward(grad_out, q, k, v, out, lse, kernel_size, dilation, is_causal, scale, launch=direct):
    """dq, dk, dv: contiguous, in the dtypes of q, k, v. Two launches: dQ (and rowsum(dO * O)) per query tile, then
    dK and dV per key tile."""
    dq, dk, dv = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
    if out.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q2, k2, v2, o2, g2 = (_as_2d(t) for t in (q, k, v, out, grad_out.contiguous()))
    geo = _Launch(q2, v2, kernel_size, dilation, is_causal)
    delta = geo.stats_buffer(q.device)
    strides = (*q2.stride(), *k2.stride(), *v2.stride(), *o2.stride())
    _, dq_kernel, dkv_kernel = _kernels()
    launch(dq_kernel)[geo.grid](q2, k2, v2, o2, g2, lse, dq, delta, *strides, *geo.runtime, scale, scale * _LOG2E,
                                BLOCK_N=_BLOCK_N, **geo.constexprs)
    launch(dkv_kernel)[geo.grid](q2, k2, v2, g2, lse, delta, dk, dv, *strides, *geo.runtime, scale, scale * _LOG2E,
                                 BLOCK_M=geo.block_m_dkv, **geo.constexprs)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops (for torch.compile and autograd)


def _forward_fake(q, k, v, kernel_size, dilation, is_causal, scale, stats):
    spatial = q.shape[2:-1]
    lse_shape = (q.shape[0], q.shape[1], *((1, *spatial) if len(spatial) == 1 else spatial)) if stats else (0,)
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(lse_shape, dtype=torch.float32)


@kernel_op("zoo::neighborhood_attention_fwd", fake=_forward_fake)
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Sequence[int], dilation: Sequence[int],
                is_causal: Sequence[bool], scale: float, stats: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled neighbourhood attention forward: (B, heads, *spatial, d_v) in q's dtype, and the float32 log-sum-exps
    (B, heads, H, W) when ``stats`` (for the backward; else empty)."""
    with on_device(q):
        return _launch_forward(q, k, v, kernel_size, dilation, is_causal, scale, traced, stats)


def _backward_fake(grad_out, q, k, v, out, lse, kernel_size, dilation, is_causal, scale):
    return tuple(t.new_empty(t.shape) for t in (q, k, v))


@kernel_op("zoo::neighborhood_attention_bwd", fake=_backward_fake)
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, kernel_size: Sequence[int], dilation: Sequence[int], is_causal: Sequence[bool],
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic backward (no atomics): dq, dk, dv, contiguous."""
    with on_device(q):
        return _launch_backward(grad_out, q, k, v, out, lse, kernel_size, dilation, is_causal, scale, traced)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kernel_size, dilation, is_causal, scale, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (kernel_size, dilation, is_causal, scale)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return (*_backward_op(grad_out, q, k, v, out, lse, *ctx.args), None, None, None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def neighborhood_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel_size: tuple[int, ...],
                                  dilation: tuple[int, ...], is_causal: tuple[bool, ...], scale: float) -> torch.Tensor:
    """Neighbourhood attention with the tiled Triton kernels (the checked arguments of
    :func:`zoo.ops.neighborhood_attention`).

    Args:
        q, k: (B, heads, L, d) or (B, heads, H, W, d), any strides; v: the same with d_v; one dtype among
            float32/float16/bfloat16, on CUDA (or CPU under ``TRITON_INTERPRET=1``, not bf16).
        kernel_size, dilation, is_causal: one per spatial axis.
        scale: logit scale.

    Returns:
        (B, heads, *spatial, d_v) in q's dtype, contiguous; differentiable in q, k and v.
    """
    if not torch.compiler.is_compiling() and not needs_grad(q, k, v):  # inference: no op layer, no statistics
        with on_device(q):
            return _launch_forward(q, k, v, kernel_size, dilation, is_causal, scale)[0]
    return _forward_op(q, k, v, list(kernel_size), list(dilation), list(is_causal), scale,
                       needs_grad(q, k, v))[0]


def _triton_available() -> str | None:
    return triton_missing_reason()


def _triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel_size: tuple[int, ...],
                     dilation: tuple[int, ...], is_causal: tuple[bool, ...], scale: float) -> str | None:
    """Why the triton backend cannot serve these arguments, or None."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        return f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}; needs one of float32/float16/bfloat16 for all"
    if not (q.device == k.device == v.device):
        return f"inputs on different devices ({q.device}, {k.device}, {v.device})"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims q/k {q.shape[-1]}, v {v.shape[-1]}; the kernel takes at most {MAX_HEAD_DIM}"
    item = max(item_extent(t) for t in (q, k, v))
    if max(item, math.prod(q.shape[1:-1]) * v.shape[-1]) > INT32_MAX:  # the output's item (also for B = 0)
        return "tensors too large for the kernel's 32-bit in-item offsets"
    return device_reason(q.device, (q.dtype,), _kernels_interpreted())


# Priority 15: above flex, below NATTEN. Measured on an H200 (torch 2.11, triton 3.6, bf16, batch 128, device ms
# fwd / fwd+bwd): NAT-T stage 0 (56x56, k 7) 0.27 / 1.16 against flex 1.22 / 4.57 and the dense-masked SDPA 2.58 /
# 8.21; DiNAT-T stage 1 (28x28, k 7, dilation 4) 0.087 / 0.35 against flex 1.43 / 3.75 and dense-masked 0.44 / 1.52.
register_backend(_OP, "triton", neighborhood_attention_triton, supports=_triton_supports, priority=15,
                 available=_triton_available)
