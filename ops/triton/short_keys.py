"""The ``triton`` backends of :func:`zoo.ops.downsampled_attention` and :func:`zoo.ops.cross_attention`: attention
over a short key set (at most 256 keys: PVT's spatial reduction, 3,136 queries over 49 keys at stage 0; LookupViT's
lookup tokens reading back from its 49 compressed tokens; VOLO's self-attention, 196 tokens at 224, and its class
attention over 197), forward in one kernel, backward in one more.

Importing this module registers both backends (priority 20, above ``sdpa``) and the ``torch.library`` ops
``zoo::short_keys_attention_fwd`` / ``zoo::short_keys_attention_bwd``; it does not import triton (the kernels, in
:mod:`zoo.ops.triton.kernels.short_keys`, are imported on first use, so ``TRITON_INTERPRET`` is read then).

Every key fits in one tile, so each query tile's softmax is exact in one pass (no online rescaling, no statistics
stored), and the programs are (batch, head, chunk of query rows):

- **forward**: a program loads its (batch, head)'s keys and values once and streams over its chunk's query tiles;
- **backward**: the same programs recompute each tile's probabilities ``p``, take ``ds = p * (dp - sum(p * dp))``
  with ``dp = dO @ v^T`` (autograd's softmax backward: the output is not read), write dQ per tile and sum dK and dV
  in registers over their chunk. Where the (batch, head) pairs alone would leave the GPU idle (PVT's one head at
  stage 0), the queries are split into chunks whose float32 dK/dV partials torch sums in a fixed order: the backward
  is deterministic, without atomics.

Self-attention given its qkv projection (``qkv=``, whose head-split views q, k and v are): eager training calls run
on the projection, and the backward writes dq, dk and dv into the thirds of one gradient buffer, where autograd would
stack the three in one more pass and its unbind's and permute's nodes. Traced calls take the views (inductor fuses
the stack into one copy kernel, which an op writing into views of one buffer would cost more: see
:func:`_short_keys_attention`).

A second backward, key-blocked in flash-attention 2's order, which 16-bit training calls take
(``use_key_blocked_tiles(enabled=...)`` forces it on or off; float32 keeps the one-pass backward, its key-blocked tiles
not measured): the training forward also writes each row's base-2 log-sum-exp, one kernel computes dQ and delta =
rowsum(dO * O) per query tile over key blocks, another dK and dV per key block over query tiles. Its tiles are (64
queries, 64 keys), two stages, where the one-pass backward holds a whole 256-key row (16 query rows above 128 keys, to
stay in registers). H200, bf16, backward kernels in us (the forward's statistics cost 2 to 7 more): VOLO-D1's
self-attention (196 over 196 keys, 12 heads of 32) 120 against 136 at batch 64, 241 against 266 at 128; its class
attention (1 query over 197 keys) 47 against 78; PVT's 784 queries over 49 keys (2 heads of 64, batch 128) 76 against
175. Rows or keys after the last whole tile take one smaller tile (16 for VOLO's 196 tokens: 3 x 64 + 16, not 4 x 64;
see ``_tail_edge``), in the key-blocked kernels and the forward: H200, bf16, VOLO-D1 self-attention's key-blocked
backward 110.9 -> 95.9 us at batch 64 (233.2 -> 207.4 at 128), its class attention's 27.0 -> 20.4; the forward at batch
64 37.9 -> 37.6. A sweep of the backward's tiles with the tails ((32, 64, 128) queries x (32, 64, 128) keys, 1-3 stages,
4 or 8 warps) kept (64, 64), two stages, four warps. Traced training calls then take the ops
``zoo::short_keys_attention_fwd_stats`` / ``zoo::short_keys_attention_bwd_kb``.

Where every query tile's dQ fits in registers (at most four 64-row tiles and a tail, at most 8,192 float32 values:
VOLO's 196 tokens of 32, its class attention, 49-token stages), 16-bit calls take a fused backward instead: one
program per (batch, head) walks the key blocks and, within each, every query tile, so each tile's probabilities and
logit gradient are computed once, not once per kernel, and dQ is summed in registers across the key blocks (no
partial sums, no atomics). Its outputs are bitwise those of the two kernels (H200, bf16, batch 64, us: VOLO-D1
self-attention 96.2 -> 83.0, 207.0 -> 159.6 at batch 128; its class attention 19.8 -> 13.7; 49 over 49 keys of 64
14.2 -> 9.7; 128 over 128 of 64 41.4 -> 32.8). Traced training on a qkv projection (``qkv=``) then takes
``zoo::short_keys_attention_qkv_fwd`` / ``zoo::short_keys_attention_qkv_bwd``, whose kernel writes qkv's gradient
as one buffer (told so by a flag, not handed three views of it): no stack of dq, dk and dv.

The one-pass backward reads q and dO once and needs no per-row statistic from the forward (H200, bf16, PVT-S stage 0 at
batch 128: 0.48x the kernel time of one SDPA call with cuDNN, forward + backward; the README's operator table has
the figures).

Layouts: inputs are read through their strides; the output and dQ are (B, heads, N, d) views of contiguous
(B, N, heads, d) memory (the models' ``transpose(1, 2).reshape`` back to (B, N, C) is free), dK/dV likewise.
Numerics: float32 softmax and accumulation; fp32 inputs use IEEE dots (no TF32); fp16/bf16 probabilities are rounded
to the input dtype before their products with v and dO (as flash attention). Logits are ``(q @ k^T) * scale`` rather
than the reference's ``(q * scale) @ k^T``: equal up to float rounding.
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch

from .._dispatch import planned, register_backend
from .._qkv import split_qkv
from .._sdpa import sdpa
from . import (INT32_MAX, check_tile_edge, device_reason, direct, dot_precision, item_extent, kernel_op,
               kernels_interpreted, needs_grad, next_pow2, on_device, override_knobs, token_major, traced,
               triton_missing_reason)

__all__ = ["downsampled_attention_triton", "cross_attention_triton", "use_tiles", "use_key_blocked_tiles",
           "SUPPORTED_DTYPES", "MAX_KEYS", "MAX_HEAD_DIM"]

_OP = "downsampled_attention"
_CROSS = "cross_attention"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KEYS = 256  # every key of a (batch, head) lives in one tile
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
# programs a launch aims for (an H200 has 132 SMs): more chunks of query rows below this many (batch, head) programs
_TARGET_PROGRAMS = 512
# Launch knobs; None picks the defaults of _plan_for. Tests lower block_t to run multi-tile chunks on tiny shapes.
_TILES: dict[str, int | None] = {"block_t": None, "num_warps": None, "num_stages": None}


def use_tiles(block_t: int | None = None, num_warps: int | None = None,
              num_stages: int | None = None) -> contextlib.AbstractContextManager:
    """Temporarily override the launch knobs of both kernels (None keeps the current value).

    Args:
        block_t: query tile, a power of two >= 16 (default 64 for 16-bit inputs, 16 for float32 and for at most
            16 queries; see ``_default_block_t``).
        num_warps, num_stages: Triton launch options (default 4 warps, 1 for a forward of at most 16 queries; 3
            stages forward (float32: 2), 1 backward).
    """
    check_tile_edge("block_t", block_t)
    return override_knobs(_TILES, block_t=block_t, num_warps=num_warps, num_stages=num_stages)


@functools.cache
def _kernels():
    """The kernel module (imports triton on first use)."""
    from .kernels import short_keys

    return short_keys


def _kernels_interpreted() -> bool:
    return kernels_interpreted(f"{__package__}.kernels.short_keys")


class _Plan(NamedTuple):
    """What a launch needs besides the tensors, computed once per sizes and dtype (host time matters here)."""
    grid: tuple[int, int]
    chunk: int        # query rows per program
    runtime: tuple[int, ...]  # heads, N, M, chunk
    constexprs: dict
    options: dict


def _plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool) -> _Plan:
    b, heads, n, d = q.shape
    args = (b, heads, n, k.shape[2], d, v.shape[3], q.dtype, backward, _TILES["block_t"], _TILES["num_warps"],
            _TILES["num_stages"])
    if all(type(size) is int for size in args[:6]):
        return _plan_for(*args)
    return _plan_for.__wrapped__(*args)  # symbolic sizes (torch.compile, dynamic shapes) cannot be hashed


def _default_block_t(n: int, m: int, dtype: torch.dtype, backward: bool) -> int:
    """The query tile when use_tiles sets none.

    float32 IEEE dots hold whole tiles in registers: 16 rows. 16-bit: 64 rows, but the backward's 16 above 128 keys,
    where the key-wide float32 tiles (logits, their gradient, the dK/dV sums) of 64 rows spill (H200, bf16, VOLO-D1
    self-attention at batch 64, 12 heads of 196 tokens x 32, kernel us at 4 warps, forward (2 stages) / backward (1
    stage): 64-row tiles 48.2 / 190.0, 32-row 74.7 / 443.9, 16-row 75.2 / 136.9; one SDPA call forward and backward:
    flash 264.5, cuDNN 207.7). At most 16 queries (VOLO's class attention, one query over 197 keys) take a 16-row
    tile in the forward too (batch 128 bf16: 23.9 us at one warp against 33.7 with 64 rows and 4 warps).
    """
    if dtype == torch.float32 or n <= 16:
        return 16
    return 16 if backward and m > 128 else 64


def _default_options(block_t: int, n: int, dtype: torch.dtype, backward: bool) -> dict:
    """Warps and pipeline stages when use_tiles sets none: 4 warps, one for a 16-bit forward of at most 16 queries;
    one stage backward, and forward 3 for 16-bit inputs, 2 for float32 (H200 bf16 batch 128, us with 64-row tiles at
    2 / 3 stages: VOLO-D1 self-attention 85.1 / 76.6, PVT stage 0 (3,136 queries over 49 keys of 64) 43.3 / 37.0).

    float32 keeps 4 warps at few queries: its IEEE dots over one warp spill (H200, VOLO-D1 class attention, one query
    over 197 keys, 12 heads of 32, batch 128, us at 1 / 2 / 4 / 8 warps: 1,125 / 1,537 / 84.9 / 106.7; SDPA 177.9).
    """
    warps = 1 if not backward and n <= 16 and block_t == 16 and dtype != torch.float32 else 4
    stages = 1 if backward else 2 if dtype == torch.float32 else 3
    return dict(num_warps=warps, num_stages=stages)


def _tail_edge(n: int, block: int) -> int:
    """The edge of the tile that takes the last ``n % block`` rows (or keys) of ``n``, a power of two of at least
    16, when that is below ``block``; else 0, and whole ``block`` tiles cover all ``n`` (VOLO-D1's 196 tokens in
    64-token tiles: 16, so the last four tokens cost a 16-token tile, not a fourth 64-token one)."""
    edge = max(16, next_pow2(n % block))
    return edge if n % block and edge < block else 0


@functools.lru_cache(maxsize=256)
def _plan_for(b: int, heads: int, n: int, m: int, d: int, dv: int, dtype: torch.dtype, backward: bool,
              block_t: int | None, num_warps: int | None, num_stages: int | None) -> _Plan:
    block_t = block_t or _default_block_t(n, m, dtype, backward)
    tiles = -(-n // block_t)
    pairs = max(1, b * heads)
    chunks = max(1, min(tiles, -(-_TARGET_PROGRAMS // pairs)))
    chunk = -(-tiles // chunks) * block_t
    chunks = max(1, -(-n // chunk))
    constexprs = dict(D=d, DV=dv, BLOCK_D=max(16, next_pow2(d)), BLOCK_DV=max(16, next_pow2(dv)),
                      BLOCK_M=max(16, next_pow2(m)), BLOCK_T=block_t, PRECISION=dot_precision(dtype))
    if not backward:  # a chunk is whole tiles, so only the last chunk's rows can end in a part tile
        constexprs["TAIL_T"] = _tail_edge(n, block_t)
    defaults = _default_options(block_t, n, dtype, backward)
    options = dict(num_warps=num_warps or defaults["num_warps"], num_stages=num_stages or defaults["num_stages"])
    return _Plan((b * heads, chunks), chunk, (heads, n, m, chunk), constexprs, options)



def _launch_forward(q, k, v, scale: float, launch=direct, stats: bool = False):
    """out (B, heads, N, d_v), token-major memory; with ``stats`` also (out, lse): each row's log-sum-exp of its
    scaled logits in base 2, (B, heads, N) float32, for the key-blocked backward."""
    b, heads, n, _ = q.shape
    out = token_major(b, heads, n, v.shape[3], q)
    lse = torch.empty((b, heads, n), device=q.device, dtype=torch.float32) if stats else None
    if b * heads == 0 or n == 0:
        return (out, lse) if stats else out
    plan = _plan(q, k, v, False)
    launch(_kernels()._forward_kernel)[plan.grid](
        q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *plan.runtime, scale * _LOG2E,
        out if lse is None else lse, **plan.options, **plan.constexprs, STATS=stats)
    return (out, lse) if stats else out


# The key-blocked backward: whether training calls take it (None: 16-bit calls do), its tiles ((query rows, keys) a
# tile, warps, stages; None: the defaults of _launch_backward_key_blocked)
_KB_TILES: dict[str, int | bool | None] = {"enabled": None, "block_t": None, "block_n": None, "num_warps": None,
                                           "num_stages": None, "fused": None}
# the fused backward keeps every query tile's dQ in registers: at most four whole tiles (and a tail), and at most
# this many float32 values of dQ, tile rows x head dim (H200, bf16, batch 64, us two kernels -> fused: VOLO-D1's 196
# tokens (208 tile rows) x 32, 6,656 values, 96.2 -> 83.0; 128 over 128 keys x 64, 8,192, 41.4 -> 32.8; but PVT's
# 196 queries over 49 keys x 64, 13,312, 24.5 -> 38.1, its registers spilling)
_FUSED_MAX_TILES = 4
_FUSED_MAX_DQ = 8192


def use_key_blocked_tiles(enabled: bool | None = None, block_t: int | None = None, block_n: int | None = None,
                          num_warps: int | None = None, num_stages: int | None = None,
                          fused: bool | None = None) -> contextlib.AbstractContextManager:
    """Temporarily override the key-blocked backward's knobs (None keeps the current value): whether training calls
    take it (their forward then writes row statistics; by default 16-bit calls do, float32 calls take the one-pass
    backward), query rows and keys a tile (powers of two >= 16; default 64 and 64, float32 32 and 32), warps (4) and
    stages (16-bit 2, float32 1) of the two kernels; whether queries that fit in four tiles (and a tail) take the
    fused kernel instead, one program per (batch, head) of 4 warps (default: 16-bit calls do)."""
    check_tile_edge("block_t", block_t)
    check_tile_edge("block_n", block_n)
    return override_knobs(_KB_TILES, enabled=enabled, block_t=block_t, block_n=block_n, num_warps=num_warps,
                          num_stages=num_stages, fused=fused)


def _fresh_gradients(q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialised dq, dk, dv: (B, heads, tokens, d) views of token-major memory, shaped and typed as q, k, v."""
    b, heads, n, d = q.shape
    m, dv_width = k.shape[2], v.shape[3]
    return token_major(b, heads, n, d, q), token_major(b, heads, m, d, k), token_major(b, heads, m, dv_width, v)


def _key_blocked_constexprs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """The key-blocked kernels' tiles and launch options (``_KB_TILES``, else the defaults)."""
    n, d, m, dv_width = q.shape[2], q.shape[3], k.shape[2], v.shape[3]
    wide = q.dtype == torch.float32
    block_t = _KB_TILES["block_t"] or (32 if wide else 64)
    block_n = _KB_TILES["block_n"] or (32 if wide else 64)
    return dict(D=d, DV=dv_width, BLOCK_D=max(16, next_pow2(d)), BLOCK_DV=max(16, next_pow2(dv_width)),
                BLOCK_T=block_t, BLOCK_N=block_n, PRECISION=dot_precision(q.dtype),
                TAIL_T=_tail_edge(n, block_t), TAIL_N=_tail_edge(m, block_n),
                num_warps=_KB_TILES["num_warps"] or 4, num_stages=_KB_TILES["num_stages"] or (1 if wide else 2))


def _fused_tiles(n: int, dtype: torch.dtype, constexprs: dict) -> int | None:
    """The whole query tiles of the fused backward for n queries, or None where it does not serve the call: more
    than ``_FUSED_MAX_TILES`` whole tiles, more than ``_FUSED_MAX_DQ`` float32 values of dQ to hold, or not asked
    for (by default 16-bit calls take it)."""
    fused = _KB_TILES["fused"]
    if fused is None:
        fused = dtype != torch.float32
    tiles = n // constexprs["BLOCK_T"] if constexprs["TAIL_T"] else -(-n // constexprs["BLOCK_T"])
    held = (tiles * constexprs["BLOCK_T"] + constexprs["TAIL_T"]) * constexprs["BLOCK_D"]
    return tiles if fused and tiles <= _FUSED_MAX_TILES and held <= _FUSED_MAX_DQ else None


def _launch_fused(grad_out, q, k, v, out, lse, scale: float, dq, dk, dv, constexprs: dict, tiles: int,
                  launch=direct, separate_kv: bool = True) -> None:
    """The fused backward kernel (one program per (batch, head)); without ``separate_kv``, dq is a qkv projection's
    gradient buffer and dk, dv are not used (see the kernel)."""
    b, heads, n, _ = q.shape
    delta = torch.empty((b, heads, n), device=q.device, dtype=torch.float32)
    kv_strides = (dk.stride(0), dk.stride(2), dv.stride(0), dv.stride(2)) if separate_kv else (
        dq.stride(0), dq.stride(1), dq.stride(0), dq.stride(1))
    dq_strides = (dq.stride(0), dq.stride(2)) if separate_kv else (dq.stride(0), dq.stride(1))
    # 4 warps: 8 faulted with 64-key blocks (an illegal address, triton 3.6) and were slower with 32. One stage for
    # one query tile (H200 bf16 batch 64, us at 1 / 2 stages: VOLO's class attention 13.7 / 16.7, 49 over 49 keys x
    # 64 9.7 / 10.9), else the two kernels' (VOLO-D1 self-attention 87.9 / 83.0)
    stages = _KB_TILES["num_stages"] or (1 if n <= constexprs["BLOCK_T"] else constexprs["num_stages"])
    options = dict(num_warps=4, num_stages=stages)
    launch(_kernels()._fused_backward_kernel)[(b * heads,)](
        grad_out, q, k, v, out, lse, delta, dq, dk, dv, *grad_out.stride(), *q.stride(), *k.stride(), *v.stride(),
        *dq_strides, *kv_strides, heads, n, k.shape[2], scale, scale * _LOG2E, **{**constexprs, **options},
        TILES=tiles, TAIL_ROWS=constexprs["TAIL_T"] or 16, SEPARATE_KV=separate_kv)


def _launch_backward_key_blocked(grad_out, q, k, v, out, lse, scale: float, launch=direct, into=None):
    """dq, dk, dv from the forward's output and row statistics (``_launch_forward`` with ``stats``): at most four
    query tiles (and a tail) in 16-bit take the fused kernel, one program per (batch, head); else one kernel for dQ
    (and delta = rowsum(dO * O)) per query tile, one for dK/dV per key block. Every program owns its outputs: no
    partial sums, deterministic. Fresh token-major tensors, or written into ``into``'s three views (see
    ``_launch_backward``)."""
    b, heads, n, d = q.shape
    m = k.shape[2]
    dq, dk, dv = into or _fresh_gradients(q, k, v)
    if b * heads == 0 or n == 0:
        return dq, dk.zero_(), dv.zero_()
    constexprs = _key_blocked_constexprs(q, k, v)
    tiles = _fused_tiles(n, q.dtype, constexprs)
    if tiles is not None:
        _launch_fused(grad_out, q, k, v, out, lse, scale, dq, dk, dv, constexprs, tiles, launch)
        return dq, dk, dv
    delta = torch.empty((b, heads, n), device=q.device, dtype=torch.float32)
    kernels = _kernels()
    strides = (*grad_out.stride(), *q.stride(), *k.stride(), *v.stride())
    launch(kernels._kb_dq_kernel)[(b * heads, -(-n // constexprs["BLOCK_T"]))](
        grad_out, q, k, v, out, lse, dq, delta, *strides, dq.stride(0), dq.stride(2), heads, n, m, scale,
        scale * _LOG2E, **constexprs)
    launch(kernels._kb_dkv_kernel)[(b * heads, -(-m // constexprs["BLOCK_N"]))](
        grad_out, q, k, v, lse, delta, dk, dv, *strides, dk.stride(0), dk.stride(2), dv.stride(0), dv.stride(2),
        heads, n, m, scale, scale * _LOG2E, **constexprs)
    return dq, dk, dv


def _launch_qkv_backward(grad_out, qkv, out, lse, heads: int, scale: float, launch=direct) -> torch.Tensor:
    """The gradient (B, N, 3 * heads * d) of a qkv projection, from the fused kernel writing one buffer (the call must
    be one :func:`_fused_tiles` serves)."""
    q, k, v = split_qkv(qkv, heads)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    if dqkv.numel():
        constexprs = _key_blocked_constexprs(q, k, v)
        _launch_fused(grad_out, q, k, v, out, lse, scale, dqkv, dqkv, dqkv, constexprs,
                      _fused_tiles(q.shape[2], q.dtype, constexprs), launch, separate_kv=False)
    return dqkv


def _launch_backward(grad_out, q, k, v, scale: float, launch=direct, into=None):
    """dq, dk, dv: fresh token-major tensors, or written into ``into``'s three (B, heads, tokens, d) views, whose
    heads lie side by side in each token (the thirds of a qkv projection's gradient)."""
    b, heads, n, d = q.shape
    m, dv_width = k.shape[2], v.shape[3]
    dq, dk, dv = into or _fresh_gradients(q, k, v)
    if b * heads == 0 or n == 0:
        return dq, dk.zero_(), dv.zero_()
    plan = _plan(q, k, v, True)
    splits = plan.grid[1]
    if splits == 1:  # one program per (batch, head): it writes the gradients themselves
        dk_mem, dv_mem, dk_split, dv_split = dk, dv, 0, 0
        kv_strides = (dk.stride(0), dk.stride(2), dv.stride(0), dv.stride(2))  # (batch, token) of each
    else:  # float32 partial sums per chunk, (splits, B, M, heads, d), summed below in a fixed order
        dk_mem = torch.empty((splits, b, m, heads, d), device=q.device, dtype=torch.float32)
        dv_mem = torch.empty((splits, b, m, heads, dv_width), device=q.device, dtype=torch.float32)
        dk_split, dv_split = dk_mem.stride(0), dv_mem.stride(0)
        kv_strides = (dk_mem.stride(1), dk_mem.stride(2), dv_mem.stride(1), dv_mem.stride(2))
    launch(_kernels()._backward_kernel)[plan.grid](
        grad_out, q, k, v, dq, dk_mem, dv_mem, *grad_out.stride(), *q.stride(), *k.stride(), *v.stride(),
        dq.stride(0), dq.stride(2), *kv_strides, dk_split, dv_split, *plan.runtime, scale, scale * _LOG2E,
        **plan.options, **plan.constexprs)
    if splits > 1:
        dk.copy_(dk_mem.sum(0).transpose(1, 2))  # one rounding to the gradient's dtype, in the copy
        dv.copy_(dv_mem.sum(0).transpose(1, 2))
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops (for torch.compile: see ops.triton.kernel_op) and autograd


def _forward_fake(q, k, v, scale):
    b, heads, n, _ = q.shape
    return token_major(b, heads, n, v.shape[3], q)


@kernel_op("zoo::short_keys_attention_fwd", fake=_forward_fake)
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v over at most 256 keys: (B, heads, N, d_v), token-major memory."""
    with on_device(q):
        return _launch_forward(q, k, v, scale, traced)


def _backward_fake(grad_out, q, k, v, scale):
    b, heads, n, d = q.shape
    m = k.shape[2]
    return (token_major(b, heads, n, d, q), token_major(b, heads, m, d, k),
            token_major(b, heads, m, v.shape[3], v))


@kernel_op("zoo::short_keys_attention_bwd", fake=_backward_fake)
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic backward: dq, dk, dv (token-major memory)."""
    with on_device(q):
        return _launch_backward(grad_out, q, k, v, scale, traced)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    return (*_backward_op(grad_out, q, k, v, ctx.scale), None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _forward_stats_fake(q, k, v, scale):
    b, heads, n, _ = q.shape
    return token_major(b, heads, n, v.shape[3], q), q.new_empty((b, heads, n), dtype=torch.float32)


@kernel_op("zoo::short_keys_attention_fwd_stats", fake=_forward_stats_fake)
def _forward_stats_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward and each row's base-2 log-sum-exp (B, heads, N) float32, for the key-blocked backward."""
    with on_device(q):
        return _launch_forward(q, k, v, scale, traced, stats=True)


def _backward_kb_fake(grad_out, q, k, v, out, lse, scale):
    return _backward_fake(grad_out, q, k, v, scale)


@kernel_op("zoo::short_keys_attention_bwd_kb", fake=_backward_kb_fake)
def _backward_kb_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The key-blocked backward: dq, dk, dv (token-major memory)."""
    with on_device(q):
        return _launch_backward_key_blocked(grad_out, q, k, v, out, lse, scale, traced)


def _setup_stats_context(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward_kb(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return (*_backward_kb_op(grad_out, q, k, v, out, lse, ctx.scale), None)


_forward_stats_op.register_autograd(_backward_kb, setup_context=_setup_stats_context)


def _forward_qkv_fake(qkv, heads, scale):
    return _forward_stats_fake(*split_qkv(qkv, heads), scale)


@kernel_op("zoo::short_keys_attention_qkv_fwd", fake=_forward_qkv_fake)
def _forward_qkv_op(qkv: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention on a (B, N, 3 * heads * d) qkv projection: the forward and its row statistics, as
    ``zoo::short_keys_attention_fwd_stats`` on qkv's head-split views."""
    with on_device(qkv):
        return _launch_forward(*split_qkv(qkv, heads), scale, traced, stats=True)


def _backward_qkv_fake(grad_out, qkv, out, lse, heads, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


@kernel_op("zoo::short_keys_attention_qkv_bwd", fake=_backward_qkv_fake)
def _backward_qkv_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, heads: int,
                     scale: float) -> torch.Tensor:
    """qkv's gradient (B, N, 3 * heads * d), contiguous, written by the fused backward in one buffer."""
    with on_device(qkv):
        return _launch_qkv_backward(grad_out, qkv, out, lse, heads, scale, traced)


def _setup_qkv_context(ctx, inputs, output) -> None:
    qkv, heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.heads, ctx.scale = heads, scale


def _backward_qkv(ctx, grad_out, grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return _backward_qkv_op(grad_out, qkv, out, lse, ctx.heads, ctx.scale), None, None


_forward_qkv_op.register_autograd(_backward_qkv, setup_context=_setup_qkv_context)


class _EagerShortKeys(torch.autograd.Function):
    """The same kernels without the custom-op layer, for eager calls (``torch.library`` dispatch costs host time)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        with on_device(q):  # (the launches replayed from a call plan where plans are on: zoo.ops._dispatch.planned)
            out = planned("short_keys_attention.forward", _launch_forward, q, k, v, scale)
        _setup_context(ctx, (q, k, v, scale), out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        with on_device(q):
            return (*planned("short_keys_attention.backward", _launch_backward, grad_out, q, k, v, ctx.scale), None)


# ----------------------------------------------------------------------------------------------------------------
# training on a qkv projection (self-attention): the backward writes qkv's gradient in one buffer, where autograd
# would stack dq, dk and dv (one more pass over them, and in eager code the unbind's and permute's nodes)


def _packed_backward(grad_out, qkv, heads: int, scale: float, launch=direct) -> torch.Tensor:
    """The gradient (B, N, 3 * heads * d) of a (B, N, 3 * heads * d) qkv projection: dq, dk and dv written by the
    backward kernel into its thirds."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _launch_backward(grad_out, *split_qkv(qkv, heads), scale, launch, into=split_qkv(dqkv, heads))
    return dqkv


class _EagerPackedShortKeys(torch.autograd.Function):
    """The packed kernels without the custom-op layer, for eager training calls."""

    @staticmethod
    def forward(ctx, qkv, heads, scale):
        with on_device(qkv):
            out = planned("short_keys_attention.packed_forward", _packed_forward, qkv, heads, scale)
        ctx.save_for_backward(qkv)
        ctx.heads, ctx.scale = heads, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, = ctx.saved_tensors
        with on_device(qkv):
            return planned("short_keys_attention.packed_backward", _packed_backward, grad_out, qkv, ctx.heads,
                           ctx.scale), None, None


class _EagerShortKeysKB(torch.autograd.Function):
    """Eager training with the key-blocked backward: the forward keeps its output and row statistics. On a qkv
    projection (``qkv`` given, q/k/v its views) the backward writes qkv's gradient in one buffer."""

    @staticmethod
    def forward(ctx, q, k, v, scale, qkv, heads):
        with on_device(q):
            out, lse = planned("short_keys_attention.kb_forward", _forward_with_stats, q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse, qkv)
        ctx.scale, ctx.heads = scale, heads
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, qkv = ctx.saved_tensors
        with on_device(q):
            if qkv is None:
                return (*planned("short_keys_attention.kb_backward", _launch_backward_key_blocked, grad_out, q, k, v,
                                 out, lse, ctx.scale), None, None, None)
            dqkv = planned("short_keys_attention.kb_packed_backward", _packed_backward_key_blocked, grad_out, q, k, v,
                           out, lse, ctx.scale, qkv, ctx.heads)
            return None, None, None, None, dqkv, None


def _forward_with_stats(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_launch_forward` keeping the row statistics (arguments positional: a call plan's)."""
    return _launch_forward(q, k, v, scale, direct, True)


def _packed_forward(qkv, heads: int, scale: float) -> torch.Tensor:
    """:func:`_launch_forward` on the head-split views of a (B, N, 3 * heads * d) qkv projection."""
    return _launch_forward(*split_qkv(qkv, heads), scale)


def _packed_backward_key_blocked(grad_out, q, k, v, out, lse, scale: float, qkv, heads: int) -> torch.Tensor:
    """The key-blocked backward's gradient of ``qkv`` (q, k and v its views): dq, dk and dv written into its
    thirds."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _launch_backward_key_blocked(grad_out, q, k, v, out, lse, scale, into=split_qkv(dqkv, heads))
    return dqkv


# ----------------------------------------------------------------------------------------------------------------
# the backend


def _short_keys_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          qkv: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v with the kernels, through the path that fits the caller (compiled, inference, eager
    training; in training on ``qkv`` itself when q, k and v are its views)."""
    key_blocked = _KB_TILES["enabled"]
    if key_blocked is None:
        key_blocked = q.dtype != torch.float32
    if torch.compiler.is_compiling():
        if key_blocked and needs_grad(q, k, v):
            # on qkv only where the fused kernel writes its gradient as one buffer: a kernel writing three views of
            # one buffer made inductor copy each view in and out (H200, compiled VOLO-D1 step: 1.2 ms more), where
            # without qkv it stacks dq, dk and dv in one fused copy
            if (qkv is not None and needs_grad(qkv)
                    and _fused_tiles(q.shape[2], q.dtype, _key_blocked_constexprs(q, k, v)) is not None):
                return _forward_qkv_op(qkv, q.shape[1], scale)[0]
            return _forward_stats_op(q, k, v, scale)[0]
        return _forward_op(q, k, v, scale)
    if not needs_grad(q, k, v):  # inference: no autograd node, nothing saved
        with on_device(q):
            return _launch_forward(q, k, v, scale)
    packed = qkv is not None and needs_grad(qkv)
    if key_blocked:
        if packed:  # q, k, v are views of qkv: autograd reaches them through it
            return _EagerShortKeysKB.apply(q.detach(), k.detach(), v.detach(), scale, qkv, q.shape[1])
        return _EagerShortKeysKB.apply(q, k, v, scale, None, q.shape[1])
    if packed:
        return _EagerPackedShortKeys.apply(qkv, q.shape[1], scale)
    return _EagerShortKeys.apply(q, k, v, scale)


def downsampled_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                                 bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 qkv: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over at most 256 keys with the Triton kernels (the arguments of
    :func:`zoo.ops.downsampled_attention`, heads split).

    Args:
        q: (B, heads, N, d); k: (B, heads, M, d), M <= 256; v: (B, heads, M, d_v); any strides, one dtype among
            float32/float16/bfloat16, on CUDA (or CPU under ``TRITON_INTERPRET=1``, not bf16).
        bias, dropout_p: must be None and 0 (neither is fused; dispatch sends such calls elsewhere).
        qkv: None, or the (B, N, 3 * heads * d) projection whose head-split views q, k and v are (checked by
            :func:`zoo.ops.downsampled_attention`): eager training calls then run on it, and the backward returns
            its gradient in one buffer.

    Returns:
        (B, heads, N, d_v) in q's dtype, a view of token-major (B, N, heads, d_v) memory.
    """
    _refuse_unfused(_OP, bias, dropout_p)
    return _short_keys_attention(q, k, v, scale, qkv)


def cross_attention_triton(q: torch.Tensor, k: torch.Tensor, v_k: torch.Tensor | None, v_q: torch.Tensor | None, *,
                           scale: float, bias: torch.Tensor | None = None,
                           dropout_p: float = 0.0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both directions of :func:`zoo.ops.cross_attention` (same arguments): ``out_k`` (the N k tokens reading from at
    most 128 q tokens) with the kernels, ``out_q`` (q reading from the N k tokens: a long key set) with SDPA.

    Args:
        q: (B, heads, M, d), M <= 128; k: (B, heads, N, d); v_k: (B, heads, N, d_v) or None; v_q: (B, heads, M,
            d_v2) or None; one dtype among float32/float16/bfloat16.
        bias, dropout_p: must be None and 0.

    Returns:
        ``(out_q, out_k)`` as :func:`zoo.ops.cross_attention` returns them (``out_k`` token-major in memory).
    """
    _refuse_unfused(_CROSS, bias, dropout_p)
    out_q = None if v_k is None else sdpa(q, k, v_k, scale=scale)
    out_k = None if v_q is None else _short_keys_attention(k, q, v_q, scale)
    return out_q, out_k


def _refuse_unfused(op: str, bias: torch.Tensor | None, dropout_p: float) -> None:
    if bias is not None or dropout_p:
        raise ValueError(f"{op} triton backend: needs bias=None and dropout_p=0, got a bias of "
                         f"{None if bias is None else tuple(bias.shape)} and dropout_p={dropout_p}")


def _cross_supports(q: torch.Tensor, k: torch.Tensor, v_k: torch.Tensor | None, v_q: torch.Tensor | None, *,
                    scale: float | None = None, bias: torch.Tensor | None = None,
                    dropout_p: float = 0.0) -> str | None:
    """Why the cross-attention triton backend cannot serve these arguments, or None."""
    if v_q is None:
        return "no v_q: the kernels serve the reverse direction (k reading from q), which is not asked for"
    if v_k is not None and v_k.dtype != q.dtype:
        return f"v_k dtype {v_k.dtype} differs from q's {q.dtype}"
    return _supports(k, q, v_q, bias=bias, dropout_p=dropout_p)


def _supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              bias: torch.Tensor | None = None, dropout_p: float = 0.0,
              qkv: torch.Tensor | None = None) -> str | None:
    """Why the downsampled-attention triton backend cannot serve these arguments, or None."""
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}; needs one of float32/float16/bfloat16"
    if bias is not None:
        return "a logit bias (not fused)"
    if dropout_p:
        return f"dropout_p={dropout_p} (attention dropout is not fused)"
    if len({q.device, k.device, v.device}) > 1:
        return "inputs on different devices"
    if not 0 < k.shape[2] <= MAX_KEYS:
        return f"{k.shape[2]} keys; the kernels take 1 to {MAX_KEYS} (all in one tile)"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims q/k {q.shape[-1]}, v {v.shape[-1]}; the kernels take at most {MAX_HEAD_DIM}"
    b, heads, n, _ = q.shape
    if (any(item_extent(t) > INT32_MAX for t in (q, k, v)) or n * heads * max(q.shape[-1], v.shape[-1]) > INT32_MAX
            or (qkv is not None and item_extent(qkv) > INT32_MAX)):
        return "tensors too large for the kernels' 32-bit in-item offsets"
    return device_reason(q.device, (q.dtype,), _kernels_interpreted())


register_backend(_OP, "triton", downsampled_attention_triton, supports=_supports, priority=20,
                 available=triton_missing_reason)
register_backend(_CROSS, "triton", cross_attention_triton, supports=_cross_supports, priority=20,
                 available=triton_missing_reason)
