"""Agent attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024).

A small set of ``A`` agent tokens first attends to the keys and gathers values (agent aggregation), then every
query attends to the agents and reads what they gathered (agent broadcast)::

    agent_v = softmax(agent @ k^T * scale + agent_bias) @ v          # (B, heads, A, d_v)
    out     = softmax(q @ agent^T * scale + query_bias) @ agent_v    # (B, heads, N, d_v)

Both softmaxes are over a short side (A agents, typically 9-81), so the cost is linear in the token count. The
agent tokens (usually an average pool of the queries), the depthwise-conv "diversity" term and the position biases
are built by the model (see ``zoo.backbones._agent_common``); this op is only the two attentions.

:func:`pooled_agent_attention` is the Agent Attention module's whole token mixing for self-attention over a token
grid: the agents pooled from the queries, the two attentions and the values' depthwise conv. Its reference backend
is those three ops in a row; its ``triton`` backend computes all three in one launch and, in training, is one
autograd node (:mod:`zoo.ops.triton.agent`): eager models are bound by host time.

Backends:
    ``reference``: plain PyTorch, the definition (scales the agents/queries before the product, as the official
        code does).
    ``sdpa``: two ``F.scaled_dot_product_attention`` calls with the biases as float masks; any device, differentiable
        in every input including the biases.
    ``triton`` (:mod:`zoo.ops.triton.agent`): both attentions in one kernel per (batch, head), the backward in one
        more; deterministic, biases read through broadcast strides, no probability maps in memory. CUDA (or the
        Triton interpreter), no dropout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._amp import compute_dtype
from ._cache import cached_constant
from ._checks import broadcasts_to, check_float_tensors
from ._dispatch import call_key, dispatch, register_backend, validated
from ._qkv import check_qkv, qkv_offsets
from ._sdpa import sdpa
from .depthwise_conv import _check_inputs as _check_conv_inputs, depthwise_conv
from .triton import needs_grad

__all__ = ["agent_attention", "pooled_agent_attention", "pool_agent_tokens"]

_OP = "agent_attention"


def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agent: torch.Tensor, *,
                    scale: float | None = None, agent_bias: torch.Tensor | None = None,
                    query_bias: torch.Tensor | None = None, dropout_p: float = 0.0,
                    backend: str | None = None) -> torch.Tensor:
    """Agent attention: agents aggregate from the keys, then the queries read from the agents.

    Args:
        q: queries (B, heads, N, d).
        k: keys (B, heads, M, d), M >= 1.
        v: values (B, heads, M, d_v).
        agent: agent tokens (B, heads, A, d), A >= 1.
        scale: logit scale of both attentions; ``d ** -0.5`` when None.
        agent_bias: added to the agent->key logits, broadcastable to (B, heads, A, M); e.g. (1, heads, A, M).
        query_bias: added to the query->agent logits, broadcastable to (B, heads, N, A); e.g. (1, heads, N, A).
        dropout_p: dropout on both attention maps (apply only in training; backends draw different masks).
        backend: ``"reference"``, ``"sdpa"``, ``"triton"`` or None for automatic choice (see
            :mod:`zoo.ops._dispatch`).

    Returns:
        (B, heads, N, d_v) in the dtype of ``q`` (the triton backend returns a view of token-major memory).
    """
    key = call_key(q, k, v, agent, agent_bias, query_bias, scale, dropout_p)
    if not validated(_OP, key):
        _check_inputs(q, k, v, agent, agent_bias, query_bias, dropout_p)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return dispatch(_OP, backend, q, k, v, agent, scale=float(scale), agent_bias=agent_bias,
                    query_bias=query_bias, dropout_p=float(dropout_p), key=key)


def _check_inputs(q, k, v, agent, agent_bias, query_bias, dropout_p) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("agent", agent)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"agent_attention: {name} must be a 4-d tensor (B, heads, tokens, dim), got {got}")
    check_float_tensors("agent_attention", q=q, k=k, v=v, agent=agent)
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h) or agent.shape[:2] != (b, h):
        raise ValueError("agent_attention: q, k, v and agent must share (B, heads); got "
                         f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}, agent={tuple(agent.shape)}")
    if k.shape[-1] != d or agent.shape[-1] != d:
        raise ValueError(f"agent_attention: q, k and agent must share the head dim; got q {d}, k {k.shape[-1]}, "
                         f"agent {agent.shape[-1]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"agent_attention: k and v must have the same token count, got {k.shape[2]} and {v.shape[2]}")
    n, m, a = q.shape[2], k.shape[2], agent.shape[2]
    for name, t in (("agent", agent), ("k", k)):
        if t.shape[2] == 0 and b * h:  # a softmax over an empty set (the backends would differ: zeros or NaN)
            raise ValueError(f"agent_attention: {name} has no tokens (shape {tuple(t.shape)}); both softmaxes need "
                             "at least one agent and one key")
    _check_bias("agent_bias", agent_bias, (b, h, a, m))
    _check_bias("query_bias", query_bias, (b, h, n, a))
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"agent_attention: dropout_p must be in [0, 1), got {dropout_p}")


def _check_bias(name: str, bias: torch.Tensor | None, target: tuple[int, ...]) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise ValueError(f"agent_attention: {name} must be a floating-point tensor or None")
    ok = broadcasts_to(bias.shape, target)
    if not ok:
        raise ValueError(f"agent_attention: {name} of shape {tuple(bias.shape)} does not broadcast to {target}")


def _softmax_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                       bias: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    # The official code scales the query side before the product; keep that order so float32 matches it.
    logits = (query * scale) @ key.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias  # float32 biases promote low-precision logits, as in the official code under autocast
    attn = logits.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn.to(value.dtype) @ value


def _reference(q, k, v, agent, *, scale, agent_bias, query_bias, dropout_p):
    agent_v = _softmax_attention(agent, k, v, scale, agent_bias, dropout_p)
    return _softmax_attention(q, agent, agent_v, scale, query_bias, dropout_p)


def _as_mask(bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    # SDPA wants the float mask in the query dtype (under autocast the biases stay float32 parameters).
    return None if bias is None else bias.to(like.dtype)


def _sdpa(q, k, v, agent, *, scale, agent_bias, query_bias, dropout_p):
    agent_v = sdpa(agent, k, v, attn_mask=_as_mask(agent_bias, agent), dropout_p=dropout_p, scale=scale)
    return sdpa(q, agent, agent_v, attn_mask=_as_mask(query_bias, q), dropout_p=dropout_p, scale=scale)


# Above this many keys, a trainable float bias makes SDPA's backward slower than the plain reference: SDPA returns
# the bias gradient expanded over the batch and reduces it afterwards. Measured on an H200 (bf16, batch 128,
# fwd+bwd vs reference): 3136 keys (Agent-Swin-T stage 0) 0.29x, 784 keys 0.90x, 196-197 keys 1.26-1.36x.
_SDPA_MAX_KEYS_WITH_TRAINABLE_BIAS = 512


def _sdpa_prefer(q, k, v, agent, *, agent_bias=None, query_bias=None, **_) -> str | None:
    trainable = any(b is not None and b.requires_grad for b in (agent_bias, query_bias)) and torch.is_grad_enabled()
    if trainable and torch.compiler.is_compiling():
        # Inductor may hand SDPA a padded bias layout that the memory-efficient backward rejects ("last dimension
        # must be contiguous", Agent-DeiT-T fwd+bwd on an H200, torch 2.11); the reference compiles to fused kernels.
        return "a trainable bias inside torch.compile: the reference's softmax compiles to fused kernels"
    if trainable and k.shape[-2] > _SDPA_MAX_KEYS_WITH_TRAINABLE_BIAS:
        return (f"{k.shape[-2]} keys with a trainable bias: SDPA's bias gradient is slower than the reference "
                f"above {_SDPA_MAX_KEYS_WITH_TRAINABLE_BIAS} keys")
    return None


register_backend(_OP, "reference", _reference, priority=0)
register_backend(_OP, "sdpa", _sdpa, prefer=_sdpa_prefer, priority=10)


# ----------------------------------------------------------------------------------------------------------------
# agents pooled from the queries: the token mixing of an Agent Attention module

_POOLED_OP = "pooled_agent_attention"


def _window_membership(n: int, g: int, device: torch.device) -> torch.Tensor:
    """(g, n) bool: which of n positions each of g adaptive-pooling windows covers (ATen's windows:
    [floor(i * n / g), ceil((i + 1) * n / g)))."""
    i = torch.arange(g, device=device)[:, None]
    pos = torch.arange(n, device=device)[None, :]
    return (pos >= (i * n) // g) & (pos < -((-(i + 1) * n) // g))


@cached_constant()
def _pooling_mask(size: tuple[int, int], grid: tuple[int, int], device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """(ga*gb, H*W) zeros and ones: the token grid positions each agent's window sums."""
    rows = _window_membership(size[0], grid[0], device)
    cols = _window_membership(size[1], grid[1], device)
    return (rows[:, None, :, None] & cols[None, :, None, :]).flatten(2).flatten(0, 1).to(dtype)


@cached_constant()
def _pooling_counts(size: tuple[int, int], grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(ga*gb, 1) float32: how many tokens each agent's window holds."""
    rows = _window_membership(size[0], grid[0], device).sum(1)
    cols = _window_membership(size[1], grid[1], device).sum(1)
    return (rows[:, None] * cols[None, :]).reshape(-1, 1).float()


def pool_agent_tokens(q: torch.Tensor, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Agent tokens: adaptive average pool of the (patch) queries on their grid.

    Args:
        q: (B, H*W, C) queries in row-major grid order.
        size: (H, W).
        grid: (ga, gb) agent grid.

    Returns:
        (B, ga*gb, C).
    """
    b, n, c = q.shape
    h, w = size
    if n != h * w:
        raise ValueError(f"pool_agent_tokens: {n} tokens do not form a {h}x{w} grid")
    ga, gb = grid
    # Not F.adaptive_avg_pool2d: on this channels-last-strided map it runs ATen's NHWC kernel, which took 1.15 ms per
    # Agent-Swin-T stage-0 call (56x56 -> 3x3) at batch 128 on the H200, 18% of the compiled model's device time.
    if h % ga == 0 and w % gb == 0:  # equal windows: a mean over a view of the grid
        return q.reshape(b, ga, h // ga, gb, w // gb, c).mean((2, 4)).flatten(1, 2)
    # overlapping or unequal windows: sums as a matmul with a 0/1 window mask (exact in every dtype), then the counts
    sums = torch.matmul(_pooling_mask(tuple(size), tuple(grid), q.device, q.dtype), q)
    return sums.div_(_pooling_counts(tuple(size), tuple(grid), q.device))  # float32 division, one rounding


def pooled_agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, int],
                           agent_grid: tuple[int, int], prefix: int = 0, scale: float | None = None,
                           agent_bias: torch.Tensor | None = None, query_bias: torch.Tensor | None = None,
                           conv_weight: torch.Tensor | None = None, conv_bias: torch.Tensor | None = None,
                           dropout_p: float = 0.0, qkv: torch.Tensor | None = None,
                           backend: str | None = None) -> torch.Tensor:
    """Agent self-attention over ``prefix`` leading tokens and an (H, W) token grid, with the agents pooled from the
    queries and the values' depthwise conv added (the Agent Attention module before its output projection).

    ``agents`` = :func:`pool_agent_tokens` of the queries' grid tokens to ``agent_grid`` (each head's channels
    alike); ``out = agent_attention(q, k, v, agents)``; with ``conv_weight``, the grid tokens' outputs get
    :func:`~zoo.ops.depthwise_conv` of the values' grid (channels ``head * d_v + i``) added, the prefix tokens
    nothing (Agent-DeiT's class token).

    Args:
        q, k: (B, heads, N, d); v: (B, heads, N, d_v); N = prefix + H * W tokens, the grid row-major after the
            prefix. Any strides (head-split views of a qkv projection).
        grid: (H, W). agent_grid: (ga, gb), A = ga * gb agents (ATen's adaptive-pooling windows).
        prefix: leading tokens outside the grid (not pooled, no conv term).
        scale, agent_bias, query_bias, dropout_p: as :func:`agent_attention` (biases broadcastable to
            (B, heads, A, N) and (B, heads, N, A)).
        conv_weight: (heads * d_v, 1, K, K) depthwise kernel, K odd, or None for no conv term; conv_bias: (heads *
            d_v,) or None. Dtypes as :func:`~zoo.ops.depthwise_conv` takes them (its compute dtype).
        qkv: the (B, N, 3 * heads * d) projection whose head-split views q, k and v are (q, k, v each heads * d
            channels in that order, d_v = d), or None. It changes no value: in training calls on CUDA (eager, or a
            traced graph) the ``triton`` backend then runs the module as one autograd node on qkv whose backward
            writes qkv's gradient in one buffer (otherwise autograd concatenates q's, k's and v's gradients, with
            the pooling's and the conv's added, in one more pass over them). An eager call whose q, k, v are not
            views of qkv's autograd base (a detached qkv) ignores it.
        backend: ``"reference"``, ``"triton"`` or None for automatic choice (see :mod:`zoo.ops._dispatch`).

    Returns:
        (B, heads, N, d_v): the attention output in q's dtype, plus the conv term in the dtype of that sum.

    Backends: ``reference`` is the three ops in a row (differentiable; in calls autograd does not record the conv
    adds into the attention output's grid rows in place). ``triton`` (eager calls on CUDA, no dropout, the conv's
    kernel size 3 and a sum that keeps q's dtype; traced calls take the reference) is one kernel forward: it pools
    the agents, runs both attentions and adds the conv from registers; the attention output and the conv round as
    the separate kernels do (the agents' window sums in another order: equal up to float32 rounding before the
    agents' one rounding). A training call is one autograd node (where the reference's graph has some 25 nodes a
    call) whose backward is one launch where batch * heads fills the GPU (the agent attention's gradients, then the
    pooling's and the conv's, in each (batch, head)'s program), else the agent backward kernels, the pooling's
    gradient and the depthwise conv's backward kernels.
    """
    grid = tuple(grid) if isinstance(grid, (tuple, list)) else grid
    agent_grid = tuple(agent_grid) if isinstance(agent_grid, (tuple, list)) else agent_grid
    key = call_key(q, k, v, conv_weight, conv_bias, agent_bias, query_bias, grid, agent_grid, prefix, scale,
                   dropout_p, qkv, qkv_offsets(qkv, q, k, v))
    if not validated(_POOLED_OP, key):
        _check_pooled_inputs(q, k, v, grid, agent_grid, prefix, conv_weight, conv_bias, agent_bias, query_bias,
                             dropout_p)
        check_qkv(_POOLED_OP, qkv, q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return dispatch(_POOLED_OP, backend, q, k, v, conv_weight, conv_bias, grid=grid, agent_grid=agent_grid,
                    prefix=prefix, scale=float(scale), agent_bias=agent_bias, query_bias=query_bias,
                    dropout_p=float(dropout_p), qkv=qkv, key=key)


def _positive_pair(name: str, value) -> None:
    if not (isinstance(value, tuple) and len(value) == 2 and all(type(x) is int and x > 0 for x in value)):
        raise ValueError(f"pooled_agent_attention: {name} must be two positive ints (rows, columns), got {value!r}")


def _check_pooled_inputs(q, k, v, grid, agent_grid, prefix, conv_weight, conv_bias, agent_bias, query_bias,
                         dropout_p) -> None:
    _positive_pair("grid", grid)
    _positive_pair("agent_grid", agent_grid)
    if type(prefix) is not int or prefix < 0:
        raise ValueError(f"pooled_agent_attention: prefix must be an int >= 0, got {prefix!r}")
    agents = _agents_like(q, agent_grid) if isinstance(q, torch.Tensor) and q.ndim == 4 else q
    _check_inputs(q, k, v, agents, agent_bias, query_bias, dropout_p)
    n = prefix + grid[0] * grid[1]
    if q.shape[2] != n or k.shape[2] != n:
        raise ValueError(f"pooled_agent_attention: q, k and v need prefix + H * W = {prefix} + {grid[0]} * {grid[1]} "
                         f"= {n} tokens, got q {q.shape[2]}, k {k.shape[2]}")
    channels = q.shape[1] * v.shape[3]
    if conv_weight is None:
        if conv_bias is not None:
            raise ValueError("pooled_agent_attention: conv_bias needs a conv_weight")
        return
    if (not isinstance(conv_weight, torch.Tensor) or conv_weight.ndim != 4 or conv_weight.shape[:2] != (channels, 1)
            or conv_weight.shape[2] != conv_weight.shape[3] or conv_weight.shape[2] % 2 == 0):
        got = tuple(conv_weight.shape) if isinstance(conv_weight, torch.Tensor) else type(conv_weight).__name__
        raise ValueError(f"pooled_agent_attention: conv_weight must be (heads * d_v, 1, K, K) = ({channels}, 1, K, K) "
                         f"with K odd, got {got}")
    if conv_bias is not None and (not isinstance(conv_bias, torch.Tensor) or tuple(conv_bias.shape) != (channels,)):
        got = tuple(conv_bias.shape) if isinstance(conv_bias, torch.Tensor) else type(conv_bias).__name__
        raise ValueError(f"pooled_agent_attention: conv_bias must be ({channels},) or None, got {got}")
    # the rest of the conv's rules (floating point, devices, dtypes outside autocast) are depthwise_conv's, which the
    # fused backend does not call
    _check_conv_inputs(_grid_maps(v, prefix, grid), conv_weight, conv_bias, None, grid, compute_dtype(v))


def _agents_like(q: torch.Tensor, agent_grid: tuple[int, int]) -> torch.Tensor:
    """A (B, heads, A, d) stand-in (no memory) for the pooled agents, for the checks of :func:`agent_attention`."""
    return q.new_empty(()).expand(q.shape[0], q.shape[1], agent_grid[0] * agent_grid[1], q.shape[3])


def _grid_maps(t: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, heads, N, d) -> the grid tokens' (B, H, W, heads * d) channels-last map: a view of token-major memory
    (a qkv projection's head-split views, the triton backend's outputs and gradients)."""
    return _grid_tokens(t, prefix).reshape(t.shape[0], *grid, t.shape[1] * t.shape[3])


def _grid_tokens(t: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N - prefix, heads * d): the grid tokens with the heads merged (a view of a
    token-major qkv projection)."""
    return t.transpose(1, 2)[:, prefix:].flatten(2)


def _adds_in_place(out: torch.Tensor, *inputs: torch.Tensor | None) -> bool:
    """Whether a conv term of ``inputs`` can be added into ``out`` in place: autograd records nothing (``out`` is
    not saved for a backward), no graph is being traced (inductor fuses a concatenation itself), and the sum keeps
    ``out``'s dtype (it does under autocast, where both are the compute dtype)."""
    if torch.compiler.is_compiling() or needs_grad(out, *inputs):
        return False
    return torch.promote_types(out.dtype, compute_dtype(inputs[0])) == out.dtype


def _pooled_reference(q, k, v, conv_weight, conv_bias, *, grid, agent_grid, prefix, scale, agent_bias, query_bias,
                      dropout_p, qkv=None):
    b, heads, n, d = q.shape
    agents = pool_agent_tokens(_grid_tokens(q, prefix), grid, agent_grid).unflatten(-1, (heads, d)).transpose(1, 2)
    out = agent_attention(q, k, v, agents, scale=scale, agent_bias=agent_bias, query_bias=query_bias,
                          dropout_p=dropout_p)
    if conv_weight is None:
        return out
    dv = v.shape[-1]
    out = out.transpose(1, 2).reshape(b, n, heads * dv)
    values = _grid_maps(v, prefix, grid)
    rows = out[:, prefix:].view(b, *grid, heads * dv)
    if _adds_in_place(out, values, conv_weight, conv_bias):  # into the grid rows: no concatenation
        depthwise_conv(values, conv_weight, conv_bias, residual=rows, inplace=True)
    else:
        summed = depthwise_conv(values, conv_weight, conv_bias, residual=rows).flatten(1, 2)
        out = torch.cat([out[:, :prefix], summed], dim=1) if prefix else summed
    return out.view(b, n, heads, dv).transpose(1, 2)


register_backend(_POOLED_OP, "reference", _pooled_reference, priority=0)
