"""One entry point to PyTorch's fused attention for every op's ``sdpa`` backend."""
from __future__ import annotations

import torch
import torch._dynamo
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["sdpa", "mixed_dtypes_reason"]


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_ALL_BUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# Whether dynamo traces ``sdpa_kernel``: torch 2.5's breaks the graph there, so its compiled training code keeps
# PyTorch's own choice of backend (cuDNN included)
_SDPA_KERNEL_TRACED = hasattr(getattr(torch._dynamo, "variables", None), "SDPAKernelVariable")


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


_ALIGN_BYTES = 16  # the widest vector load of the fused kernels


def _aligned(t: torch.Tensor) -> bool:
    """Whether every row of ``t`` starts on a 16-byte boundary: unit last stride, other strides and address aligned.

    The address is read as the storage offset (a storage starts on an allocator boundary; fake tensors under
    ``make_fx`` have offsets but no addresses). Under ``torch.compile`` even that would break the graph: only the
    strides are checked there, and inductor's SDPA lowering copies an operand it finds misaligned.
    """
    step = max(1, _ALIGN_BYTES // t.element_size())
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return False
    if any(size > 1 and stride % step for size, stride in zip(t.shape[:-1], t.stride()[:-1])):
        return False
    return torch.compiler.is_compiling() or t.storage_offset() % step == 0


def _rows_aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or _aligned(t) else t.contiguous()


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on operands laid out for its fused kernels.

    q (..., L, E), k (..., S, E), v (..., S, Ev), attn_mask broadcastable to (..., L, S) -> (..., L, Ev).
    The memory-efficient CUDA kernel reads rows with wide vector loads: a view whose row stride is not aligned
    (a sliced head dim, a transposed bias) made it fail with "misaligned address" on an H200 (torch 2.11), so
    strided operands are copied first. Without a gradient on CUDA, q, k and v are copied only when a row would not
    start on a 16-byte boundary: aligned views such as the heads of a fused qkv projection
    (``qkv.permute(2, 0, 3, 1, 4).unbind(0)``) pass through as they are (their 42 copy kernels took some 0.6 ms of
    a compiled VOLO-D1 batch's 10.1 ms of kernels, H200 bf16 batch 128). With a gradient every strided operand is
    copied: the flash backward reads and writes dense tensors faster (VOLO-D1's heads, batch 64: 265 against 312 µs
    forward and backward), and the strided views added some 70 eager copies to a compiled VOLO-D1 training step. On
    CPU every strided operand is copied too, so that inference and training calls there compute the same bits.

    When a gradient is needed on CUDA the cuDNN backend is left out: its backward returns non-finite
    gradients on H100/H200 for some shapes (pytorch/pytorch#196678, seen here as NaN grads in Agent-CSWin-T's
    bf16 train step with torch 2.11), while flash, memory-efficient and math are clean on the same inputs.
    The failure needs rows whose logsumexp is below -88.7 and a key count on cuDNN's padded-tile pattern, with or
    without a mask (H200, cuDNN 9.19: 64 queries fail at keys % 128 == 64, 1 query at keys % 64 == 0; LookupViT's
    49 queries over 576 keys fail unmasked), so no shape rule is safe and training never uses cuDNN (compiled
    training too, where dynamo traces the switch: not with torch 2.5). Inference
    keeps cuDNN's fast forward. The cost: cuDNN's backward is the fastest at some shapes (H200 bf16, batch 128,
    49 -> 576 + 576 -> 49 tokens, 12 heads x 64: 1.08 ms of kernels forward and backward for both SDPA calls with
    cuDNN, 1.91 without).
    """
    training = _needs_grad(q, k, v, attn_mask)
    operand = _rows_aligned if q.is_cuda and not training else _dense
    q, k, v, attn_mask = operand(q), operand(k), operand(v), _dense(attn_mask)
    if q.is_cuda and training and (_SDPA_KERNEL_TRACED or not torch.compiler.is_compiling()):
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
