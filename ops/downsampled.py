"""Global attention over spatially reduced keys/values (PVT "spatial-reduction attention", MAFormer GLD).

Every query attends to all ``M`` keys of a down-sampled copy of the feature map::

    out = softmax(q @ k^T * scale + bias) @ v        q: (B, heads, N, d), k/v: (B, heads, M, d), M << N

The reduction itself (strided conv, pooling, norm, the k/v projection) belongs to the model; the op is the attention
over the short key set. It accepts either the heads-split layout ``(B, heads, tokens, d)`` or the token layout the
model's linears produce, ``(B, tokens, heads * d)`` with ``num_heads``, so a model's reduction attention is::

    kv = self.kv(self.norm(self.sr(x_map)).flatten(2).transpose(1, 2))      # (B, M, 2C)
    out = downsampled_attention(self.q(x), *kv.chunk(2, -1), num_heads=h)   # (B, N, C)
    out = self.proj(out)

Backends:
    ``reference``: explicit ``softmax(q k^T) v`` in plain PyTorch, the definition.
    ``sdpa``: one ``F.scaled_dot_product_attention`` call (flash / memory-efficient kernels where they apply);
        any device, differentiable in every input including ``bias``.
    ``triton``: at most 256 keys, no bias, no dropout: every key in one tile, one kernel forward and one backward,
        deterministic (:mod:`zoo.ops.triton.short_keys`); chosen on CUDA when it can serve the call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._sdpa import mixed_dtypes_reason, sdpa
from ._checks import broadcasts_to, check_float_tensors
from ._dispatch import call_key, dispatch, register_backend, validated
from ._qkv import check_qkv, qkv_offsets

__all__ = ["downsampled_attention"]

_OP = "downsampled_attention"


def downsampled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int | None = None,
                          bias: torch.Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0,
                          qkv: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention of every query over a spatially reduced key/value set.

    Args:
        q: queries, (B, heads, N, d), or (B, N, heads * d) with ``num_heads``.
        k: reduced keys, (B, heads, M, d), or (B, M, heads * d) with ``num_heads``.
        v: reduced values, (B, heads, M, d_v), or (B, M, heads * d_v) with ``num_heads``.
        num_heads: required with the 3-d token layout (and then the output is in that layout); must be None with
            the 4-d layout.
        bias: float tensor added to the logits, broadcastable to (B, heads, N, M) (e.g. a relative position bias
            (1, heads, N, M)); ``-inf`` entries mask keys. Every query must keep at least one key.
        scale: logit scale; ``d ** -0.5`` when None.
        dropout_p: dropout on the attention map (pass 0 in eval; backends draw different masks).
        qkv: for self-attention, the (B, N, 3 * heads * d) projection whose head-split views q, k and v are (q, k,
            v each heads * d channels, in that order; with the 3-d layout, its thirds), or None. It changes no value:
            in eager training the ``triton`` backend then runs on qkv itself, and its backward writes qkv's
            gradient in one buffer where autograd would stack q's, k's and v's gradients in one more pass.
        backend: ``"reference"``, ``"sdpa"`` or None for automatic choice (see :mod:`zoo.ops._dispatch`).

    Returns:
        (B, heads, N, d_v), or (B, N, heads * d_v) for token-layout inputs, in the dtype of ``q``.
    """
    key = call_key(q, k, v, num_heads, bias, scale, dropout_p, qkv, qkv_offsets(qkv, q, k, v))
    checked = validated(_OP, key)
    tokens_layout = q.ndim == 3 if checked else _check_layout(q, k, v, num_heads)
    if tokens_layout:
        q, k, v = (_split_heads(t, num_heads) for t in (q, k, v))
    if not checked:
        _check_heads_split(q, k, v)
        _check_bias(bias, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"{_OP}: dropout_p must be in [0, 1), got {dropout_p}")
        check_qkv(_OP, qkv, q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out = dispatch(_OP, backend, q, k, v, bias=bias, scale=float(scale), dropout_p=float(dropout_p), qkv=qkv,
                   key=key)
    return _merge_heads(out) if tokens_layout else out


def _check_layout(q, k, v, num_heads: int | None) -> bool:
    """True for the (B, tokens, heads * d) layout; raise on anything else than that or (B, heads, tokens, d)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim not in (3, 4):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{_OP}: {name} must be (B, heads, tokens, d) or (B, tokens, heads*d), got {got}")
    check_float_tensors(_OP, q=q, k=k, v=v)
    if len({q.ndim, k.ndim, v.ndim}) != 1:
        raise ValueError(f"{_OP}: q, k, v must use one layout, got ndims {q.ndim}, {k.ndim}, {v.ndim}")
    if q.ndim == 4:
        if num_heads is not None:
            raise ValueError(f"{_OP}: num_heads={num_heads} is only accepted with 3-d (B, tokens, heads*d) inputs")
        return False
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{_OP}: 3-d inputs need num_heads (a positive int), got {num_heads!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] % num_heads:
            raise ValueError(f"{_OP}: {name} channels {t.shape[-1]} are not divisible by num_heads={num_heads}")
    return True


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _check_heads_split(q, k, v) -> None:
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h):
        raise ValueError(f"{_OP}: q, k, v must share (B, heads); got q={tuple(q.shape)}, k={tuple(k.shape)}, "
                         f"v={tuple(v.shape)}")
    if k.shape[-1] != d:
        raise ValueError(f"{_OP}: q and k must share the head dim, got {d} and {k.shape[-1]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"{_OP}: k and v must have the same token count, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[2] == 0:
        raise ValueError(f"{_OP}: the reduced key set is empty (k has 0 tokens)")


def _check_bias(bias: torch.Tensor | None, target: tuple[int, ...]) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise ValueError(f"{_OP}: bias must be a floating-point tensor or None, got {type(bias).__name__}")
    ok = bias.ndim <= 4 and broadcasts_to(bias.shape, target)
    if not ok:
        raise ValueError(f"{_OP}: bias of shape {tuple(bias.shape)} does not broadcast to (B, heads, N, M)={target}")


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _reference(q, k, v, *, bias, scale, dropout_p, qkv=None):
    logits = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    # softmax in (at least) float32 so half-precision inputs do not lose the normaliser
    attn = logits.to(_at_least_float32(logits.dtype)).softmax(dim=-1).to(v.dtype)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


def _sdpa(q, k, v, *, bias, scale, dropout_p, qkv=None):
    mask = None if bias is None else bias.to(q.dtype)  # autocast keeps a bias parameter in float32
    return sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _sdpa_supports(q, k, v, **_) -> str | None:
    return mixed_dtypes_reason(q=q, k=k, v=v)


register_backend(_OP, "reference", _reference, priority=0)
register_backend(_OP, "sdpa", _sdpa, supports=_sdpa_supports, priority=10)
