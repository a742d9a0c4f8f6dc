"""One entry point to PyTorch's fused attention for every op's ``sdpa`` backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["sdpa", "mixed_dtypes_reason"]


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_ALL_BUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _backends_without_cudnn() -> list[SDPBackend]:
    """The SDPA backends the user left enabled, less cuDNN (math is always kept as the last resort).

    Under ``torch.compile`` the switches cannot be read (dynamo refuses non-tensor results of torch functions), so
    every backend but cuDNN is allowed there.
    """
    if torch.compiler.is_compiling():
        return _ALL_BUT_CUDNN
    enabled = [(torch.backends.cuda.flash_sdp_enabled(), SDPBackend.FLASH_ATTENTION),
               (torch.backends.cuda.mem_efficient_sdp_enabled(), SDPBackend.EFFICIENT_ATTENTION)]
    return [backend for on, backend in enabled if on] + [SDPBackend.MATH]


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on contiguous operands.

    q (..., L, E), k (..., S, E), v (..., S, Ev), attn_mask broadcastable to (..., L, S) -> (..., L, Ev).
    The memory-efficient CUDA kernel reads rows with wide vector loads: a view whose row stride is not aligned
    (a sliced head dim, a transposed bias) made it fail with "misaligned address" on an H200 (torch 2.11), so
    strided views are copied first; contiguous inputs pass through untouched.

    When a gradient is needed on CUDA the cuDNN backend is left out: its backward returns non-finite
    gradients on H100/H200 for some shapes (pytorch/pytorch#196678, seen here as NaN grads in Agent-CSWin-T's
    bf16 train step with torch 2.11), while flash, memory-efficient and math are clean on the same inputs.
    The failure needs rows whose logsumexp is below -88.7 and a key count on cuDNN's padded-tile pattern, with or
    without a mask (H200, cuDNN 9.19: 64 queries fail at keys % 128 == 64, 1 query at keys % 64 == 0; LookupViT's
    49 queries over 576 keys fail unmasked), so no shape rule is safe and training never uses cuDNN. Inference
    keeps cuDNN's fast forward. The cost: cuDNN's backward is the fastest at some shapes (H200 bf16, batch 128,
    49 -> 576 + 576 -> 49 tokens, 12 heads x 64: 1.08 ms of kernels forward and backward for both SDPA calls with
    cuDNN, 1.91 without).
    """
    q, k, v, attn_mask = _dense(q), _dense(k), _dense(v), _dense(attn_mask)
    if q.is_cuda and _needs_grad(q, k, v, attn_mask):
        with sdpa_kernel(_backends_without_cudnn()):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale)


def mixed_dtypes_reason(**operands: torch.Tensor | None) -> str | None:
    """Why SDPA cannot take these operands together (it needs one dtype), or None; None operands are skipped."""
    dtypes = {name: t.dtype for name, t in operands.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        return "SDPA needs one dtype for its operands, got " + ", ".join(f"{n}={d}" for n, d in dtypes.items())
    return None
