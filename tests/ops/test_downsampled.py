"""downsampled_attention: global attention over reduced keys/values (PVT SRA, MAFormer GLD) vs float64 oracles."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.ops import downsampled_attention

BACKENDS = ["reference", "sdpa"]


def _qkv(randn, b=2, h=2, n=35, m=9, d=8, dv=6, **kw):
    return randn(b, h, n, d, seed=1, **kw), randn(b, h, m, d, seed=2, **kw), randn(b, h, m, dv, seed=3, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_oracle(randn, oracle, assert_close, backend, with_bias):
    q, k, v = _qkv(randn)
    bias = randn(1, 2, 35, 9, seed=5) if with_bias else None
    out = downsampled_attention(q, k, v, bias=bias, scale=0.2, backend=backend)
    assert out.shape == (2, 2, 35, 6)
    assert_close(out, oracle(q, k, v, bias=bias, scale=0.2), atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_float64_oracle(randn, oracle, grads, assert_close, backend):
    q, k, v = _qkv(randn, requires_grad=True)
    bias = randn(2, 1, 35, 9, seed=6, requires_grad=True)
    got = grads(downsampled_attention(q, k, v, bias=bias, backend=backend), [q, k, v, bias])
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    want = grads(oracle(*leaves[:3], bias=leaves[3]), leaves)
    for name, g, w in zip(["q", "k", "v", "bias"], got, want):
        assert_close(g, w, atol=1e-5, rtol=1e-5, what=f"grad {name}")


def test_reference_gradcheck_float64(randn):
    q, k, v = _qkv(randn, b=1, n=6, m=3, d=4, dv=3, dtype=torch.float64, requires_grad=True)
    bias = randn(1, 2, 6, 3, seed=4, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, bias: downsampled_attention(q, k, v, bias=bias, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pvt_spatial_reduction_attention_is_one_call(randn, assert_close, backend):
    """PVT's SRA written out (official layout) equals the op on the token layout."""
    torch.manual_seed(0)
    b, hw, c, heads, sr = 2, (8, 8), 32, 4, 2
    x = randn(b, hw[0] * hw[1], c, seed=10)
    q_lin, kv_lin = torch.nn.Linear(c, c), torch.nn.Linear(c, 2 * c)
    reduce, norm = torch.nn.Conv2d(c, c, sr, sr), torch.nn.LayerNorm(c)
    x_red = norm(reduce(x.transpose(1, 2).reshape(b, c, *hw)).flatten(2).transpose(1, 2))   # (B, M, C)
    kv = kv_lin(x_red)
    # official: reshape to heads, explicit softmax
    q_h = q_lin(x).reshape(b, -1, heads, c // heads).permute(0, 2, 1, 3)
    kv_h = kv.reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = (q_h @ kv_h[0].transpose(-2, -1)) * (c // heads) ** -0.5
    want = (attn.softmax(-1) @ kv_h[1]).transpose(1, 2).reshape(b, -1, c)
    got = downsampled_attention(q_lin(x), *kv.chunk(2, dim=-1), num_heads=heads, backend=backend)
    assert got.shape == (b, 64, c)
    assert_close(got, want, atol=2e-6)


def test_dropout_is_applied_only_when_asked(randn):
    q, k, v = _qkv(randn)
    base = downsampled_attention(q, k, v, backend="reference")
    torch.manual_seed(3)
    dropped = downsampled_attention(q, k, v, dropout_p=0.5, backend="reference")
    assert not torch.allclose(base, dropped)
    torch.manual_seed(3)
    expected = F.dropout(((q * 8 ** -0.5) @ k.transpose(-2, -1)).softmax(-1), 0.5) @ v
    assert torch.allclose(dropped, expected, atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda q, k, v: downsampled_attention(q, k, v, num_heads=2), "only accepted with 3-d"),
    (lambda q, k, v: downsampled_attention(q[0], k[0], v[0]), "need num_heads"),
    (lambda q, k, v: downsampled_attention(q[0], k[0], v[0], num_heads=3), "not divisible"),
    (lambda q, k, v: downsampled_attention(q, k[:, :, :, :4], v), "head dim"),
    (lambda q, k, v: downsampled_attention(q, k, v[:, :, :3]), "same token count"),
    (lambda q, k, v: downsampled_attention(q, k, v, bias=torch.ones(35, 8)), "does not broadcast"),
    (lambda q, k, v: downsampled_attention(q, k, v[0]), "one layout"),
])
def test_argument_errors(randn, call, match):
    q, k, v = _qkv(randn)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_qkv_changes_no_value_and_must_hold_the_views(backend):
    b, heads, n, d = 2, 3, 10, 8
    qkv = torch.randn(b, n, 3 * heads * d, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.view(b, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    g = torch.randn(b, heads, n, d, dtype=torch.float64)
    with_qkv = downsampled_attention(q, k, v, qkv=qkv, backend=backend)
    without = downsampled_attention(q, k, v, backend=backend)
    assert torch.equal(with_qkv, without)
    assert torch.equal(*(torch.autograd.grad(out, qkv, g)[0] for out in (with_qkv, without)))
    tokens = downsampled_attention(*qkv.chunk(3, dim=-1), num_heads=heads, qkv=qkv, backend=backend)
    assert torch.equal(tokens, without.transpose(1, 2).reshape(b, n, heads * d))
    with pytest.raises(ValueError, match=r"qkv must be the \(B, N, 3 \* heads \* d\) = \(2, 10, 72\)"):
        downsampled_attention(q, k, v, qkv=qkv[:, :, :48])
    with pytest.raises(ValueError, match=r"k is not the head-split view of qkv's channels \[24, 48\)"):
        downsampled_attention(q, v, k, qkv=qkv)  # k and v swapped
    with pytest.raises(ValueError, match="q is not the head-split view"):
        downsampled_attention(q.clone(), k, v, qkv=qkv)


# --- GPU --------------------------------------------------------------------------------------------------------------

TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gpu_sdpa_matches_reference(randn, assert_close, dtype, with_bias):
    # PVT-S stage 1: 56x56 queries, 7x7 reduced keys, 1 head of 64
    q, k, v = _qkv(randn, b=16, h=1, n=3136, m=49, d=64, dv=64, dtype=dtype, device="cuda", requires_grad=True)
    bias = randn(1, 1, 3136, 49, seed=9, dtype=dtype, device="cuda") if with_bias else None
    out = downsampled_attention(q, k, v, bias=bias, backend="sdpa")
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = downsampled_attention(*leaves, bias=None if bias is None else bias.float(), backend="reference")
    tol = TOL[dtype]
    assert_close(out, ref, atol=tol, rtol=tol, what=f"sdpa fwd {dtype}")
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    want = torch.autograd.grad(ref, leaves, g)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, atol=4 * tol, rtol=tol, what=f"sdpa grad {name} {dtype}")
