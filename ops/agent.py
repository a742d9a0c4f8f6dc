"""Agent attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024).

A small set of ``A`` agent tokens first attends to the keys and gathers values (agent aggregation), then every
query attends to the agents and reads what they gathered (agent broadcast)::

    agent_v = softmax(agent @ k^T * scale + agent_bias) @ v          # (B, heads, A, d_v)
    out     = softmax(q @ agent^T * scale + query_bias) @ agent_v    # (B, heads, N, d_v)

Both softmaxes are over a short side (A agents, typically 9-81), so the cost is linear in the token count. The
agent tokens (usually an average pool of the queries), the depthwise-conv "diversity" term and the position biases
are built by the model (see ``zoo.backbones._agent_common``); this op is only the two attentions.

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

from ._sdpa import sdpa
from ._checks import broadcasts_to, check_float_tensors
from ._dispatch import call_key, dispatch, register_backend, validated

__all__ = ["agent_attention"]

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
