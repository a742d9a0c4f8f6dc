"""Bidirectional cross-attention between two token sets over one shared similarity (LookupViT's MHBC).

Two token sets, ``q`` (M tokens, e.g. LookupViT's compressed tokens) and ``k`` (N tokens, the lookup tokens), share
one similarity matrix ``S = scale * q @ k^T (+ bias)`` of shape (B, heads, M, N). It is read in both directions::

    out_q = softmax(S,   over N) @ v_k      # (B, heads, M, d_v): the q tokens gather from the k tokens
    out_k = softmax(S^T, over M) @ v_q      # (B, heads, N, d_v): the k tokens read back from the q tokens

This is the semantics of the LookupViT re-implementation our parity fixture comes from (lucidrains/vit-pytorch
``look_vit.py``, ``vit-pytorch==1.26.11``): the reverse direction reuses the *pre-softmax* similarities, transposed,
and takes its own softmax over the compressed axis; only ``v_q`` is new (LookupViT computes it from the compressed
tokens *after* their self-attention and MLP, so the two directions are usually requested in two calls on the same
``q``/``k``). No second q/k projection exists for the reverse direction.

Because ``S^T = scale * k @ q^T``, each direction is an ordinary attention with the roles of q and k swapped, so a
fused kernel can serve both without materialising ``S``.

Backends:
    ``reference``: explicit ``S`` once, two softmaxes (over N and over M), plain PyTorch, the definition.
    ``sdpa``: one ``F.scaled_dot_product_attention`` per requested direction (``SDPA(q, k, v_k)`` and
        ``SDPA(k, q, v_q)`` with the transposed bias); any device, differentiable.
    ``triton``: when ``v_q`` is given, M <= 256, no bias, no dropout: the reverse direction (N tokens over at most
        256 keys) in the short-key kernels of :mod:`zoo.ops.triton.short_keys`, ``out_q`` through SDPA; chosen on
        CUDA when it can serve the call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._sdpa import mixed_dtypes_reason, sdpa
from ._checks import broadcasts_to, check_float_tensors
from ._dispatch import call_key, dispatch, register_backend, validated

__all__ = ["cross_attention"]

_OP = "cross_attention"


def cross_attention(q: torch.Tensor, k: torch.Tensor, v_k: torch.Tensor | None = None,
                    v_q: torch.Tensor | None = None, *, bias: torch.Tensor | None = None, scale: float | None = None,
                    dropout_p: float = 0.0,
                    backend: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both directions of a cross-attention over the shared similarity ``scale * q @ k^T + bias``.

    Args:
        q: tokens of the first set, (B, heads, M, d).
        k: tokens of the second set, (B, heads, N, d).
        v_k: values on the second set, (B, heads, N, d_v); gives ``out_q`` (q reads from k). None skips it.
        v_q: values on the first set, (B, heads, M, d_v2); gives ``out_k`` (k reads from q, softmax over M).
            None skips it. At least one of ``v_k``, ``v_q`` is required.
        bias: float tensor added to the similarity, broadcastable to (B, heads, M, N); the reverse direction uses
            its transpose. ``-inf`` masks a pair in both directions (keep at least one finite entry per row and
            per column that is read).
        scale: similarity scale; ``d ** -0.5`` when None.
        dropout_p: dropout on each attention map (pass 0 in eval; backends draw different masks).
        backend: ``"reference"``, ``"sdpa"`` or None for automatic choice (see :mod:`zoo.ops._dispatch`).

    Returns:
        ``(out_q, out_k)``: (B, heads, M, d_v) and (B, heads, N, d_v2) in the dtype of ``q``; the direction whose
        values were not given is None.
    """
    key = call_key(q, k, v_k, v_q, bias, scale, dropout_p)
    if not validated(_OP, key):
        _check_inputs(q, k, v_k, v_q, bias, dropout_p)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return dispatch(_OP, backend, q, k, v_k, v_q, bias=bias, scale=float(scale), dropout_p=float(dropout_p),
                    key=key)


def _shape(t) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_inputs(q, k, v_k, v_q, bias, dropout_p) -> None:
    for name, t in (("q", q), ("k", k), ("v_k", v_k), ("v_q", v_q)):
        if (t is not None or name in ("q", "k")) and (not isinstance(t, torch.Tensor) or t.ndim != 4):
            raise ValueError(f"{_OP}: {name} must be a 4-d tensor (B, heads, tokens, dim), got {_shape(t)}")
    if v_k is None and v_q is None:
        raise ValueError(f"{_OP}: give v_k (q reads from k), v_q (k reads from q) or both; both are None")
    check_float_tensors(_OP, q=q, k=k)
    check_float_tensors(_OP, same_dtype=False, v_k=v_k, v_q=v_q)  # the outputs follow their values' dtypes
    b, h, m, d = q.shape
    n = k.shape[2]
    if k.shape[:2] != (b, h) or k.shape[-1] != d:
        raise ValueError(f"{_OP}: k must be (B, heads, N, d) with q's B, heads and d; got q={tuple(q.shape)}, "
                         f"k={tuple(k.shape)}")
    for name, t, tokens, side in (("v_k", v_k, n, "N (k's tokens)"), ("v_q", v_q, m, "M (q's tokens)")):
        if t is not None and (t.shape[:2] != (b, h) or t.shape[2] != tokens):
            raise ValueError(f"{_OP}: {name} must be (B, heads, {side}, d_v) = ({b}, {h}, {tokens}, d_v), "
                             f"got {tuple(t.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise ValueError(f"{_OP}: bias must be a floating-point tensor or None, got {type(bias).__name__}")
        ok = bias.ndim <= 4 and broadcasts_to(bias.shape, (b, h, m, n))
        if not ok:
            raise ValueError(f"{_OP}: bias of shape {tuple(bias.shape)} does not broadcast to (B, heads, M, N)="
                             f"{(b, h, m, n)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{_OP}: dropout_p must be in [0, 1), got {dropout_p}")


def _attend(probs: torch.Tensor, values: torch.Tensor, dropout_p: float) -> torch.Tensor:
    probs = probs.to(values.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ values


def _reference(q, k, v_k, v_q, *, bias, scale, dropout_p):
    sim = (q * scale) @ k.transpose(-2, -1)  # (B, h, M, N), shared by both directions
    if bias is not None:
        sim = sim + bias
    # both softmaxes in (at least) float32 so half-precision inputs keep their normalisers
    sim = sim.to(torch.promote_types(sim.dtype, torch.float32))
    out_q = _attend(sim.softmax(dim=-1), v_k, dropout_p) if v_k is not None else None
    out_k = _attend(sim.softmax(dim=-2).transpose(-2, -1), v_q, dropout_p) if v_q is not None else None
    return out_q, out_k


def _sdpa(q, k, v_k, v_q, *, bias, scale, dropout_p):
    mask = None if bias is None else bias.to(q.dtype)  # autocast keeps a bias parameter in float32
    out_q = out_k = None
    if v_k is not None:
        out_q = sdpa(q, k, v_k, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    if v_q is not None:
        # a transposed (non-contiguous) float mask crashes the memory-efficient CUDA kernel ("misaligned
        # address", seen on an H200 with torch 2.11), so hand SDPA a contiguous copy
        mask_t = None if mask is None else mask.transpose(-2, -1).contiguous()
        out_k = sdpa(k, q, v_q, attn_mask=mask_t, dropout_p=dropout_p, scale=scale)
    return out_q, out_k


def _sdpa_supports(q, k, v_k, v_q, **_) -> str | None:
    return mixed_dtypes_reason(q=q, k=k, v_k=v_k, v_q=v_q)


register_backend(_OP, "reference", _reference, priority=0)
register_backend(_OP, "sdpa", _sdpa, supports=_sdpa_supports, priority=10)
