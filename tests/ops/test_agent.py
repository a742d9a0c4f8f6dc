"""zoo.ops.agent_attention: every backend against a float64 dense oracle, forward and backward."""
from __future__ import annotations

import pytest
import torch

from zoo.ops import agent_attention, available_backends, registered_backends
from zoo.ops._dispatch import select_backend

BACKENDS = ["reference", "sdpa"]


def _oracle(q, k, v, agent, scale, agent_bias=None, query_bias=None):
    """Agent attention written out with explicit exp / sum normalisation in float64 (independent of the op)."""
    q, k, v, agent = (t.double() for t in (q, k, v, agent))
    s1 = torch.einsum("bhad,bhmd->bham", agent, k) * scale
    if agent_bias is not None:
        s1 = s1 + agent_bias.double()
    p1 = torch.exp(s1 - s1.amax(-1, keepdim=True))
    agent_v = torch.einsum("bham,bhme->bhae", p1 / p1.sum(-1, keepdim=True), v)
    s2 = torch.einsum("bhnd,bhad->bhna", q, agent) * scale
    if query_bias is not None:
        s2 = s2 + query_bias.double()
    p2 = torch.exp(s2 - s2.amax(-1, keepdim=True))
    return torch.einsum("bhna,bhae->bhne", p2 / p2.sum(-1, keepdim=True), agent_v)


def _inputs(b=2, h=3, n=20, m=12, a=4, d=8, dv=8, dtype=torch.float32, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(device=device, dtype=dtype)

    q, k, agent = rnd(b, h, n, d), rnd(b, h, m, d), rnd(b, h, a, d)
    v = rnd(b, h, m, dv)
    agent_bias = rnd(1, h, a, m, std=0.5) if bias else None
    query_bias = rnd(1, h, n, a, std=0.5) if bias else None
    return q, k, v, agent, agent_bias, query_bias


def _assert_close(out, ref, rel):
    err = (out.double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    assert scale > 1e-3, "reference is degenerate"
    assert err <= rel * scale, f"max|diff| {err:.3e} > {rel:.1e} * {scale:.3e}"


def test_registered_backends():
    assert registered_backends("agent_attention") == ["triton", "sdpa", "reference"]
    assert set(BACKENDS) <= set(available_backends("agent_attention"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_float64_oracle(backend, bias):
    q, k, v, agent, ab, qb = _inputs(bias=bias)
    out = agent_attention(q, k, v, agent, agent_bias=ab, query_bias=qb, backend=backend)
    assert out.shape == (2, 3, 20, 8) and out.dtype == torch.float32
    _assert_close(out, _oracle(q, k, v, agent, 8 ** -0.5, ab, qb), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_broadcast_bias_and_value_dim(backend):
    # per-batch biases (B, 1, ., .), a custom scale and a value dim unlike the key dim
    q, k, v, agent, _, _ = _inputs(dv=5, a=9, m=16)
    g = torch.Generator().manual_seed(3)
    ab = torch.randn(2, 1, 9, 16, generator=g)
    qb = torch.randn(2, 3, 1, 9, generator=g)
    out = agent_attention(q, k, v, agent, scale=0.3, agent_bias=ab, query_bias=qb, backend=backend)
    assert out.shape == (2, 3, 20, 5)
    _assert_close(out, _oracle(q, k, v, agent, 0.3, ab, qb), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_float64_oracle(backend):
    leaves = [t.requires_grad_() for t in _inputs()]
    q, k, v, agent, ab, qb = leaves
    out = agent_attention(q, k, v, agent, agent_bias=ab, query_bias=qb, backend=backend)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad((out * weight).sum(), leaves)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = _oracle(*ref_leaves[:4], 8 ** -0.5, *ref_leaves[4:])
    ref_grads = torch.autograd.grad((ref * weight.double()).sum(), ref_leaves)
    for name, g, r in zip(["q", "k", "v", "agent", "agent_bias", "query_bias"], grads, ref_grads):
        assert g.shape == r.shape, name
        _assert_close(g, r, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    inputs = [t.requires_grad_() for t in _inputs(b=1, h=2, n=5, m=4, a=2, d=3, dv=3, dtype=torch.float64)]

    def fn(q, k, v, agent, ab, qb):
        return agent_attention(q, k, v, agent, agent_bias=ab, query_bias=qb, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_close_to_oracle(backend):
    q, k, v, agent, ab, qb = _inputs(dtype=torch.bfloat16)
    out = agent_attention(q, k, v, agent, agent_bias=ab, query_bias=qb, backend=backend)
    assert out.dtype == torch.bfloat16
    _assert_close(out, _oracle(q, k, v, agent, 8 ** -0.5, ab, qb), 3e-2)


def test_autocast_float32_biases():
    # models keep float32 bias parameters under autocast; both backends must accept them
    q, k, v, agent, ab, qb = _inputs()
    ref = _oracle(q, k, v, agent, 8 ** -0.5, ab, qb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [agent_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), agent.bfloat16(), agent_bias=ab,
                                query_bias=qb, backend=b) for b in BACKENDS]
    for out in outs:
        _assert_close(out, ref, 3e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_inputs_with_float32_biases(backend):
    q, k, v, agent, ab, qb = _inputs()
    low = [t.bfloat16() for t in (q, k, v, agent)]
    out = agent_attention(*low, agent_bias=ab, query_bias=qb, backend=backend)
    assert out.dtype == torch.bfloat16
    _assert_close(out, _oracle(*low, 8 ** -0.5, ab, qb), 3e-2)


def test_automatic_choice_and_env_override(monkeypatch):
    args = _inputs()[:4]
    assert select_backend("agent_attention", None, *args).name == "sdpa"
    monkeypatch.setenv("ZOO_OPS_BACKEND", "agent_attention:reference")
    assert select_backend("agent_attention", None, *args).name == "reference"


def test_dropout_only_changes_training_outputs():
    q, k, v, agent, ab, qb = _inputs()
    torch.manual_seed(0)
    dropped = agent_attention(q, k, v, agent, agent_bias=ab, query_bias=qb, dropout_p=0.5, backend="reference")
    plain = agent_attention(q, k, v, agent, agent_bias=ab, query_bias=qb, backend="reference")
    assert (dropped - plain).abs().max() > 1e-3


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.zeros(2, 20, 8)), "q must be a 4-d tensor"),
    (dict(k=torch.zeros(2, 4, 12, 8)), "share \\(B, heads\\)"),
    (dict(agent=torch.zeros(2, 3, 4, 6)), "share the head dim"),
    (dict(v=torch.zeros(2, 3, 11, 8)), "same token count"),
    (dict(agent_bias=torch.zeros(1, 3, 4, 13)), "agent_bias of shape \\(1, 3, 4, 13\\) does not broadcast"),
    (dict(query_bias=torch.zeros(1, 3, 4, 20)), "query_bias of shape"),
    (dict(dropout_p=1.0), "dropout_p"),
    (dict(v=torch.zeros(2, 3, 12, 8, dtype=torch.float64)), "share one dtype"),
    (dict(agent=torch.zeros(2, 3, 0, 8), agent_bias=None, query_bias=None),
     "agent has no tokens \\(shape \\(2, 3, 0, 8\\)\\)"),
    (dict(k=torch.zeros(2, 3, 0, 8), v=torch.zeros(2, 3, 0, 8), agent_bias=None), "k has no tokens"),
])
def test_errors_name_the_argument(bad, match):
    q, k, v, agent, ab, qb = _inputs()
    kw = dict(q=q, k=k, v=v, agent=agent, agent_bias=ab, query_bias=qb)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        agent_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("agent"), **kw)


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="not a backend of agent_attention"):
        agent_attention(*_inputs()[:4], backend="flash")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, rel", [(torch.float32, 2e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_cuda_backends_forward_backward(dtype, rel):
    # DeiT-S-like shapes: 197 queries/keys, 49 agents, 6 heads of 64
    inputs = [t.requires_grad_() for t in _inputs(b=4, h=6, n=197, m=197, a=49, d=64, dv=64, dtype=dtype,
                                                   device="cuda")]
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = _oracle(*ref_leaves[:4], 64 ** -0.5, *ref_leaves[4:])
    weight = torch.randn(ref.shape, device="cuda", dtype=torch.float64)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_leaves)
    for backend in [*BACKENDS, "triton"]:
        out = agent_attention(*inputs[:4], agent_bias=inputs[4], query_bias=inputs[5], backend=backend)
        _assert_close(out, ref, rel)
        grads = torch.autograd.grad((out * weight.to(dtype)).sum(), inputs)
        for g, r in zip(grads, ref_grads):
            _assert_close(g, r, 4 * rel)


def test_auto_choice_avoids_sdpa_for_many_keys_with_a_trainable_bias():
    from zoo.ops._dispatch import select_backend

    q, k, v, agent = (torch.randn(1, 2, n, 8) for n in (600, 600, 600, 4))
    bias = torch.randn(1, 2, 4, 600, requires_grad=True)
    pick = lambda **kw: select_backend("agent_attention", None, q, k, v, agent, scale=0.3, query_bias=None,
                                       dropout_p=0.0, **kw).name
    assert pick(agent_bias=bias) == "reference"
    assert pick(agent_bias=bias.detach()) == "sdpa"
    with torch.no_grad():
        assert pick(agent_bias=bias) == "sdpa"
    short = (t[..., :300, :] for t in (k, v))
    assert select_backend("agent_attention", None, q, *short, agent, scale=0.3, agent_bias=bias[..., :300],
                          query_bias=None, dropout_p=0.0).name == "sdpa"
    # the rule is about speed, not capability: an explicit request is served without a fallback
    assert select_backend("agent_attention", "sdpa", q, k, v, agent, scale=0.3, agent_bias=bias, query_bias=None,
                          dropout_p=0.0).name == "sdpa"


def test_auto_choice_inside_compile_with_a_trainable_bias_is_the_reference(monkeypatch):
    from zoo.ops._dispatch import select_backend

    q, k, v, agent = (torch.randn(1, 2, n, 8) for n in (50, 50, 50, 4))
    bias = torch.randn(1, 2, 4, 50, requires_grad=True)
    pick = lambda b: select_backend("agent_attention", None, q, k, v, agent, scale=0.3, agent_bias=b,
                                    query_bias=None, dropout_p=0.0).name
    assert pick(bias) == "sdpa"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert pick(bias) == "reference"
    assert pick(bias.detach()) == "sdpa"
