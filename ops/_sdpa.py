"""One entry point to PyTorch's fused attention for every op's ``sdpa`` backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sdpa"]


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on contiguous operands.

    q (..., L, E), k (..., S, E), v (..., S, Ev), attn_mask broadcastable to (..., L, S) -> (..., L, Ev).
    The memory-efficient CUDA kernel reads rows with wide vector loads: a view whose row stride is not aligned
    (a sliced head dim, a transposed bias) made it fail with "misaligned address" on an H200 (torch 2.11), so
    strided views are copied first; contiguous inputs pass through untouched.
    """
    return F.scaled_dot_product_attention(_dense(q), _dense(k), _dense(v), attn_mask=_dense(attn_mask),
                                          dropout_p=dropout_p, is_causal=is_causal, scale=scale)
