"""The shared SDPA entry point: contiguous operands, and no cuDNN backward on CUDA."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zoo.ops._sdpa import _SDPA_KERNEL_TRACED, _backends_without_cudnn, _rows_aligned, sdpa


def test_strided_operands_match_dense_attention(randn, assert_close):
    q, k, v = (randn(2, 5, 3, 8, seed=s, requires_grad=True) for s in (1, 2, 3))
    bias = randn(2, 3, 6, 5, seed=4).transpose(-1, -2)  # (2, 3, 5, 6): a strided float mask
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (2, 3, L, 8) views
    out = sdpa(qt, kt, vt, attn_mask=bias[..., :5])
    ref = torch.softmax(qt @ kt.transpose(-1, -2) / math.sqrt(8) + bias[..., :5], -1) @ vt
    assert_close(out, ref, atol=1e-5, what="strided sdpa")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_aligned_head_views_pass_through_and_misaligned_rows_are_copied():
    qkv = torch.randn(2, 10, 3, 4, 8, dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, 8)
    q, k, v = qkv.unbind(0)
    for t in (q, k, v):  # a fused projection's heads: rows 16-byte aligned, the copy is skipped
        assert _rows_aligned(t).data_ptr() == t.data_ptr()
    flat = torch.randn(2, 4, 10, 12, dtype=torch.bfloat16)
    shifted, transposed = flat[..., 1:9], flat.transpose(-1, -2)  # offset 2 bytes; unit stride lost
    for t in (shifted, transposed):
        out = _rows_aligned(t)
        assert out.data_ptr() != t.data_ptr() and out.is_contiguous() and torch.equal(out, t)
    narrow = flat[..., :8]  # row stride 12 elements = 24 bytes: the next row is off the boundary
    assert _rows_aligned(narrow).is_contiguous()


def test_head_views_check_traces_in_one_graph():
    """The layout check reads only strides under dynamo (a storage offset would break the graph), and offsets
    under make_fx (fake tensors have no address)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def heads(x):
        q, k, v = x.reshape(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return tuple(_rows_aligned(t) for t in (q, k, v[..., 1:]))

    x = torch.randn(2, 10, 96)
    for traced in (torch.compile(heads, fullgraph=True, backend="eager"), make_fx(heads, tracing_mode="fake")(x)):
        for got, want in zip(traced(x), heads(x)):
            torch.testing.assert_close(got, want)


def test_backends_without_cudnn_follow_the_user_switches():
    assert torch.nn.attention.SDPBackend.CUDNN_ATTENTION not in _backends_without_cudnn()
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        assert torch.nn.attention.SDPBackend.FLASH_ATTENTION not in _backends_without_cudnn()
        assert torch.nn.attention.SDPBackend.MATH in _backends_without_cudnn()
    finally:
        torch.backends.cuda.enable_flash_sdp(True)


@pytest.mark.skipif(not _SDPA_KERNEL_TRACED, reason="torch 2.5's dynamo cannot trace sdpa_kernel")
def test_backend_choice_traces_under_compile():
    """dynamo cannot read the SDPA switches; the compiled path must still trace without a graph break."""
    def attend(q):
        with torch.nn.attention.sdpa_kernel(_backends_without_cudnn()):
            return F.scaled_dot_product_attention(q, q, q)

    q = torch.randn(1, 2, 8, 4)
    out = torch.compile(attend, fullgraph=True, backend="eager")(q)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))


def _low_logsumexp_inputs(queries: int, keys: int, dim: int = 64, heads: int = 2, seed: int = 1):
    """bf16 CUDA q (1, heads, queries, dim), k and v (1, heads, keys, dim) whose every logit is about -120: each
    row's logsumexp is below -88.7, where cuDNN's backward overflows on its padded key columns."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, queries, dim, generator=gen) * 0.1
    k = torch.randn(1, heads, keys, dim, generator=gen) * 0.1
    v = torch.randn(1, heads, keys, dim, generator=gen)
    q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(dim)
    return [t.cuda().bfloat16() for t in (q, k, v)]


def _cudnn_nan_case(length: int = 704, dim: int = 64):
    """Inputs on which cuDNN's SDPA backward returns NaN grad_q on H100/H200 (pytorch/pytorch#196678):
    an explicit mask, length % 128 == 64, every row's logsumexp below -88.7."""
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    return _low_logsumexp_inputs(length, length, dim, heads=1, seed=0), mask.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_training_gradients_stay_finite_where_cudnn_fails(compiled):
    (q, k, v), mask = _cudnn_nan_case()
    for t in (q, k, v):
        t.requires_grad_(True)
    fn = torch.compile(sdpa, fullgraph=True) if compiled else sdpa
    out = fn(q, k, v, attn_mask=mask)
    out.backward(torch.ones_like(out))
    for name, t in zip("qkv", (q, k, v)):
        assert torch.isfinite(t.grad).all(), f"grad_{name} is not finite"
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        qd, kd, vd = (t.detach().float().requires_grad_(True) for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)
        ref.backward(torch.ones_like(ref))
    # feature 0 of grad_q is a sum that cancels exactly (k's -960 entry times sum_j dS_ij = 0): bf16 noise only
    got, want = q.grad.float()[..., 1:], qd.grad[..., 1:]
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.05, f"grad_q differs from float32 math attention by {rel:.3g} (relative)"


def test_mixed_dtypes_reason_names_each_operand():
    from zoo.ops._sdpa import mixed_dtypes_reason

    q = torch.randn(1, 2, 3)
    assert mixed_dtypes_reason(q=q, k=q, v=None) is None
    reason = mixed_dtypes_reason(q=q, k=q.half())
    assert "q=torch.float32" in reason and "k=torch.float16" in reason


@pytest.mark.gpu
@pytest.mark.parametrize("queries, keys", [(49, 576), (64, 192)])
def test_gpu_unmasked_training_gradients_stay_finite_where_cudnn_fails(queries, keys):
    """No mask is needed for cuDNN's failure: on the H200 (torch 2.11, cuDNN 9.19) plain SDPA returned non-finite
    grad_q at 49 queries over 576 keys (LookupViT's cross-attention shape) and at 64 over 192. Through the ops
    (cross_attention's sdpa backend, the shared entry point) the gradients are finite and equal float32 math's."""
    from zoo.ops import cross_attention

    q, k, v = (t.requires_grad_(True) for t in _low_logsumexp_inputs(queries, keys))
    out, _ = cross_attention(q, k, v_k=v)
    out.backward(torch.ones_like(out))
    qd, kd, vd = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(qd, kd, vd)
    ref.backward(torch.ones_like(ref))
    # feature 0 of grad_q cancels exactly (see the masked case above): compare the others
    for name, got, want in (("q", q.grad[..., 1:], qd.grad[..., 1:]), ("k", k.grad, kd.grad), ("v", v.grad, vd.grad)):
        assert torch.isfinite(got).all(), f"grad_{name} is not finite"
        rel = ((got.float() - want).norm() / want.norm()).item()
        assert rel < 0.05, f"grad_{name} differs from float32 math attention by {rel:.3g} (relative)"
