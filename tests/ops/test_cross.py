"""cross_attention: both directions over one shared similarity (LookupViT MHBC) vs float64 oracles and backends."""
from __future__ import annotations

import warnings

import pytest
import torch

from zoo.ops import available_backends, cross_attention
from zoo.ops._dispatch import select_backend
from zoo.ops.triton import interpreter_requested

BACKENDS = ["reference", "sdpa"]


def _inputs(randn, b=2, h=3, m=5, n=17, d=8, dv=6, **kw):
    return {"q": randn(b, h, m, d, seed=1, **kw), "k": randn(b, h, n, d, seed=2, **kw),
            "v_k": randn(b, h, n, dv, seed=3, **kw), "v_q": randn(b, h, m, dv + 1, seed=4, **kw)}


def _lookvit_oracle(q, k, v_k, v_q, bias=None, scale=None):
    """float64, written like the LookupViT re-implementation: scale q, S = q k^T, softmax(S), softmax(S^T)."""
    q, k, v_k, v_q = (t.double() for t in (q, k, v_k, v_q))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sim = torch.einsum("bhid,bhjd->bhij", q * scale, k)
    if bias is not None:
        sim = sim + bias.double()
    forward = torch.einsum("bhij,bhjd->bhid", torch.exp(sim) / torch.exp(sim).sum(-1, keepdim=True), v_k)
    sim_t = sim.transpose(-2, -1)
    reverse = torch.einsum("bhji,bhid->bhjd", torch.exp(sim_t) / torch.exp(sim_t).sum(-1, keepdim=True), v_q)
    return forward, reverse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_both_directions_match_float64_oracle(randn, assert_close, backend, with_bias):
    x = _inputs(randn)
    bias = randn(1, 3, 5, 17, seed=7) if with_bias else None
    out_q, out_k = cross_attention(**x, bias=bias, scale=0.3, backend=backend)
    want_q, want_k = _lookvit_oracle(**x, bias=bias, scale=0.3)
    assert out_q.shape == (2, 3, 5, 6) and out_k.shape == (2, 3, 17, 7)
    assert_close(out_q, want_q, atol=2e-6, rtol=1e-6, what="q <- k")
    assert_close(out_k, want_k, atol=2e-6, rtol=1e-6, what="k <- q")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_direction_at_a_time_equals_both(randn, assert_close, backend):
    # LookupViT asks for the reverse direction later, with values computed after the forward direction
    x = _inputs(randn)
    both = cross_attention(**x, backend=backend)
    only_q = cross_attention(x["q"], x["k"], v_k=x["v_k"], backend=backend)
    only_k = cross_attention(x["q"], x["k"], v_q=x["v_q"], backend=backend)
    assert only_q[1] is None and only_k[0] is None
    assert_close(only_q[0], both[0], atol=1e-6)
    assert_close(only_k[1], both[1], atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_float64_oracle(randn, grads, assert_close, backend):
    x = _inputs(randn, requires_grad=True)
    bias = randn(2, 1, 5, 17, seed=8, requires_grad=True)
    out_q, out_k = cross_attention(**x, bias=bias, backend=backend)
    loss_out = torch.cat([out_q.flatten(), out_k.flatten()])
    got = grads(loss_out, [*x.values(), bias])
    x64 = {name: t.detach().double().requires_grad_() for name, t in x.items()}
    bias64 = bias.detach().double().requires_grad_()
    want_q, want_k = _lookvit_oracle(**x64, bias=bias64)
    want = grads(torch.cat([want_q.flatten(), want_k.flatten()]), [*x64.values(), bias64])
    for name, g, w in zip([*x, "bias"], got, want):
        assert_close(g, w, atol=1e-5, rtol=1e-5, what=f"grad {name}")


def test_reference_gradcheck_float64(randn):
    x = _inputs(randn, b=1, h=2, m=3, n=5, d=4, dv=2, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v_k, v_q: cross_attention(q, k, v_k, v_q, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(x.values()))


def test_matches_lookupvit_module_semantics(randn, assert_close):
    """The op reproduces the two attention layers of vit-pytorch's LookViT (shared pre-softmax similarities)."""
    torch.manual_seed(0)
    b, m, n, dim, heads, dh = 2, 4, 16, 32, 2, 16
    tokens, highres = randn(b, m, dim, seed=11), randn(b, n, dim, seed=12)
    to_q, to_k, to_v, to_v_rev = (torch.nn.Linear(dim, heads * dh, bias=False) for _ in range(4))
    split = lambda t: t.view(b, -1, heads, dh).transpose(1, 2)  # noqa: E731
    q, k, v = split(to_q(tokens)), split(to_k(highres)), split(to_v(highres))
    tokens_after = tokens * 1.5 + 0.25  # stands for the compressed tokens after MHSA + MLP
    v_rev = split(to_v_rev(tokens_after))
    # the module's computation, written out
    sim = (q * dh ** -0.5) @ k.transpose(-1, -2)
    fwd = sim.softmax(-1) @ v
    rev = sim.transpose(-1, -2).softmax(-1) @ v_rev
    out_q, _ = cross_attention(q, k, v_k=v)
    _, out_k = cross_attention(q, k, v_q=v_rev)
    assert_close(out_q, fwd, atol=1e-6)
    assert_close(out_k, rev, atol=1e-6)


def test_sdpa_is_the_cpu_default_and_mixed_dtypes_fall_back(randn, assert_close):
    assert "sdpa" in available_backends("cross_attention")
    x = _inputs(randn)
    if not interpreter_requested():  # the triton backend (CUDA, or CPU under the interpreter) declines plain CPU
        assert select_backend("cross_attention", None, x["q"], x["k"], x["v_k"], x["v_q"], bias=None, scale=0.5,
                              dropout_p=0.0).name == "sdpa"
    x["v_q"] = x["v_q"].double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out_q, out_k = cross_attention(**x, backend="sdpa")  # sdpa refuses mixed dtypes -> reference
    assert out_k.dtype == torch.float64 and torch.isfinite(out_q).all()


@pytest.mark.parametrize("change,match", [
    (dict(v_k=None, v_q=None), "both are None"),
    (dict(k="k3d"), "k must be a 4-d"),
    (dict(v_k="short"), "v_k must be"),
    (dict(v_q="short"), "v_q must be"),
    (dict(bias="bad"), "does not broadcast"),
    (dict(dropout_p=-0.1), "dropout_p"),
])
def test_argument_errors(randn, change, match):
    x = _inputs(randn)
    extra = {}
    for name, value in change.items():
        if value == "k3d":
            x["k"] = x["k"][0]
        elif value == "short":
            x[name] = x[name][:, :, :2]
        elif value == "bad":
            extra["bias"] = randn(5, 5, seed=3)
        elif name == "dropout_p":
            extra["dropout_p"] = value
        else:
            x[name] = value
    with pytest.raises(ValueError, match=match):
        cross_attention(**x, **extra)


# --- GPU --------------------------------------------------------------------------------------------------------------

TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_sdpa_matches_reference(randn, assert_close, dtype):
    x = _inputs(randn, b=8, h=12, m=49, n=576, d=64, dv=64, dtype=dtype, device="cuda", requires_grad=True)
    x["v_q"] = x["v_q"][..., :64].detach().requires_grad_()
    out = cross_attention(**x, backend="sdpa")
    x32 = {name: t.detach().float().requires_grad_() for name, t in x.items()}
    ref = cross_attention(**x32, backend="reference")
    tol = TOL[dtype]
    for a, b in zip(out, ref):
        assert_close(a, b, atol=tol, rtol=tol, what=f"sdpa fwd {dtype}")
    g = [torch.randn_like(r) for r in ref]
    got = torch.autograd.grad(out, list(x.values()), [t.to(dtype) for t in g])
    want = torch.autograd.grad(ref, list(x32.values()), g)
    for name, a, b in zip(x, got, want):
        assert_close(a, b, atol=4 * tol, rtol=tol, what=f"sdpa grad {name} {dtype}")
