"""The ``triton`` backend of :func:`zoo.ops.agent_attention`: both attentions in one kernel, backward in one more.

Importing this module registers the backend (priority 20, above ``sdpa``) and the ``torch.library`` ops
``zoo::agent_attention_fwd`` / ``zoo::agent_attention_bwd``; it does not import triton (the kernels, in
:mod:`zoo.ops.triton.kernels`, are imported on first use, so ``TRITON_INTERPRET`` is read then).

Computation (the definition is the reference backend in :mod:`zoo.ops.agent`), one program per (batch, head) (in
the forward, where batch * heads leaves SMs idle, a few programs per (batch, head), each aggregating and taking every
few query tiles: ``default_query_splits``):

1. **Agent aggregation**: the program's ``A`` agent tokens (at most 128, all in one tile) stream over the keys in
   tiles of ``BLOCK_T`` with an online softmax of ``agent @ k^T * scale + agent_bias`` and accumulate ``@ v``:
   ``agent_v`` (A, d_v), rounded to the input dtype as the reference's matmul output is, and its log-sum-exp.
2. **Agent broadcast**: the same program streams over the queries in tiles of ``BLOCK_T``; each tile's softmax over
   the agents fits in one tile (no online rescaling) and reads ``agent_v`` from registers. No per-query statistic
   is stored: the backward recomputes this softmax (a per-tile store of its log-sum-exp doubled the kernel's time
   at Agent-Swin-T stage 2 on the H200).

So the forward is one launch that reads q, k, v once, with no (A, M) or (N, A) probability map in memory and no bias
cast. The backward is one launch per (batch, head) too: the broadcast's gradient over the query tiles first (dQ
written per tile; d(agent) and d(agent_v) summed in registers), then the aggregation's over the key tiles (dK, dV
written per tile). Where batch * heads gives fewer than two programs an SM (``default_backward_splits``), it is
three launches over (batch * heads, splits) programs instead: the query tiles dealt to the splits, each writing
float32 partials of d(agent) and d(agent_v); then the key tiles likewise, each program first summing the d(agent_v)
partials in split order; then one program a (batch, head) sums the d(agent) partials in split order. It is
deterministic without atomics: every gradient element is float32 sums in a fixed order. Bias gradients (when a bias
requires grad) are the per-(batch, head) logit gradients written as float32 (B, heads, A, M) / (B, heads, N, A) maps
(rows padded to multiples of 16 for vector stores), then summed to the bias's shape: in eager training, for the
Agent models' (1, heads, ...) biases, by one launch of ours each (over the batch in batch order, inside the node's
planned body), elsewhere by torch (one reduction each).

Layouts: inputs are read through their strides (the models pass head-split views of a qkv projection); the output
is a (B, heads, N, d_v) view of a contiguous (B, N, heads, d_v) tensor, so the models' ``transpose(1, 2).reshape``
back to (B, N, C) is free; the q/k/v/agent gradients use the same token-major layout.

Numerics: float32 accumulation and softmax; fp32 inputs use IEEE dots (no TF32); fp16/bf16 probabilities are
rounded to the input dtype before their products (as flash attention). Logits are ``(agent @ k^T) * scale``
rather than the reference's ``(agent * scale) @ k^T``: equal up to float rounding.

It also registers the ``triton`` backend of :func:`zoo.ops.pooled_agent_attention` (self-attention over a prefix
and a token grid): the same forward kernel's program first pools its agents from the queries' grid tokens (0/1
window-membership dots over the query tiles) and, after each query tile's broadcast, adds the values' 3x3 depthwise
conv for that tile's grid tokens (nine neighbour loads of the head's channels), one launch in all. A training call is
one autograd node: the forward also stores the agents and the aggregation's statistics. Its backward, where batch *
heads fills the GPU, is one launch too (``_pooled_backward_kernel``): the single-launch backward above with the
attention's output tiles recomputed (the stored output holds the conv term too), then, behind a barrier, the
pooling's gradient added into the program's dQ rows and the conv's input gradient into its dV rows, with the conv
weight's and bias's per-item partial sums (summed by the depthwise-conv op's kernel). Elsewhere the split kernels,
then the pooling's and the conv's gradient kernels. Given the qkv projection that q, k and v are views of, that node
is on qkv itself and its backward writes qkv's gradient in one buffer; traced training takes the same backward.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, NamedTuple, Optional, Sequence  # custom_op schemas: Optional is read by torch >= 2.5

import torch

from .._amp import compute_dtype
from .._dispatch import planned, register_backend
from .._qkv import split_qkv
from ..agent import _agents_like, _grid_maps, _grid_tokens, _window_membership, pool_agent_tokens
from ..depthwise_conv import _conv_weights, _launch as conv_launch, _sum_parts as sum_parts, conv_backward
from . import (INT32_MAX, broadcast_strides, check_count, check_tile_edge, device_reason, direct, dot_precision,
               item_extent, kernel_op, kernels_interpreted, needs_grad, next_pow2, on_device, override_knobs,
               sm_count, sm_shared_bytes, token_major, traced, triton_missing_reason)

__all__ = ["agent_attention_triton", "pooled_agent_attention_triton", "use_tiles", "SUPPORTED_DTYPES", "MAX_AGENTS",
           "MAX_HEAD_DIM"]

_OP = "agent_attention"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_AGENTS = 128   # every agent row of a (batch, head) lives in one tile
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
# Launch knobs. block_t: the token tile (keys in the aggregation, queries in the broadcast); None for each knob picks
# the defaults of _plan_for. Tests lower block_t to run the multi-tile loops on tiny shapes; sweeps set all.
_TILES: dict[str, int | None] = {"block_t": None, "num_warps": None, "num_stages": None, "query_splits": None,
                                 "backward_splits": None, "conv_tokens": None, "max_registers": None}


def use_tiles(block_t: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
              query_splits: int | None = None, backward_splits: int | None = None, conv_tokens: int | None = None,
              max_registers: int | None = None) -> contextlib.AbstractContextManager:
    """Temporarily override the launch knobs of both kernels (None keeps the current value).

    Args:
        block_t: token tile, a power of two >= 16 (default: by agent count and head width, see
            ``_default_tiles``; 16 for float32).
        num_warps, num_stages: Triton launch options (default: likewise; float32 8 warps, 2 stages forward and 1
            backward).
        query_splits: programs sharing one (batch, head)'s query tiles in the forward (default:
            ``default_query_splits``).
        backward_splits: programs sharing one (batch, head)'s query tiles, then its key tiles, in the backward; 1 is
            the single-launch backward (default: ``default_backward_splits``).
        conv_tokens: grid tokens a tile of the pooled single-launch backward's conv phase, a power of two (default:
            ``pooled_backward_tiles``).
        max_registers: a cap on each thread's registers in the pooled single-launch backward (Triton's
            ``maxnreg``; default: ``pooled_backward_tiles``, mostly none).
    """
    check_tile_edge("block_t", block_t)
    check_count("query_splits", query_splits)
    check_count("backward_splits", backward_splits)
    check_count("max_registers", max_registers)
    if conv_tokens is not None and (type(conv_tokens) is not int or conv_tokens < 1 or conv_tokens & (conv_tokens - 1)):
        raise ValueError(f"conv_tokens must be a power of two >= 1 or None, got {conv_tokens!r}")
    return override_knobs(_TILES, block_t=block_t, num_warps=num_warps, num_stages=num_stages,
                          query_splits=query_splits, backward_splits=backward_splits, conv_tokens=conv_tokens,
                          max_registers=max_registers)


class _Kernels(NamedTuple):
    forward: Callable
    backward: Callable
    pooled_forward: Callable
    backward_queries: Callable
    backward_keys: Callable
    pooling_grad: Callable
    pooled_backward: Callable
    grad_sum: Callable
    bias_sum: Callable


def _kernels_interpreted() -> bool:
    """Whether the kernels run (or, not yet built, will run) in Triton's CPU interpreter."""
    return kernels_interpreted(f"{__package__}.kernels.agent")


@functools.cache
def _kernels() -> _Kernels:
    """The forward and backward kernels (imports triton on first use)."""
    from .kernels import agent as kernels

    return _Kernels(kernels._forward_kernel, kernels._backward_kernel, kernels._pooled_forward_kernel,
                    kernels._backward_queries_kernel, kernels._backward_keys_kernel,
                    kernels.pooling_grad_kernel, kernels._pooled_backward_kernel, kernels._agent_grad_sum_kernel,
                    kernels.bias_grad_sum_kernel)


# ----------------------------------------------------------------------------------------------------------------
# launches



def _bias_strides(bias: torch.Tensor | None) -> tuple[int, ...]:
    """Strides of ``bias`` broadcast to 4 dims (0 along broadcast dims); zeros when there is no bias."""
    return (0, 0, 0, 0) if bias is None else broadcast_strides(bias.shape, bias.stride(), 4)


class _Sizes(NamedTuple):
    b: int
    heads: int
    n: int
    m: int
    a: int
    d: int
    dv: int

    @classmethod
    def of(cls, q: torch.Tensor, v: torch.Tensor, agent: torch.Tensor) -> "_Sizes":
        b, heads, n, d = q.shape
        return cls(b, heads, n, v.shape[2], agent.shape[2], d, v.shape[3])


class _Plan(NamedTuple):
    """What a launch needs besides the tensors, computed once per sizes and dtype (host time matters here)."""
    sizes: _Sizes
    runtime: tuple[int, ...]  # heads, N, M, A
    constexprs: dict
    options: dict  # num_warps, num_stages (and the pooled backward's maxnreg, where it caps registers)
    query_splits: int  # the grid's second axis (the backward's: 1 for the single-launch kernel)


def _plan(sizes: _Sizes, dtype: torch.dtype, backward: bool, sms: int | None, training: bool = False,
          sm_shared: int | None = None, pooled: bool = False) -> _Plan:
    """The launch plan; ``training``: a forward that will be differentiated (its own tiles and splits), or in a
    backward, :func:`pooled_agent_attention_triton`'s (its own splits: ``default_pooled_backward_splits``, and
    tiles: ``pooled_backward_tiles``, given ``sm_shared``, an SM's shared memory in bytes); ``pooled``: the pooled
    forward kernel's launch, in inference and in eager training calls (its own tiles, ``_default_tiles``)."""
    args = (sizes, dtype, backward, sms, training, _TILES["block_t"], _TILES["num_warps"], _TILES["num_stages"],
            _TILES["backward_splits" if backward else "query_splits"], _TILES["conv_tokens"], _TILES["max_registers"],
            sm_shared, pooled)
    if all(type(size) is int for size in sizes):
        return _plan_for(*args)
    return _plan_for.__wrapped__(*args)  # symbolic sizes (torch.compile, dynamic shapes) cannot be hashed


@functools.lru_cache(maxsize=256)
def _plan_for(sizes: _Sizes, dtype: torch.dtype, backward: bool, sms: int | None, training: bool,
              block_t: int | None, num_warps: int | None, num_stages: int | None, query_splits: int | None,
              conv_tokens: int | None = None, max_registers: int | None = None, sm_shared: int | None = None,
              pooled: bool = False) -> _Plan:
    s = sizes
    pooled_backward = backward and training  # the single-launch pooled backward's plan: its own tiles
    if pooled_backward:
        default_t, default_warps, default_stages, default_conv, default_registers = pooled_backward_tiles(
            s, dtype, sms, sm_shared)
    else:
        default_t, default_warps, default_stages = _default_tiles(s, dtype, backward, training, pooled)
    block_t = block_t or default_t
    constexprs = dict(D=s.d, DV=s.dv, BLOCK_D=max(16, next_pow2(s.d)), BLOCK_DV=max(16, next_pow2(s.dv)),
                      BLOCK_A=max(16, next_pow2(s.a)), BLOCK_T=block_t, PRECISION=dot_precision(dtype))
    options = dict(num_warps=num_warps or default_warps, num_stages=num_stages or default_stages)
    if pooled_backward:
        constexprs["CONV_T"] = conv_tokens or default_conv
        if max_registers or default_registers:
            options["maxnreg"] = max_registers or default_registers
    if backward:
        default = default_pooled_backward_splits if training else default_backward_splits
        splits = query_splits or default(s, sms, block_t)
    else:
        splits = query_splits or default_query_splits(s, sms, block_t, training)
    return _Plan(s, (s.heads, s.n, s.m, s.a), constexprs, options, splits)


def _pvt_like(s: _Sizes) -> bool:
    """At most 16 agents and heads 64 wide: Agent-PVT's stages 0 and 1 (global attention over 56x56 / 28x28 tokens
    through 3x3 / 4x4 agents), where the keys are as many as the queries."""
    return s.a <= 16 and max(s.d, s.dv) >= 64


def default_query_splits(s: _Sizes, sms: int | None, block_t: int, training: bool = False) -> int:
    """How many programs share one (batch, head)'s query tiles in the forward (each aggregates the agents again).

    One program per (batch, head) leaves SMs idle where batch * heads is below the SM count: Agent-PVT-T stage 0
    (one head) at batch 128 took 107.7 us on the H200's 132 SMs in one program per item, 86.4 us in three (bf16);
    where batch * heads filled the SMs (PVT-T stage 1, DeiT-T/S, Swin-T stages 1-3) every split was slower, the
    repeated aggregation costing more than the parallelism gave. So: about two programs per SM where one program per
    (batch, head) gives fewer than one, never more programs than query tiles; one split off CUDA (``sms`` None) and
    for symbolic sizes. A training forward at Agent-PVT's stages 0-1 (``_pvt_like``, keys as many as queries) takes
    about one program per SM instead: stage 0 at batch 64 (H200, bf16, its training tiles) took 51.7 us in two
    splits, 59.6 in three (where the rule above gives five).
    """
    pairs = s.b * s.heads
    if sms is None or type(pairs) is not int or pairs == 0 or pairs >= sms:
        return 1
    per_pair = sms // pairs if training and _pvt_like(s) else -(-2 * sms // pairs)
    return max(1, min(-(-s.n // block_t), per_pair))


def default_backward_splits(s: _Sizes, sms: int | None, block_t: int) -> int:
    """How many programs share one (batch, head)'s query tiles, then its key tiles, in the backward: about two
    programs per SM, never more than the query tiles (Agent-Swin-T stage 0, 192 (batch, head) pairs at batch 64: 2,
    which one program a pair leaves at 1.45 waves of 132 SMs). Unlike the forward's splits these repeat no work (the
    partial sums are the only extra), so they are taken above one wave too. One off CUDA (``sms`` None) and for
    symbolic sizes.

    Agent-PVT's stages 0-1 (``_pvt_like``) split only where one program a pair would leave over half the SMs idle,
    then into four programs an SM: at batch 64 on the H200 (bf16, kernel us with their (64, 4, 3) tiles) stage 0's 64
    pairs took 87.7 in eight splits, 95.4 in three; stage 1's 128 pairs 43.8 unsplit, 81.7 in three splits (the
    former rule, with the former (128, 8, 2) tiles)."""
    pairs = s.b * s.heads
    if sms is None or type(pairs) is not int or pairs == 0:
        return 1
    if _pvt_like(s):
        return max(1, min(-(-s.n // block_t), 4 * sms // pairs)) if 2 * pairs < sms else 1
    return max(1, min(-(-s.n // block_t), -(-2 * sms // pairs)))


def default_pooled_backward_splits(s: _Sizes, sms: int | None, block_t: int) -> int:
    """The backward splits of :func:`pooled_agent_attention_triton`'s training calls: one (the fused launch,
    :func:`_launch_pooled_backward`) wherever batch * heads fills the SMs, else as ``default_backward_splits``.
    Kernel us a backward at Agent-DeiT-T's blocks (192 (batch, head) pairs at batch 64 on the H200's 132 SMs, bf16,
    the bias gradients' sums included; two runs): the two split agent launches with the pooling's and conv's
    gradient kernels 149.5-149.7, the fused launch 114.3-114.7 (the kernel itself 78.8-79.0); at Agent-DeiT-S's (384
    pairs) 235.2-236.8 against 208.7-210.0 (156.7-158.0), where the single agent launch with the separate kernels
    had taken 205.7. The fused launch also halves the backward's host time (Agent-DeiT-T: 1,000 against 618 us on a
    busy host, 623 against 307 on a quieter one).
    """
    pairs = s.b * s.heads
    if sms is None or type(pairs) is not int or pairs >= sms:
        return 1
    return default_backward_splits(s, sms, block_t)


def _default_tiles(s: _Sizes, dtype: torch.dtype, backward: bool, training: bool = False,
                   pooled: bool = False) -> tuple[int, int, int]:
    """(block_t, num_warps, num_stages) of a launch when use_tiles sets none (``training``: a forward that will be
    differentiated; inference, compiled or not, keeps the batch-128 inference choices; ``pooled``: the pooled
    forward kernel's launch, with or without the statistics a training call stores)."""
    # float32 runs IEEE dots on CUDA cores, which hold whole tiles in registers: at Agent-DeiT-S (49 agents, head dim
    # 64) 64-token tiles spill 2.7 KB (forward, 4 warps) and 7 KB (backward, 8 warps) per thread on sm_90 (ptxas
    # -v, triton 3.6), 16-token tiles at 8 warps at most 8 bytes
    if dtype == torch.float32:
        return 16, 8, 1 if backward else 2
    if s.a > 64 or max(s.d, s.dv) > 64:  # wider agent or head tiles: 8 warps for their float32 accumulators (not swept)
        return 64, 8, 2
    # 16-bit: the best of 9 configurations per kernel at the released shapes (H200, bf16, batch 128; kernel us of
    # the chosen configuration against the former default (64, 4, 2)): DeiT-S (49 agents, d 64) backward (32, 4, 3)
    # 145 against 165; Swin-T s2 (49, d 32) forward (32, 4, 3) 101 against 171; Swin-T s0 / s1 (9 / 16, d 32)
    # forward (128, 4, 2) 111 against 147 and 49 against 53; PVT-T s0 (9, d 64) forward (128, 4, 2) 108 against
    # 149, backward (128, 8, 2) 184 against 226 (replaced by the batch-64 choice below; batch 128 not re-measured).
    # Where no row names a kernel, (64, 4, 2) was best or within 5%.
    # Agent-PVT-T's training step (batch 64, the best of 18 tilings with their splits, kernel us against the former
    # choice): stage 0 / 1 backward (64, 4, 3) 87.7 / 43.8 against (128, 8, 2)'s 127.8 / 81.7; training forward
    # (128, 4, 3) 51.7 / 21.9 against (128, 4, 2)'s 124.8 / 29.9; stages 2 / 3 (49 agents, d 64) training forward
    # (64, 4, 1) 29.4 / 15.3 against (64, 4, 2)'s 39.8 / 21.4.
    # Agent-Swin-T's training step (heads of 32, batch 64, the same sweep): stage 0 / 1 (9 / 16 agents) backward
    # (64, 4, 3) 138 / 68.2 against (64, 4, 2)'s 156 / 77.0, training forward (128, 4, 3) 69.3 / 31.5 against
    # (128, 4, 2)'s 93.8 / 34.7; stage 2 / 3 (49 agents) backward (64, 4, 1) 125 / 69.3 against (64, 4, 2)'s 175 /
    # 120; stage 3's training forward (49 tokens) (32, 4, 1) 34.4 against (32, 4, 3)'s 43.6, stage 2's (196) as before.
    # (The released Agent-Swin and Agent-CSwin run window or stripe attention in stage 3; its shape stands for
    # configurations with agent attention there, e.g. attn_type 'AAAA'.)
    few_agents, wide = s.a <= 16, max(s.d, s.dv) >= 64
    if backward:
        if few_agents:
            return 64, 4, 3
        return (32, 4, 3) if wide else (64, 4, 1)
    if few_agents:
        return (128, 4, 3) if training else (128, 4, 2)
    if wide:
        if pooled:
            # The pooled forward (pooling, both attentions and the conv in one program a (batch, head)): 16-token
            # tiles keep more programs an SM. Inference, the best of 72 tilings (block_t 16-128, 2-8 warps, 1-3
            # stages, 1-2 splits; H200, bf16, batch 128, kernel us against (64, 4, 2)): Agent-DeiT-T 60.0 against
            # 89.4, Agent-DeiT-S 119.1 against 147.2, Agent-PVT-T stage 2 104.6 against 139.5; stage 3 (49 tokens)
            # 56.3 against 68.5 (the best there, (16, 2, 2), 51.1). An eager training call's (storing the agents
            # and statistics; batch 64, 6 tilings): 47.0 against 50.5, 61.8 against 96.9, 61.4 against 82.6 and 33.9
            # against 37.0 (the best at DeiT-T and PVT-T stage 3, (64, 4, 1), 39.6 and 28.2).
            return 16, 4, 3
        return (64, 4, 1) if training else (64, 4, 2)
    return (32, 4, 1) if training and s.n <= 64 else (32, 4, 3)


# Shared memory an SM needs for three programs of the register-capped tiles below (64 KB each at Agent-DeiT-S's
# block, plus the 1 KB each resident block reserves): the H200's 228 KB holds them, an A100's 164 KB does not.
_THREE_CAPPED_BYTES = 3 * 65 * 1024


def pooled_backward_tiles(s: _Sizes, dtype: torch.dtype, sms: int | None, sm_shared: int | None = None
                          ) -> tuple[int, int, int, int, int | None]:
    """(block_t, num_warps, num_stages, conv tokens, register cap or None) of the single-launch pooled backward
    (``_pooled_backward_kernel``): the agent backward's tiles (``_default_tiles``) and 16-token conv tiles (32 made
    Agent-DeiT-T's kernel slower), except where three programs an SM finish in one wave what two an SM take two for.

    At 64-wide agent, head and value tiles in 16 bits those tiles take 255 registers and 80 KB of shared memory a
    program (ptxas -v, sm_90, triton 3.6): two programs an SM. Where batch * heads is above two programs an SM and at
    most three, the second wave leaves a third of the SMs or more idle; two stages (64 KB), 8-token conv tiles and a
    168-register cap (about 0.5 KB spilled a thread) fit three an SM where its shared memory (``sm_shared``, None
    before torch 2.6: the default) holds them (``_THREE_CAPPED_BYTES``). H200 (132 SMs), bf16, kernel us a call, these
    tiles against the default (two runs, the same gradients): 384 (batch, head) pairs (Agent-DeiT-S at batch 64,
    Agent-DeiT-T at 128) 131.1-131.8 / 130.4-130.8 against 154.3-155.3 / 154.4-155.0. Where two an SM take one wave,
    or three would take two, the default was faster (192 pairs 80.7 against 96.5; 768 pairs 237-238 against
    255-258); a 168-register cap at three stages (still two an SM by shared memory) was slower everywhere."""
    block_t, warps, stages = _default_tiles(s, dtype, True)
    pairs = s.b * s.heads
    if (sms is not None and type(pairs) is int and 2 * sms < pairs <= 3 * sms and sm_shared is not None
            and sm_shared >= _THREE_CAPPED_BYTES and dtype in (torch.float16, torch.bfloat16)
            and all(32 < size <= 64 for size in (s.a, s.d, s.dv))):
        return 32, 4, 2, 8, 168
    return block_t, warps, stages, 16, None


def _launch_forward(q, k, v, agent, agent_bias, query_bias, scale, launch=direct, stats: bool = True,
                    training: bool = False):
    """The output and, with ``stats``, what the backward needs (agent values and the aggregation's log-sum-exp);
    without, those two are None and neither allocated nor written (inference). ``training``: the call will be
    differentiated (the training forward's tiles, ``_default_tiles``)."""
    plan = _plan(_Sizes.of(q, v, agent), q.dtype, False, sm_count(q) if q.is_cuda else None, training=training)
    s = plan.sizes
    out = token_major(s.b, s.heads, s.n, s.dv, q)
    agent_v = lse = None
    if stats:
        agent_v = torch.empty((s.b, s.heads, s.a, s.dv), device=q.device, dtype=q.dtype)
        lse = torch.empty((s.b, s.heads, s.a), device=q.device, dtype=torch.float32)
    if s.b * s.heads == 0 or s.n == 0:
        return out, agent_v, lse
    launch(_kernels().forward)[(s.b * s.heads, plan.query_splits)](
        q, k, v, agent, agent_bias if agent_bias is not None else q, query_bias if query_bias is not None else q,
        out, *((agent_v, lse) if stats else (out, out)), *q.stride(), *k.stride(), *v.stride(),
        *agent.stride(), *_bias_strides(agent_bias), *_bias_strides(query_bias), *plan.runtime, scale * _LOG2E,
        HAS_AB=agent_bias is not None, HAS_QB=query_bias is not None, STATS=stats, **plan.options,
        **plan.constexprs)
    return out, agent_v, lse


def _launch_training_forward(q, k, v, agent, agent_bias, query_bias, scale):
    """:func:`_launch_forward` of a call that will be differentiated, with flat positional arguments (a call
    plan's): (out, agent_v, lse)."""
    return _launch_forward(q, k, v, agent, agent_bias, query_bias, scale, training=True)


def _launch_backward(grad_out, q, k, v, agent, agent_bias, query_bias, out, agent_v, lse, scale,
                     agent_bias_grad: bool, query_bias_grad: bool, launch=direct, into=None):
    """The gradients (module docstring); ``out`` None recomputes the forward's output tiles (where the stored output
    holds another term: :func:`pooled_agent_attention_triton`'s conv). ``into``: (dq, dk, dv) (B, heads, n, d) views
    to write them into, each with its heads' channels contiguous in a token (a packed qkv projection's gradient),
    else they are allocated token-major."""
    plan = _plan(_Sizes.of(q, v, agent), q.dtype, True, sm_count(q) if q.is_cuda else None)
    s = plan.sizes
    dq, dk, dv = into if into is not None else (token_major(s.b, s.heads, s.n, s.d, q),
                                                token_major(s.b, s.heads, s.m, s.d, k),
                                                token_major(s.b, s.heads, s.m, s.dv, v))
    da = token_major(s.b, s.heads, s.a, s.d, agent)
    dab, dqb = _bias_grad_buffers(s, agent_bias_grad, query_bias_grad, q)
    rows = _bias_grad_rows(s.m), _bias_grad_rows(s.a)
    if s.b * s.heads == 0 or s.n == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), da.zero_(), dab.zero_(), dqb.zero_()
    biases = (agent_bias if agent_bias is not None else q, query_bias if query_bias is not None else q)
    flags = dict(AB_GRAD=agent_bias_grad, QB_GRAD=query_bias_grad, **plan.options, **plan.constexprs)
    if plan.query_splits == 1:
        launch(_kernels().backward)[(s.b * s.heads,)](
            grad_out, q, k, v, agent, *biases, q if out is None else out, agent_v, lse, dq, dk, dv, da, dab, dqb,
            *grad_out.stride(), *q.stride(), *k.stride(), *v.stride(), *agent.stride(),
            *_bias_strides(agent_bias), *_bias_strides(query_bias), *_token_strides(dq), *_token_strides(dk),
            *_token_strides(dv), *rows, *plan.runtime, scale, scale * _LOG2E,
            HAS_AB=agent_bias is not None, HAS_QB=query_bias is not None, RECOMPUTE_OUT=out is None, **flags)
        return dq, dk, dv, da, dab, dqb
    grid = (s.b * s.heads, plan.query_splits)
    # float32 partials (splits, batch * heads, A, d): d(agent) of the query tiles, of the key tiles, and d(agent_v);
    # three buffers, no views (a traced graph functionalizes each kernel's writes)
    parts_q, parts_k = (torch.empty((*grid[::-1], s.a, s.d), device=q.device, dtype=torch.float32) for _ in range(2))
    parts_v = torch.empty((*grid[::-1], s.a, s.dv), device=q.device, dtype=torch.float32)
    flags.pop("AB_GRAD"), flags.pop("QB_GRAD")
    launch(_kernels().backward_queries)[grid](
        grad_out, q, agent, biases[1], q if out is None else out, agent_v, dq, dqb, parts_q, parts_v,
        *grad_out.stride(), *q.stride(), *agent.stride(), *_bias_strides(query_bias), *_token_strides(dq), rows[1],
        s.heads, s.n, s.a, scale, scale * _LOG2E, HAS_QB=query_bias is not None, QB_GRAD=query_bias_grad,
        RECOMPUTE_OUT=out is None, **flags)
    launch(_kernels().backward_keys)[grid](
        k, v, agent, biases[0], agent_v, lse, parts_v, dk, dv, dab, parts_k, *k.stride(), *v.stride(),
        *agent.stride(), *_bias_strides(agent_bias), *_token_strides(dk), *_token_strides(dv), rows[0], s.heads,
        s.m, s.a, plan.query_splits, scale, scale * _LOG2E, HAS_AB=agent_bias is not None, AB_GRAD=agent_bias_grad,
        **flags)
    # the splits' d(agent) partials, each summed in split order, then scaled in float32 and rounded once into da's
    # dtype, by a kernel: three ATen reductions would launch as many kernels, and keep the call from a call plan
    launch(_kernels().grad_sum)[(s.b * s.heads,)](
        parts_q, parts_k, da, *da.stride(), s.heads, s.a, plan.query_splits, scale, D=s.d,
        BLOCK_A=plan.constexprs["BLOCK_A"], BLOCK_D=plan.constexprs["BLOCK_D"], num_warps=4)
    return dq, dk, dv, da, dab, dqb


def _bias_grad_rows(n: int) -> int:
    """The row length of a bias logit gradient buffer holding ``n`` logits a row: a multiple of 16 (see the kernels'
    note on padded rows)."""
    return -(-n // 16) * 16


def _bias_grad_buffers(s: _Sizes, agent_bias_grad: bool, query_bias_grad: bool, like: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 per-(batch, head) logit gradient buffers the backward kernels write, rows padded (the pads zero):
    the agent bias's (B, heads, A, _bias_grad_rows(M)) and the query bias's (B, heads, N, _bias_grad_rows(A)), each
    empty (0,) unless asked for. :func:`_bias_grad` takes a bias's gradient from its buffer."""
    shapes = ((s.b, s.heads, s.a, _bias_grad_rows(s.m)) if agent_bias_grad else (0,),
              (s.b, s.heads, s.n, _bias_grad_rows(s.a)) if query_bias_grad else (0,))
    return tuple(like.new_empty(shape, dtype=torch.float32) for shape in shapes)


def _token_strides(t: torch.Tensor) -> tuple[int, int]:
    """The batch and token strides of a (B, heads, n, d) gradient the backward kernel writes (its heads' channels
    contiguous within a token: head stride d, channel stride 1)."""
    return t.stride(0), t.stride(2)


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops (for torch.compile: see ops.triton.kernel_op) and autograd


def _forward_fake(q, k, v, agent, agent_bias, query_bias, scale, training=False):
    s = _Sizes.of(q, v, agent)
    return (token_major(s.b, s.heads, s.n, s.dv, q), q.new_empty((s.b, s.heads, s.a, s.dv)),
            q.new_empty((s.b, s.heads, s.a), dtype=torch.float32))


@kernel_op("zoo::agent_attention_fwd", fake=_forward_fake)
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agent: torch.Tensor,
                agent_bias: torch.Tensor | None, query_bias: torch.Tensor | None,
                scale: float, training: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused agent attention. Returns the (B, heads, N, d_v) output (token-major memory), the (B, heads, A, d_v)
    agent values and the aggregation's float32 base-2 log-sum-exp (B, heads, A) for the backward. ``training``: the
    graph differentiates it (the launch takes the training forward's tiles)."""
    with on_device(q):
        return _launch_forward(q, k, v, agent, agent_bias, query_bias, scale, traced, training=training)


def _backward_fake(grad_out, q, k, v, agent, agent_bias, query_bias, out, agent_v, lse, scale, agent_bias_grad,
      query_bias_grad):
    s = _Sizes.of(q, v, agent)
    return (token_major(s.b, s.heads, s.n, s.d, q), token_major(s.b, s.heads, s.m, s.d, k),
            token_major(s.b, s.heads, s.m, s.dv, v), token_major(s.b, s.heads, s.a, s.d, agent),
            *_bias_grad_buffers(s, agent_bias_grad, query_bias_grad, q))


@kernel_op("zoo::agent_attention_bwd", fake=_backward_fake)
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agent: torch.Tensor,
                 agent_bias: torch.Tensor | None, query_bias: torch.Tensor | None, out: torch.Tensor,
                 agent_v: torch.Tensor, lse: torch.Tensor, scale: float,
                 agent_bias_grad: bool, query_bias_grad: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic fused backward: dq, dk, dv, d(agent) (token-major memory) and the float32 per-(batch, head)
    logit gradients of the biases in their row-padded buffers (:func:`_bias_grad_buffers`; empty when not asked
    for)."""
    with on_device(q):
        return _launch_backward(grad_out, q, k, v, agent, agent_bias, query_bias, out, agent_v, lse, scale,
                                agent_bias_grad, query_bias_grad, traced)


def _bias_grad(grad: torch.Tensor, bias: torch.Tensor | None, wanted: bool, width: int) -> torch.Tensor | None:
    """A bias's gradient from its per-(batch, head) logit gradient buffer (:func:`_bias_grad_buffers`; ``width``:
    the logits a row, before the padding), summed to the bias's (broadcast) shape, in its dtype."""
    if not wanted:
        return None
    return grad.narrow(-1, 0, width).sum_to_size(bias.shape).to(bias.dtype)


_BIAS_SUM_ROWS, _BIAS_SUM_COLS = 16, 128  # not tuned: the sum reads B x ROWS x W floats once
# Programs a SM the batch sum aims at: one program a (16, 128) tile looping over the whole batch left Agent-PVT-T's
# and Agent-Swin-T's first stages 2-25 programs (35-37 us a call for some 7 MB; H100, batch 64, BENCHMARKS.md
# seventy-eighth and seventy-ninth sessions), so the batch is split over programs when the tiles do not fill the GPU
# and the splits' float32 partial sums are added in a second launch: 0.57 -> 0.29 ms a step for Agent-PVT-T's 16 sums,
# 1.18 -> 0.60 ms for Agent-PVT-S's 32 (kernel time, H100, bf16, batch 64; BENCHMARKS.md eightieth session).
_BIAS_SUM_PROGRAMS_PER_SM = 4


def _summed_bias_grad(grad: torch.Tensor, bias: torch.Tensor | None, wanted: bool, width: int,
                      launch=direct) -> torch.Tensor | None:
    """:func:`_bias_grad` for eager backward bodies (call plans: allocations and launches only): a contiguous
    (1, heads, R, ``width``) bias, as the Agent models' bias maps make, gets its batch sum from one launch of
    ``bias_grad_sum_kernel`` (in batch order) instead of ATen's sum; other shapes take :func:`_bias_grad`."""
    if not wanted:
        return None
    if not (bias.dim() == 4 and bias.shape[0] == 1 and bias.shape[1:] == grad.shape[1:3] + (width,)
            and bias.is_contiguous() and grad.is_contiguous()):
        return _bias_grad(grad, bias, wanted, width)
    out = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)
    rows = bias.shape[1] * bias.shape[2]
    if not out.numel():
        return out
    batch = grad.shape[0]
    tiles = (-(-rows // _BIAS_SUM_ROWS), -(-width // _BIAS_SUM_COLS))
    splits = _bias_sum_splits(batch, tiles[0] * tiles[1], grad)
    per_split = -(-batch // splits)
    splits = -(-batch // per_split)
    kernel = _kernels().bias_sum
    if splits == 1:
        launch(kernel)[(*tiles, 1)](grad, out, batch, rows, width, grad.stride(0), grad.stride(2), batch,
                                    BLOCK_R=_BIAS_SUM_ROWS, BLOCK_W=_BIAS_SUM_COLS, num_warps=4)
        return out
    parts = torch.empty((splits, rows, width), dtype=torch.float32, device=grad.device)
    launch(kernel)[(*tiles, splits)](grad, parts, batch, rows, width, grad.stride(0), grad.stride(2), per_split,
                                     BLOCK_R=_BIAS_SUM_ROWS, BLOCK_W=_BIAS_SUM_COLS, num_warps=4)
    launch(kernel)[(*tiles, 1)](parts, out, splits, rows, width, rows * width, width, splits,
                                BLOCK_R=_BIAS_SUM_ROWS, BLOCK_W=_BIAS_SUM_COLS, num_warps=4)
    return out


def _bias_sum_splits(batch: int, tiles: int, like: torch.Tensor) -> int:
    """How many programs share each tile's batch in :func:`_summed_bias_grad`: enough for
    ``_BIAS_SUM_PROGRAMS_PER_SM`` programs a SM (two on CPU, so the interpreter runs both launches), at most one a
    batch item."""
    programs = _BIAS_SUM_PROGRAMS_PER_SM * sm_count(like) if like.is_cuda else 2 * tiles
    return max(1, min(batch, programs // tiles))


def _launch_backward_summed(grad_out, q, k, v, agent, agent_bias, query_bias, out, agent_v, lse, scale,
                            agent_bias_grad, query_bias_grad):
    """The eager node's backward body: :func:`_launch_backward`, the biases' gradients summed to their shapes
    (:func:`_bias_grads`)."""
    dq, dk, dv, da, dab, dqb = _launch_backward(grad_out, q, k, v, agent, agent_bias, query_bias, out, agent_v, lse,
                                                scale, agent_bias_grad, query_bias_grad)
    return (dq, dk, dv, da, *_bias_grads(dab, dqb, agent_bias, query_bias, (agent_bias_grad, query_bias_grad),
                                         k.shape[2], agent.shape[2]))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, agent, agent_bias, query_bias, scale = inputs[:7]
    out, agent_v, lse = output
    ctx.save_for_backward(q, k, v, agent, agent_bias, query_bias, out, agent_v, lse)
    ctx.scale = scale
    ctx.bias_grads = (agent_bias is not None and ctx.needs_input_grad[4],
                      query_bias is not None and ctx.needs_input_grad[5])


def _backward(ctx, grad_out, *_unused):
    q, k, v, agent, agent_bias, query_bias, out, agent_v, lse = ctx.saved_tensors
    dq, dk, dv, da, dab, dqb = _backward_op(grad_out, q, k, v, agent, agent_bias, query_bias, out, agent_v, lse,
                                            ctx.scale, *ctx.bias_grads)
    return (dq, dk, dv, da, _bias_grad(dab, agent_bias, ctx.bias_grads[0], k.shape[2]),
            _bias_grad(dqb, query_bias, ctx.bias_grads[1], agent.shape[2]), None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAgent(torch.autograd.Function):
    """The same kernels without the custom-op layer, for eager calls (``torch.library`` dispatch costs host time)."""

    @staticmethod
    def forward(ctx, q, k, v, agent, agent_bias, query_bias, scale):
        with on_device(q):
            out, agent_v, lse = planned("agent_attention.forward", _launch_training_forward, q, k, v, agent,
                                        agent_bias, query_bias, scale)
        _setup_context(ctx, (q, k, v, agent, agent_bias, query_bias, scale), (out, agent_v, lse))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, agent, agent_bias, query_bias, out, agent_v, lse = ctx.saved_tensors
        with on_device(q):
            dq, dk, dv, da, dab, dqb = planned("agent_attention.backward", _launch_backward_summed, grad_out, q, k, v,
                                               agent, agent_bias, query_bias, out, agent_v, lse, ctx.scale,
                                               *ctx.bias_grads)
        return dq, dk, dv, da, dab, dqb, None


# ----------------------------------------------------------------------------------------------------------------
# the backend


def agent_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agent: torch.Tensor, *, scale: float,
                           agent_bias: torch.Tensor | None = None, query_bias: torch.Tensor | None = None,
                           dropout_p: float = 0.0) -> torch.Tensor:
    """Agent attention with the fused Triton kernels (the arguments of :func:`zoo.ops.agent_attention`).

    Args:
        q: (B, heads, N, d); k: (B, heads, M, d); v: (B, heads, M, d_v); agent: (B, heads, A, d), any strides,
            one dtype among float32/float16/bfloat16, on CUDA (or CPU under ``TRITON_INTERPRET=1``, not bf16).
        agent_bias, query_bias: broadcastable to (B, heads, A, M) / (B, heads, N, A), any float dtype.
        dropout_p: must be 0 (dropout is not fused; dispatch sends such calls elsewhere).

    Returns:
        (B, heads, N, d_v) in q's dtype, a view of token-major (B, N, heads, d_v) memory.
    """
    if dropout_p:
        raise ValueError(f"agent_attention triton backend: dropout_p must be 0, got {dropout_p}")
    if torch.compiler.is_compiling():
        training = needs_grad(q, k, v, agent, agent_bias, query_bias)
        return _forward_op(q, k, v, agent, agent_bias, query_bias, scale, training)[0]
    if not needs_grad(q, k, v, agent, agent_bias, query_bias):  # inference: no autograd node, no saved statistics
        with on_device(q):
            return _launch_forward(q, k, v, agent, agent_bias, query_bias, scale, stats=False)[0]
    return _EagerAgent.apply(q, k, v, agent, agent_bias, query_bias, scale)


def _supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agent: torch.Tensor, *, scale: float | None = None,
              agent_bias: torch.Tensor | None = None, query_bias: torch.Tensor | None = None,
              dropout_p: float = 0.0) -> str | None:
    """Why the triton backend cannot serve these arguments, or None."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype}; needs float32/float16/bfloat16"
    if dropout_p:
        return f"dropout_p={dropout_p} (attention dropout is not fused)"
    tensors = [t for t in (q, k, v, agent, agent_bias, query_bias) if t is not None]
    if len({t.device for t in tensors}) > 1:
        return "inputs on different devices"
    if agent.shape[2] > MAX_AGENTS:
        return f"{agent.shape[2]} agents; the kernels hold at most {MAX_AGENTS} in one tile"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims q/k {q.shape[-1]}, v {v.shape[-1]}; the kernels take at most {MAX_HEAD_DIM}"
    b, heads, n, _ = q.shape
    sizes = (b * n * heads * max(q.shape[-1], v.shape[-1]), b * heads * agent.shape[2] * max(n, k.shape[2]))
    if any(item_extent(t) > INT32_MAX for t in tensors[:4]) or max(sizes) > INT32_MAX:
        return "tensors too large for the kernels' 32-bit in-item offsets"
    return device_reason(q.device, (q.dtype,), _kernels_interpreted())


register_backend(_OP, "triton", agent_attention_triton, supports=_supports, priority=20,
                 available=triton_missing_reason)


# ----------------------------------------------------------------------------------------------------------------
# pooled_agent_attention: agents pooled from the queries and the values' depthwise conv in the same launch

_POOLED_OP = "pooled_agent_attention"


def _conv_in(weight: torch.Tensor | None, bias: torch.Tensor | None, compute: torch.dtype):
    """The conv's weight and bias in the compute dtype as the depthwise-conv kernel's caller makes them, or None."""
    return (None, None) if weight is None else _conv_weights(weight, bias, compute)


def _launch_pooled(q, k, v, weight, bias, agent_bias, query_bias, grid, agent_grid, prefix, scale, launch=direct,
                   stats: bool = False) -> tuple[torch.Tensor, ...]:
    """(out,) or, with ``stats``, (out, agents (B, heads, A, d), agent values (B, heads, A, d_v), the aggregation's
    float32 base-2 log-sum-exp (B, heads, A)) for the backward."""
    b, heads, n, d = q.shape
    a, dv = agent_grid[0] * agent_grid[1], v.shape[3]
    plan = _plan(_Sizes(b, heads, n, n, a, d, dv), q.dtype, False, sm_count(q) if q.is_cuda else None, pooled=True)
    out = token_major(b, heads, n, dv, q)
    saved = ()
    if stats:
        saved = (q.new_empty((b, heads, a, d)), q.new_empty((b, heads, a, dv)),
                 q.new_empty((b, heads, a), dtype=torch.float32))
    if b * heads == 0 or n == 0:
        return (out, *saved)
    w = weight if weight is not None else q
    equal = grid[0] % agent_grid[0] == 0 and grid[1] % agent_grid[1] == 0
    with on_device(q):
        launch(_kernels().pooled_forward)[(b * heads, plan.query_splits)](
            q, k, v, agent_bias if agent_bias is not None else q, query_bias if query_bias is not None else q, w,
            bias if bias is not None else w, out, *(saved or (out, out, out)), *q.stride(), *k.stride(), *v.stride(),
            *_bias_strides(agent_bias), *_bias_strides(query_bias),
            *((w.stride(0), w.stride(3)) if weight is not None else (0, 0)), heads, n, a, prefix, *grid, *agent_grid,
            scale * _LOG2E, HAS_AB=agent_bias is not None,
            HAS_QB=query_bias is not None, CONV=weight is not None, HAS_CB=bias is not None, ROUND_SUMS=not equal,
            STATS=stats, **plan.options, **plan.constexprs)
    return (out, *saved)


def pooled_agent_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  conv_weight: torch.Tensor | None, conv_bias: torch.Tensor | None, *,
                                  grid: tuple[int, int], agent_grid: tuple[int, int], prefix: int, scale: float,
                                  agent_bias: torch.Tensor | None = None, query_bias: torch.Tensor | None = None,
                                  dropout_p: float = 0.0, qkv: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`zoo.ops.pooled_agent_attention` in one kernel launch (eager calls; the arguments are that function's),
    one autograd node in training; in a traced training graph (given ``qkv``) the packed op :func:`_packed_forward_op`.
    Returns (B, heads, N, d_v), a view of token-major (B, N, heads, d_v) memory."""
    if torch.compiler.is_compiling():
        b, heads, n, d = q.shape
        weight, bias = _conv_in(conv_weight, conv_bias, compute_dtype(v))  # (autograd takes the casts' gradients)
        # the pooling outside the op, where inductor fuses it (the op's backward adds its gradient into dq)
        agents = pool_agent_tokens(_grid_tokens(q, prefix), grid, agent_grid)
        out = _packed_forward_op(qkv, agents, agent_bias, query_bias, weight, bias, heads, list(grid),
                                 list(agent_grid), prefix, scale)[0]
        return out.view(b, n, heads, d).transpose(1, 2)
    if needs_grad(q, k, v, conv_weight, conv_bias, agent_bias, query_bias):
        if _same_autograd_base(qkv, q, k, v):
            return _PooledQkvAttention.apply(qkv, conv_weight, conv_bias, agent_bias, query_bias, (q, k, v), grid,
                                             agent_grid, prefix, scale)
        return _PooledAgentAttention.apply(q, k, v, conv_weight, conv_bias, agent_bias, query_bias, grid, agent_grid,
                                           prefix, scale)
    weight, bias = _conv_in(conv_weight, conv_bias, compute_dtype(v))
    return _launch_pooled(q, k, v, weight, bias, agent_bias, query_bias, grid, agent_grid, prefix, scale)[0]


def _add_pooling_grad(rows: torch.Tensor, d_agents: torch.Tensor, grid: tuple[int, int],
                      agent_grid: tuple[int, int], launch=direct) -> None:
    """Add the agents' gradient (B, heads, A, d) to the grid queries' gradient ``rows`` (B, H * W, heads * d, a
    view with unit channel stride, in place) through the pooling, as autograd differentiates
    :func:`~zoo.ops.agent.pool_agent_tokens` (one launch of ``pooling_grad_kernel``: each grid token gathers its
    windows' shares)."""
    b, heads, a, d = d_agents.shape
    (h, w), (ga, gb) = grid, agent_grid
    d_agents = d_agents.transpose(1, 2).reshape(b, a, heads * d)
    if rows.numel() == 0:
        return
    block_t, block_c = 32, min(64, max(16, next_pow2(heads * d)))
    kernel_grid = (b * -(-(h * w) // block_t), -(-(heads * d) // block_c))
    launch(_kernels().pooling_grad)[kernel_grid](
        d_agents, rows, h, w, heads * d, ga, gb, d_agents.stride(0), d_agents.stride(1), rows.stride(0),
        rows.stride(1), SPAN_H=_window_span(h, ga), SPAN_W=_window_span(w, gb), BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=4)


@functools.lru_cache(maxsize=None)
def _window_span(n: int, g: int) -> int:
    """The most adaptive-pooling windows (of g over n positions) any one position lies in."""
    return int(_window_membership(n, g, torch.device("cpu")).sum(0).max())


def _same_autograd_base(qkv: torch.Tensor | None, *views: torch.Tensor) -> bool:
    """Whether ``views`` (q, k, v) come from ``qkv`` through views only, so a gradient for qkv reaches them: the
    caller checked that they lie in qkv's memory, but a detached qkv would share that memory and drop their
    gradients."""
    if qkv is None:
        return False
    base = qkv if qkv._base is None else qkv._base
    return all(t._base is base for t in views)


def _launch_pooled_stats(q, k, v, weight, bias, agent_bias, query_bias, grid, agent_grid, prefix, scale):
    """:func:`_launch_pooled` keeping the statistics for the backward, its arguments positional (a call plan's)."""
    return _launch_pooled(q, k, v, weight, bias, agent_bias, query_bias, grid, agent_grid, prefix, scale, stats=True)


def _pooled_forward(ctx, q, k, v, weight, bias, agent_bias, query_bias, grid, agent_grid, prefix, scale):
    """The fused launch keeping the agents and the aggregation's statistics, its layout recorded on ``ctx`` (the
    caller saves the tensors): returns (output, (the conv's weight in the compute dtype or None, agents, agent
    values, log-sum-exp))."""
    w, cb = _conv_in(weight, bias, compute_dtype(v))
    out, agents, agent_v, lse = planned("pooled_agent_attention.forward", _launch_pooled_stats, q, k, v, w, cb,
                                        agent_bias, query_bias, grid, agent_grid, prefix, scale)
    ctx.layout = (grid, agent_grid, prefix, scale, bias is not None)
    ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
    return out, (w, agents, agent_v, lse)


def _grad_flags(ctx, agent_bias, query_bias, bias_grads: tuple[bool, bool], param_grads: tuple[bool, bool]
                ) -> tuple[list, tuple[bool, bool], tuple]:
    """(layout: grid, agent_grid, prefix, scale; which bias logit gradients to compute; the conv weight's and bias's
    gradient dtypes, None where not wanted) of an eager node's backward, from what :func:`_pooled_forward` recorded on
    ``ctx``; ``bias_grads`` / ``param_grads``: whether the agent and query biases / the conv's weight and bias want
    gradients."""
    *layout, has_bias = ctx.layout
    flags = (agent_bias is not None and bias_grads[0], query_bias is not None and bias_grads[1])
    wants_weight = param_grads[0] or (has_bias and param_grads[1])
    dtypes = (ctx.param_dtypes[0] if wants_weight else None,
              ctx.param_dtypes[1] if wants_weight and param_grads[1] else None)
    return layout, flags, dtypes


def _bias_grads(dab, dqb, agent_bias, query_bias, flags: tuple[bool, bool], m: int, a: int) -> tuple:
    """The biases' gradients (or None) from their logit gradient buffers, in a backward body
    (:func:`_summed_bias_grad`); ``m`` keys and ``a`` agents a row."""
    return _summed_bias_grad(dab, agent_bias, flags[0], m), _summed_bias_grad(dqb, query_bias, flags[1], a)


def _node_grads(ctx, grad, q, k, v, w, agents, agent_bias, query_bias, agent_v, lse, bias_grads: tuple[bool, bool],
                param_grads: tuple[bool, bool], input_grad: bool):
    """The eager node's gradients (dq, dk, dv, d_weight, d_conv_bias, d_agent_bias, d_query_bias) from its output's
    ``grad`` (B, heads, N, d_v) through :func:`_pooled_grads` (its launches replayed from a call plan where plans are
    on), with the layout and dtypes :func:`_pooled_forward` recorded on ``ctx`` (see :func:`_grad_flags`)."""
    layout, flags, dtypes = _grad_flags(ctx, agent_bias, query_bias, bias_grads, param_grads)
    dq, dk, dv, dw, db, dab, dqb = planned(
        "pooled_agent_attention.backward", _planned_grads, grad, q, k, v, w, agents, agent_bias, query_bias, agent_v,
        lse, *layout, *flags, *dtypes, input_grad)
    return dq, dk, dv, dw, db, dab, dqb


def _planned_grads(grad, q, k, v, w, agents, agent_bias, query_bias, agent_v, lse, grid, agent_grid, prefix, scale,
                   agent_bias_grad, query_bias_grad, weight_dtype, bias_dtype, input_grad) -> tuple:
    """:func:`_pooled_grads` with flat positional arguments (a call plan's), the biases' gradients summed to their
    shapes (:func:`_bias_grads`)."""
    *grads, dab, dqb = _pooled_grads(grad, q, k, v, w, agents, agent_bias, query_bias, agent_v, lse,
                                     (grid, agent_grid, prefix, scale), (agent_bias_grad, query_bias_grad),
                                     (weight_dtype, bias_dtype), input_grad)
    return (*grads, *_bias_grads(dab, dqb, agent_bias, query_bias, (agent_bias_grad, query_bias_grad), q.shape[2],
                                 agents.shape[2]))


def _planned_qkv_grads(grad, qkv, w, agents, agent_bias, query_bias, agent_v, lse, heads, grid, agent_grid, prefix,
                       scale, agent_bias_grad, query_bias_grad, weight_dtype, bias_dtype) -> tuple:
    """:func:`_pooled_grads` of q, k and v as views of ``qkv`` (B, N, 3 * heads * d), with flat positional arguments
    (a call plan's): (qkv's gradient, d_weight, d_conv_bias, the biases' gradients)."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _, _, _, dw, db, dab, dqb = _pooled_grads(grad, *split_qkv(qkv, heads), w, agents, agent_bias, query_bias, agent_v,
                                              lse, (grid, agent_grid, prefix, scale),
                                              (agent_bias_grad, query_bias_grad), (weight_dtype, bias_dtype), True,
                                              split_qkv(dqkv, heads))
    return (dqkv, dw, db, *_bias_grads(dab, dqb, agent_bias, query_bias, (agent_bias_grad, query_bias_grad),
                                       qkv.shape[1], agents.shape[2]))


def _pooled_grads(grad, q, k, v, w, agents, agent_bias, query_bias, agent_v, lse, layout: tuple,
                  bias_grads: tuple[bool, bool], weight_dtypes: tuple, input_grad: bool = True, into=None):
    """The fused call's gradients from its output's ``grad`` (B, heads, N, d_v), for the eager node and the traced
    packed op: dq, dk, dv (written into ``into``'s views when given), the conv's weight and bias gradients
    (``weight_dtypes``: their dtypes, None where not wanted) and the float32 per-(batch, head) logit gradients of the
    biases (empty unless ``bias_grads`` asks for them). ``layout``: (grid, agent_grid, prefix, scale). Where batch *
    heads fills the GPU (``default_pooled_backward_splits``) one launch (:func:`_launch_pooled_backward`); else the
    agent backward kernels (the attention's output tiles recomputed, since the stored output includes the conv), the
    pooling's gradient added into dq and the conv's (:func:`zoo.ops.depthwise_conv.conv_backward`, its input
    gradient added into dv when ``input_grad``)."""
    grid, agent_grid, prefix, scale = layout
    sizes = _Sizes.of(q, v, agents)
    plan = _plan(sizes, q.dtype, True, sm_count(q) if q.is_cuda else None, training=True,
                 sm_shared=sm_shared_bytes(q) if q.is_cuda else None)
    with on_device(q):
        if plan.query_splits == 1 and sizes.b * sizes.heads and sizes.n:
            return _launch_pooled_backward(plan, grad, q, k, v, w, agents, agent_bias, query_bias, agent_v, lse, grid,
                                           agent_grid, prefix, scale, bias_grads, weight_dtypes, into)
        dq, dk, dv, da, dab, dqb = _launch_backward(grad, q, k, v, agents, agent_bias, query_bias, None, agent_v, lse,
                                                    scale, *bias_grads, into=into)
        _add_pooling_grad(_grid_tokens(dq, prefix), da, grid, agent_grid)
        dw = db = None
        if w is not None:
            # the conv term's gradients: the grid rows of the output's gradient in the conv's dtype (as autograd casts
            # it for the conv's output), the values' part added into dv's grid rows
            g = _grid_maps(grad, prefix, grid)
            g = g if g.dtype == w.dtype else g.to(w.dtype)
            _, dw, db = conv_backward(g, _grid_maps(v, prefix, grid), w if input_grad else None, w.shape[-1],
                                      weight_dtypes, into=_grid_maps(dv, prefix, grid) if input_grad else None)
    return dq, dk, dv, dw, db, dab, dqb


def _launch_pooled_backward(plan: _Plan, grad, q, k, v, w, agents, agent_bias, query_bias, agent_v, lse,
                            grid: tuple[int, int], agent_grid: tuple[int, int], prefix: int, scale: float,
                            bias_grads: tuple[bool, bool], weight_dtypes: tuple, into=None, launch=direct):
    """:func:`_pooled_grads` in one launch of ``_pooled_backward_kernel`` (one program a (batch, head), the conv's
    input gradient always added into dv) and, where the conv's weight or bias wants a gradient (``weight_dtypes``:
    their dtypes, None where not wanted), the sum of its partials over the batch. Returns dq, dk, dv, d_weight,
    d_conv_bias and the float32 per-(batch, head) logit gradients of the biases in their row-padded buffers
    (:func:`_bias_grad_buffers`; empty when not asked for)."""
    s = plan.sizes
    dq, dk, dv = into if into is not None else (token_major(s.b, s.heads, s.n, s.d, q),
                                                token_major(s.b, s.heads, s.m, s.d, k),
                                                token_major(s.b, s.heads, s.m, s.dv, v))
    f32, c = torch.float32, s.heads * s.dv
    dab, dqb = _bias_grad_buffers(s, *bias_grads, q)
    wants = weight_dtypes[0] is not None
    parts = torch.empty((s.b, 10, c) if wants else (0,), device=q.device, dtype=f32)
    wt = w if w is not None else q
    launch(_kernels().pooled_backward)[(s.b * s.heads,)](
        grad, q, k, v, agents, agent_bias if agent_bias is not None else q,
        query_bias if query_bias is not None else q, agent_v, lse, wt, dq, dk, dv, dab, dqb, parts,
        *grad.stride(), *q.stride(), *k.stride(), *v.stride(), *agents.stride(), *_bias_strides(agent_bias),
        *_bias_strides(query_bias), *((w.stride(0), w.stride(3)) if w is not None else (0, 0)), *_token_strides(dq),
        *_token_strides(dk), *_token_strides(dv), _bias_grad_rows(s.m), _bias_grad_rows(s.a), s.heads, s.n, s.a,
        prefix, *grid, *agent_grid, scale, scale * _LOG2E, HAS_AB=agent_bias is not None,
        HAS_QB=query_bias is not None, AB_GRAD=bias_grads[0], QB_GRAD=bias_grads[1], CONV=w is not None,
        WEIGHT_GRAD=wants, **plan.options, **plan.constexprs)
    dw = db = None
    if wants:
        dw = torch.empty(w.shape, dtype=weight_dtypes[0], device=q.device)
        db = None if weight_dtypes[1] is None else torch.empty((c,), dtype=weight_dtypes[1], device=q.device)
        sum_parts(parts, 10, w, dw, db, launch)
    return dq, dk, dv, dw, db, dab, dqb


class _PooledAgentAttention(torch.autograd.Function):
    """Training calls of :func:`pooled_agent_attention_triton` on separate q, k, v: one autograd node. The forward
    is the fused launch keeping the agents and the aggregation's statistics; the backward :func:`_node_grads`."""

    @staticmethod
    def forward(ctx, q, k, v, weight, bias, agent_bias, query_bias, grid, agent_grid, prefix, scale):
        out, (w, agents, agent_v, lse) = _pooled_forward(ctx, q, k, v, weight, bias, agent_bias, query_bias, grid,
                                                         agent_grid, prefix, scale)
        ctx.save_for_backward(q, k, v, w, agents, agent_bias, query_bias, agent_v, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, w, agents, agent_bias, query_bias, agent_v, lse = ctx.saved_tensors
        dq, dk, dv, dw, db, dab, dqb = _node_grads(ctx, grad, q, k, v, w, agents, agent_bias, query_bias, agent_v,
                                                   lse, ctx.needs_input_grad[5:7], ctx.needs_input_grad[3:5],
                                                   ctx.needs_input_grad[2])
        return dq, dk, dv, dw, db, dab, dqb, None, None, None, None


class _PooledQkvAttention(torch.autograd.Function):
    """Training calls of :func:`pooled_agent_attention_triton` given the qkv projection whose head-split views q, k
    and v are (``views``, a tuple autograd does not track): one autograd node on qkv, whose backward writes dq, dk
    and dv into the thirds of one (B, N, 3 * heads * d) buffer, qkv's gradient. Otherwise autograd would concatenate
    the three gradients through the views' nodes: a copy of them all and some six more nodes a call."""

    @staticmethod
    def forward(ctx, qkv, weight, bias, agent_bias, query_bias, views, grid, agent_grid, prefix, scale):
        q, k, v = views
        out, (w, agents, agent_v, lse) = _pooled_forward(ctx, q, k, v, weight, bias, agent_bias, query_bias, grid,
                                                         agent_grid, prefix, scale)
        ctx.save_for_backward(qkv, w, agents, agent_bias, query_bias, agent_v, lse)
        ctx.heads = q.shape[1]
        return out

    @staticmethod
    def backward(ctx, grad):
        qkv, w, agents, agent_bias, query_bias, agent_v, lse = ctx.saved_tensors
        layout, flags, dtypes = _grad_flags(ctx, agent_bias, query_bias, ctx.needs_input_grad[3:5],
                                            ctx.needs_input_grad[1:3])
        dqkv, dw, db, dab, dqb = planned("pooled_agent_attention.qkv_backward", _planned_qkv_grads, grad, qkv, w,
                                         agents, agent_bias, query_bias, agent_v, lse, ctx.heads, *layout, *flags,
                                         *dtypes)
        return (dqkv if ctx.needs_input_grad[0] else None, dw, db, dab, dqb, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------------------------
# traced training on a packed qkv projection: the whole module as one op, its backward writing qkv's gradient


def _packed_reason(qkv, conv_weight, conv_bias, agent_bias, query_bias) -> str | None:
    """Why a traced call cannot take the packed op (:func:`_packed_forward_op`), or None."""
    if qkv is None:
        return "eager only without qkv: in a traced graph the reference's ops (each with its own kernel) compile"
    if not needs_grad(qkv, conv_weight, conv_bias, agent_bias, query_bias):
        return "traced inference: the reference's ops compile to as few kernels (the packed op is for training)"
    return None


# The packed ops run eagerly inside a compiled step, once a block each way: their views are made in as few tensor
# calls as possible (each costs host time; splitting one dimension is always a view, whatever the strides).


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, n, heads * d) -> its (B, heads, n, d) view."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def _third(t: torch.Tensor, i: int) -> torch.Tensor:
    """(B, N, 3 * C) -> its i-th (B, N, C) channel third (q, k or v of a qkv projection or its gradient)."""
    c = t.shape[-1] // 3
    return t.narrow(-1, i * c, c)


def _grid_rows(t: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, N, C) tokens -> the (B, N - prefix, C) grid tokens (``t`` itself without a prefix: no slice call)."""
    return t[:, prefix:] if prefix else t


def _token_map(t: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) tokens -> the grid tokens' (B, H, W, C) map, a view."""
    b, _, c = t.shape
    return _grid_rows(t, prefix).view(b, *grid, c)


def _packed_forward_fake(qkv, agents, agent_bias, query_bias, conv_weight, conv_bias, heads, grid, agent_grid,
                         prefix, scale):
    b, n, c3 = qkv.shape
    c, a = c3 // 3, agents.shape[1]
    return (qkv.new_empty((b, n, c)), qkv.new_empty((b, heads, a, c // heads)),
            qkv.new_empty((b, heads, a), dtype=torch.float32))


@torch.library.custom_op("zoo::pooled_agent_qkv_fwd", mutates_args=())
def _packed_forward_op(qkv: torch.Tensor, agents: torch.Tensor, agent_bias: Optional[torch.Tensor],  # noqa: UP045
                       query_bias: Optional[torch.Tensor], conv_weight: Optional[torch.Tensor],  # noqa: UP045
                       conv_bias: Optional[torch.Tensor], heads: int, grid: Sequence[int],  # noqa: UP045
                       agent_grid: Sequence[int], prefix: int, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`zoo.ops.pooled_agent_attention` of a (B, N, 3 * heads * d) qkv projection in a traced training graph
    (an opaque op: its backward must write one buffer, which a graph of views cannot ask of it). ``agents`` (B, A,
    heads * d) must be :func:`~zoo.ops.agent.pool_agent_tokens` of qkv's grid queries: the caller pools (inductor
    fuses the pooling into its own kernels) and the op's backward adds the pooling's gradient into qkv's, so it
    gives the agents none. The conv's weight and bias come in qkv's dtype, the compute dtype. Returns the output (B,
    N, heads * d), the agents' values (B, heads, A, d) and the aggregation's float32 log-sum-exp (B, heads, A): the
    last two for the backward, which recomputes the attention's output tiles. The separate kernels: the agent
    forward kernel, then the depthwise conv's adding into its output's grid rows in place."""
    grid, agent_grid = tuple(grid), tuple(agent_grid)
    q, k, v = split_qkv(qkv, heads)
    with on_device(qkv):
        attn, agent_v, lse = _launch_forward(q, k, v, _heads(agents, heads), agent_bias, query_bias, scale,
                                             training=True)
    b, n, c = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    out = attn.transpose(1, 2).reshape(b, n, c)  # (token-major memory: a view)
    if conv_weight is not None:
        conv_launch(_token_map(_third(qkv, 2), prefix, grid), conv_weight, conv_bias, _token_map(out, prefix, grid),
                    conv_weight.dtype, out.dtype, inplace=True)
    return out, agent_v, lse


_packed_forward_op.register_fake(_packed_forward_fake)


def _packed_backward_fake(grad, qkv, agents, agent_v, lse, agent_bias, query_bias, conv_weight, heads, grid, agent_grid,
                          prefix, scale, agent_bias_grad, query_bias_grad, weight_grad, bias_grad):
    b, n, c3 = qkv.shape
    d, k = c3 // (3 * heads), conv_weight.shape[-1] if conv_weight is not None else 0
    sizes = _Sizes(b, heads, n, n, agents.shape[1], d, d)
    return (qkv.new_empty(qkv.shape), *_bias_grad_buffers(sizes, agent_bias_grad, query_bias_grad, qkv),
            qkv.new_empty((c3 // 3, 1, k, k) if weight_grad else (0,)),
            qkv.new_empty((c3 // 3,) if bias_grad else (0,)))


@torch.library.custom_op("zoo::pooled_agent_qkv_bwd", mutates_args=())
def _packed_backward_op(grad: torch.Tensor, qkv: torch.Tensor, agents: torch.Tensor, agent_v: torch.Tensor,
                        lse: torch.Tensor, agent_bias: Optional[torch.Tensor],  # noqa: UP045
                        query_bias: Optional[torch.Tensor], conv_weight: Optional[torch.Tensor],  # noqa: UP045
                        heads: int, grid: Sequence[int], agent_grid: Sequence[int], prefix: int, scale: float,
                        agent_bias_grad: bool, query_bias_grad: bool, weight_grad: bool, bias_grad: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`_packed_forward_op` from its output's ``grad`` (B, N, heads * d): qkv's gradient (B, N,
    3 * heads * d) in one buffer (the agent backward kernel, recomputing the attention's output tiles, writes dq, dk
    and dv into its thirds, the pooling's gradient is added into dq's grid rows and the conv's input gradient into
    dv's: one launch, :func:`_launch_pooled_backward`, where batch * heads fills the GPU), the float32 per-(batch,
    head) logit gradients of the biases in their row-padded buffers (:func:`_bias_grad_buffers`), and the conv's
    weight and bias gradients in the compute dtype (each empty unless asked for)."""
    grid, agent_grid = tuple(grid), tuple(agent_grid)
    q, k, v = split_qkv(qkv, heads)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = split_qkv(dqkv, heads)
    dtype = None if conv_weight is None else conv_weight.dtype
    dtypes = (dtype if weight_grad or bias_grad else None, dtype if bias_grad else None)
    _, _, _, dw, db, dab, dqb = _pooled_grads(_heads(grad, heads), q, k, v, conv_weight, _heads(agents, heads),
                                              agent_bias, query_bias, agent_v, lse, (grid, agent_grid, prefix, scale),
                                              (agent_bias_grad, query_bias_grad), dtypes, into=(dq, dk, dv))
    empty = qkv.new_empty((0,))
    return dqkv, dab, dqb, empty.clone() if dw is None else dw, empty.clone() if db is None else db


_packed_backward_op.register_fake(_packed_backward_fake)


def _packed_setup(ctx, inputs, output) -> None:
    qkv, agents, agent_bias, query_bias, weight, bias, heads, grid, agent_grid, prefix, scale = inputs
    _, agent_v, lse = output
    ctx.save_for_backward(qkv, agents, agent_v, lse, agent_bias, query_bias, weight)
    ctx.layout = (heads, grid, agent_grid, prefix, scale)
    ctx.has_bias = bias is not None


def _packed_backward(ctx, grad, *_unused):
    qkv, agents, agent_v, lse, agent_bias, query_bias, weight = ctx.saved_tensors
    wants = ctx.needs_input_grad
    flags = (agent_bias is not None and wants[2], query_bias is not None and wants[3],
             weight is not None and wants[4], ctx.has_bias and wants[5])
    dqkv, dab, dqb, dw, db = _packed_backward_op(grad, qkv, agents, agent_v, lse, agent_bias, query_bias, weight,
                                                 *ctx.layout, *flags)
    # the agents get no gradient: dqkv holds the pooling's (see _packed_forward_op)
    return (dqkv, None, _bias_grad(dab, agent_bias, flags[0], qkv.shape[1]),
            _bias_grad(dqb, query_bias, flags[1], agents.shape[1]),
            dw if flags[2] else None, db if flags[3] else None, None, None, None, None, None)


_packed_forward_op.register_autograd(_packed_backward, setup_context=_packed_setup)


def _pooled_supports(q, k, v, conv_weight, conv_bias, *, grid, agent_grid, prefix, scale, agent_bias=None,
                     query_bias=None, dropout_p=0.0, qkv=None) -> str | None:
    if torch.compiler.is_compiling():
        reason = _packed_reason(qkv, conv_weight, conv_bias, agent_bias, query_bias)
        if reason is not None:
            return reason
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        return f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: the kernel takes one"
    if conv_weight is not None:
        if conv_weight.shape[-1] != 3 and not torch.compiler.is_compiling():
            return f"conv kernel size {conv_weight.shape[-1]}: the fused conv is 3x3"
        total = torch.promote_types(q.dtype, compute_dtype(v))
        if total != q.dtype:
            return f"the conv sum is {total}, not q's {q.dtype}: the kernel writes one output dtype"
    return _supports(q, k, v, _agents_like(q, agent_grid), scale=scale, agent_bias=agent_bias,
                     query_bias=query_bias, dropout_p=dropout_p)


# Above this many tokens the separate kernels win: every program pools its (batch, head)'s queries again (per query
# split) and the conv reads one head's channels at a time. H200 bf16 batch 128, eager: Agent-DeiT-T/S (197 tokens) 4.7 /
# 5.4 ms a forward against 6.0 / 6.5 unfused; Agent-Swin-T with its 3,136- and 784-token global stages fused 8.86
# against 8.33 ms.
_POOLED_MAX_TOKENS = 256


def _pooled_prefer(q, *_, **__) -> str | None:
    if torch.compiler.is_compiling():
        return None  # (the packed op: separate kernels inside)
    if q.device.type != "cuda":
        return f"on {q.device.type} the reference is faster than Triton's interpreter"
    if q.shape[2] > _POOLED_MAX_TOKENS:
        return f"{q.shape[2]} tokens: above {_POOLED_MAX_TOKENS} the separate kernels are faster"
    return None


register_backend(_POOLED_OP, "triton", pooled_agent_attention_triton, supports=_pooled_supports, priority=20,
                 available=triton_missing_reason, prefer=_pooled_prefer)
