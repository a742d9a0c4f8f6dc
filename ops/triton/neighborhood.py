"""The ``triton`` backend of :func:`zoo.ops.neighborhood_attention`: a tiled neighbourhood-attention forward.

Importing this module registers the backend and the ``torch.library`` op ``zoo::neighborhood_attention_fwd``; it
does not import triton. The kernel (:mod:`zoo.ops.triton.kernels.neighborhood`) is imported on first use, so
``TRITON_INTERPRET`` is read then.

Computation (NATTEN's semantics, as the reference backend defines them in :mod:`zoo.ops.neighborhood`). Dilation
splits each axis into interleaved groups and a query only sees keys of its own group, on the group's coordinates,
so one program takes a ``TY x TX`` tile of queries of one dilation group (1 x 64 in 1-D, 8 x 8 in 2-D). Their
windows start and end monotonically with the query, so together they see one box of at most
``(TY + ky - 1) x (TX + kx - 1)`` keys of the group (14 x 14 for an 8 x 8 tile and a 7 x 7 kernel, against 49 keys
per query: the dense tile work is 4x the exact neighbourhood work, and 1/16 of dense attention over a 56 x 56 map).
The program walks that box ``BLOCK_N`` keys at a time with an online softmax (base 2, float32), masking each
(query, key) pair to the query's own window, and stores the normalised output into a contiguous
(B, heads, *spatial, d_v) tensor. q, k and v are read through their strides.

Numerics: float32 accumulation; fp32 inputs use IEEE dots (no TF32); fp16/bf16 probabilities are rounded to the
input dtype before the product with V (as flash attention).

Scope: the forward only. A call whose inputs require grad is refused with a reason (dispatch then falls back).
Automatic dispatch does not pick the backend (its ``prefer`` rule declines every call) until its speed on the H200
is measured; ask for it with ``backend="triton"``.
"""
from __future__ import annotations

import functools

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
def _kernel():
    """The forward kernel (imports triton on first use)."""
    from .kernels import neighborhood as kernels

    return kernels._forward_kernel


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, heads, 1, L, d) view; 2-D inputs as they are."""
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


def _launch_forward(q, k, v, kernel_size, dilation, is_causal, scale, launch=direct) -> torch.Tensor:
    """(B, heads, *spatial, d_v) output of q's dtype, contiguous."""
    out = torch.empty((*q.shape[:-1], v.shape[-1]), device=q.device, dtype=q.dtype)
    q2, k2, v2, o2 = (_as_2d(t) for t in (q, k, v, out))
    b, heads, h, w, d = q2.shape
    dv = v2.shape[-1]
    ky, kx = _per_2d(kernel_size, 1)
    dy, dx = _per_2d(dilation, 1)
    cy, cx = _per_2d(is_causal, False)
    ty, tx, tiles_y, tiles_x = _tiles((h, w), (dy, dx))
    if out.numel() == 0:
        return out
    launch(_kernel())[(dy * dx * tiles_y * tiles_x, b * heads)](
        q2, k2, v2, o2, *q2.stride(), *k2.stride(), *v2.stride(), *o2.stride(),
        heads, h, w, dy, dx, tiles_y, tiles_x, scale * _LOG2E,
        KY=ky, KX=kx, CAUSAL_Y=cy, CAUSAL_X=cx, D=d, DV=dv, TY=ty, TX=tx, BLOCK_N=_BLOCK_N,
        BLOCK_D=max(16, next_pow2(d)), BLOCK_DV=max(16, next_pow2(dv)), PRECISION=dot_precision(q.dtype),
        num_warps=4, num_stages=2)
    return out


def _forward_fake(q, k, v, kernel_size, dilation, is_causal, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@kernel_op("zoo::neighborhood_attention_fwd", fake=_forward_fake)
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: list[int], dilation: list[int],
                is_causal: list[bool], scale: float) -> torch.Tensor:
    """Tiled neighbourhood attention forward: (B, heads, *spatial, d_v) in q's dtype."""
    with on_device(q):
        return _launch_forward(q, k, v, tuple(kernel_size), tuple(dilation), tuple(is_causal), scale, traced)


def neighborhood_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel_size: tuple[int, ...],
                                  dilation: tuple[int, ...], is_causal: tuple[bool, ...], scale: float) -> torch.Tensor:
    """Neighbourhood attention with the tiled Triton kernel (the checked arguments of
    :func:`zoo.ops.neighborhood_attention`), forward only.

    Args:
        q, k: (B, heads, L, d) or (B, heads, H, W, d), any strides; v: the same with d_v; one dtype among
            float32/float16/bfloat16, on CUDA (or CPU under ``TRITON_INTERPRET=1``, not bf16); no input requiring
            grad.
        kernel_size, dilation, is_causal: one per spatial axis.
        scale: logit scale.

    Returns:
        (B, heads, *spatial, d_v) in q's dtype, contiguous.
    """
    if torch.compiler.is_compiling():
        return _forward_op(q, k, v, list(kernel_size), list(dilation), list(is_causal), scale)
    with on_device(q):
        return _launch_forward(q, k, v, kernel_size, dilation, is_causal, scale)


def _triton_available() -> str | None:
    return triton_missing_reason()


def _triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel_size: tuple[int, ...],
                     dilation: tuple[int, ...], is_causal: tuple[bool, ...], scale: float) -> str | None:
    """Why the triton backend cannot serve these arguments, or None."""
    if needs_grad(q, k, v):
        return "the triton backend has no backward yet (inputs require grad)"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        return f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}; needs one of float32/float16/bfloat16 for all"
    if not (q.device == k.device == v.device):
        return f"inputs on different devices ({q.device}, {k.device}, {v.device})"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims q/k {q.shape[-1]}, v {v.shape[-1]}; the kernel takes at most {MAX_HEAD_DIM}"
    item = max(item_extent(t) for t in (q, k, v))
    if max(item, q[0].numel() // q.shape[-1] * v.shape[-1]) > INT32_MAX:
        return "tensors too large for the kernel's 32-bit in-item offsets"
    return device_reason(q.device, (q.dtype,), _kernels_interpreted())


def _triton_prefer(q, k, v, **_) -> str | None:
    """Automatic choice keeps to the measured backends until this one is timed on the H200."""
    return "not yet timed against the reference and flex on a GPU (ask for backend='triton' to use it)"


register_backend(_OP, "triton", neighborhood_attention_triton, supports=_triton_supports, priority=5,
                 available=_triton_available, prefer=_triton_prefer)
