"""Backend dispatch: discovery, the ZOO_OPS_BACKEND override, fallback with a warning, errors, compile, autocast."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import zoo.ops as ops
from zoo.ops import _dispatch

MY_OPS = ["downsampled_attention", "cross_attention", "masked_attention", "neighborhood_attention"]


@pytest.fixture
def toy_op(monkeypatch):
    """A throwaway op with three backends that record their calls; removed from the registry afterwards."""
    monkeypatch.setattr(_dispatch, "_REGISTRY", dict(_dispatch._REGISTRY))
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    calls = []

    def make(name):
        def fn(x):
            calls.append(name)
            return x * 2.0
        return fn

    ops.register_backend("toy", "reference", make("reference"), priority=0)
    ops.register_backend("toy", "fast", make("fast"), priority=10,
                         supports=lambda x: None if x.dtype == torch.float32 else f"dtype {x.dtype} is not float32")
    ops.register_backend("toy", "missing", make("missing"), priority=20, available=lambda: "libmissing not installed")
    return calls


@pytest.mark.parametrize("op", MY_OPS)
def test_every_op_has_its_reference_and_is_exported(op):
    assert "reference" in ops.available_backends(op)
    assert ops.registered_backends(op)[-1] == "reference"  # lowest priority: the definition, the last resort
    assert callable(getattr(ops, op))


def test_available_backends_lists_only_usable_ones_by_priority(toy_op):
    assert ops.registered_backends("toy") == ["missing", "fast", "reference"]
    assert ops.available_backends("toy") == ["fast", "reference"]


def test_automatic_choice_takes_the_best_backend_that_supports_the_input(toy_op):
    x = torch.randn(3)
    assert torch.equal(ops.dispatch("toy", None, x), x * 2)
    ops.dispatch("toy", None, x.double())
    assert toy_op == ["fast", "reference"]


def test_prefer_rule_steers_only_the_automatic_choice(toy_op, monkeypatch):
    # a speed rule on "fast": for inputs longer than 4 the reference is faster
    fast = _dispatch._REGISTRY["toy"]["fast"]
    ops.register_backend("toy", "fast", fast.fn, supports=fast.supports, priority=10,
                         prefer=lambda x: "reference is faster above 4 elements" if x.numel() > 4 else None)
    ops.dispatch("toy", None, torch.randn(3))
    ops.dispatch("toy", None, torch.randn(8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit request is served, no fallback warning
        ops.dispatch("toy", "fast", torch.randn(8))
    assert toy_op == ["fast", "reference", "fast"]
    # when the faster backend cannot serve the input, the slower one still runs
    monkeypatch.setitem(_dispatch._REGISTRY, "toy", {"fast": _dispatch._REGISTRY["toy"]["fast"]})
    ops.dispatch("toy", None, torch.randn(8))
    assert toy_op[-1] == "fast"


def test_env_override_selects_a_backend(toy_op, monkeypatch):
    monkeypatch.setenv("ZOO_OPS_BACKEND", "window_attention:sdpa, toy:reference")
    ops.dispatch("toy", None, torch.randn(3))
    assert toy_op == ["reference"]
    ops.dispatch("toy", "fast", torch.randn(3))  # the argument wins over the environment
    assert toy_op == ["reference", "fast"]


def test_env_override_on_a_real_op(randn, monkeypatch):
    q, k, v = randn(1, 2, 9, 8, seed=1), randn(1, 2, 4, 8, seed=2), randn(1, 2, 4, 8, seed=3)
    monkeypatch.setenv("ZOO_OPS_BACKEND", "downsampled_attention:reference")
    assert _dispatch.select_backend("downsampled_attention", None, q, k, v).name == "reference"
    monkeypatch.setenv("ZOO_OPS_BACKEND", "downsampled_attention:sdpa")
    assert _dispatch.select_backend("downsampled_attention", None, q, k, v).name == "sdpa"


def test_backend_that_cannot_serve_warns_once_and_falls_back(toy_op):
    x = torch.randn(3, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"toy: backend 'fast' cannot serve this input \(dtype torch.float64"):
        out = ops.dispatch("toy", "fast", x)
    assert torch.equal(out, x * 2) and toy_op == ["reference"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.dispatch("toy", "fast", x)  # same reason: no second warning
    with pytest.warns(UserWarning, match="libmissing not installed"):
        ops.dispatch("toy", "missing", torch.randn(3))


def test_fallback_on_a_real_op_gives_reference_numbers(randn, assert_close):
    # flex has no CPU backward: asking for it while training must still give the reference's values and gradients
    q, k, v = (randn(1, 2, 6, 6, 16, seed=s, requires_grad=True) for s in (1, 2, 3))
    _dispatch._WARNED.clear()
    why = "no backward on CPU" if "flex" in ops.available_backends("neighborhood_attention") else "torch >= 2.6"
    with pytest.warns(UserWarning, match=re.escape(why)):
        out = ops.neighborhood_attention(q, k, v, 3, backend="flex")
    ref = ops.neighborhood_attention(q, k, v, 3, backend="reference")
    assert_close(out, ref, atol=0.0)


def test_no_backend_can_serve_raises(toy_op, monkeypatch):
    monkeypatch.setitem(_dispatch._REGISTRY, "toy", {"fast": _dispatch._REGISTRY["toy"]["fast"]})
    with pytest.raises(ops.BackendUnavailable, match="fast: dtype torch.float64"):
        ops.dispatch("toy", None, torch.randn(3, dtype=torch.float64))


def test_unknown_backend_and_op_raise_value_errors(randn, monkeypatch):
    q = randn(1, 2, 5, 8, seed=1)
    with pytest.raises(ValueError, match=r"backend='natten' is not a backend of downsampled_attention; registered"):
        ops.downsampled_attention(q, q, q, backend="natten")
    monkeypatch.setenv("ZOO_OPS_BACKEND", "downsampled_attention:nope")
    with pytest.raises(ValueError, match="'nope' is not a backend"):
        ops.downsampled_attention(q, q, q)
    with pytest.raises(ValueError, match=r"op='no_such_op' is not a zoo op; known ops: \["):
        ops.available_backends("no_such_op")


@pytest.mark.parametrize("spec, match", [
    ("downsampled_attention", r"item 'downsampled_attention' is not 'op:backend'"),
    ("downsampled_attention:", r"is not 'op:backend'"),
    ("downsampled_attn:reference", r"'downsampled_attn' is not a zoo op; known ops: \["),
])
def test_malformed_env_override_is_an_error(randn, monkeypatch, spec, match):
    # a typo silently ignored would leave the automatic choice in place while the user believes it overridden
    q = randn(1, 2, 5, 8, seed=1)
    monkeypatch.setenv("ZOO_OPS_BACKEND", spec)
    with pytest.raises(ValueError, match=f"ZOO_OPS_BACKEND={spec!r}: .*" + match):
        ops.downsampled_attention(q, q, q)


def test_ops_trace_inside_torch_compile(randn, assert_close):
    q, k, v = randn(2, 2, 12, 8, seed=1), randn(2, 2, 12, 8, seed=2), randn(2, 2, 12, 8, seed=3)
    prefix, valid = torch.tensor([3, 0]), torch.tensor([12, 9])

    def block(q, k, v):
        x = ops.masked_attention(q, k, v, causal=True, prefix_len=prefix, valid_len=valid, backend="reference")
        y, _ = ops.cross_attention(x, k, v_k=v, backend="reference")
        return ops.downsampled_attention(y, k[:, :, :4], v[:, :, :4], backend="reference")

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    assert_close(compiled(q, k, v), block(q, k, v), atol=1e-6)


@pytest.mark.parametrize("eager_first", [False, True], ids=["fresh", "after-eager-calls"])
def test_compiled_op_calls_compile_once(randn, monkeypatch, eager_first):
    # a fresh process compiles before any eager call has filled dispatch's caches; dynamo replays a write to them
    # after the traced call, which used to fail its own guard and recompile the model on the second call
    monkeypatch.setattr(_dispatch, "_ORDER", {})
    monkeypatch.setattr(_dispatch, "_CHOICES", {})
    monkeypatch.setattr(_dispatch, "_VALID", {})
    x, w, b = randn(2, 5, 8, seed=1), randn(8, seed=2), randn(8, seed=3)

    def block(x):
        y = ops.layer_norm(x, w, b)
        return ops.downsampled_attention(y[:, None], y[:, None, :3], y[:, None, :3], num_heads=None)

    if eager_first:
        block(x)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=counting_backend, fullgraph=True)
    for _ in range(3):
        out = compiled(x)
    assert len(graphs) == 1, f"{len(graphs)} compilations for three calls with the same inputs"
    torch.testing.assert_close(out, block(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", MY_OPS)
def test_cpu_autocast_bf16_matches_float32(randn, assert_close, op):
    q, k, v = randn(2, 2, 20, 16, seed=1), randn(2, 2, 20, 16, seed=2), randn(2, 2, 20, 16, seed=3)
    fn = {
        "downsampled_attention": lambda q, k, v: ops.downsampled_attention(q, k[:, :, :7], v[:, :, :7]),
        "cross_attention": lambda q, k, v: torch.cat(ops.cross_attention(q[:, :, :5], k, v, v[:, :, :5]), dim=2),
        "masked_attention": lambda q, k, v: ops.masked_attention(q, k, v, causal=True, prefix_len=6),
        "neighborhood_attention": lambda q, k, v: ops.neighborhood_attention(
            *(t.reshape(2, 2, 4, 5, 16) for t in (q, k, v)), 3),
    }[op]
    lin = torch.nn.Linear(16, 16)  # autocast acts on the producer, as in a model
    want = fn(lin(q), lin(k), lin(v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(lin(q), lin(k), lin(v))
    assert got.dtype == torch.bfloat16
    assert_close(got, want, atol=6e-2, rtol=3e-2, what=f"{op} bf16 autocast")


@pytest.fixture
def counted_op(monkeypatch):
    """A throwaway op whose fast backend counts its support checks and serves float32 only."""
    monkeypatch.setattr(_dispatch, "_REGISTRY", dict(_dispatch._REGISTRY))
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    monkeypatch.setattr(_dispatch, "_CHOICES", {})
    monkeypatch.setattr(_dispatch, "_VALID", {})
    checks = []

    def supports(x):
        checks.append(tuple(x.shape))
        return None if x.dtype == torch.float32 else f"dtype {x.dtype}"

    ops.register_backend("counted", "reference", lambda x: ("reference", x), priority=0)
    ops.register_backend("counted", "fast", lambda x: ("fast", x), priority=10, supports=supports,
                         prefer=lambda x: "reference is faster when training" if x.requires_grad else None)
    return checks


def _run(x, backend=None):
    return ops.dispatch("counted", backend, x, key=_dispatch.call_key(x))[0]


def test_keyed_dispatch_checks_each_metadata_once(counted_op):
    x = torch.randn(2, 3)
    assert [_run(x), _run(x), _run(torch.randn(2, 3))] == ["fast"] * 3
    assert counted_op == [(2, 3)]  # same shape, strides, dtype, device: one check
    assert _run(torch.randn(3, 2)) == "fast" and _run(torch.randn(3, 2).t()) == "fast"  # new shape; new strides
    assert counted_op == [(2, 3), (3, 2), (2, 3)]
    assert _run(x.double()) == "reference"  # dtype is part of the key
    trainable = torch.randn(2, 3, requires_grad=True)
    assert _run(trainable) == "reference"  # requires_grad too (the prefer rule reads it)
    with torch.no_grad():
        assert _run(trainable) == "reference"  # and grad mode: a new choice, same answer from the rule


def test_keyed_dispatch_follows_requests_environment_and_registry(counted_op, monkeypatch):
    x = torch.randn(2, 3)
    assert _run(x) == "fast"
    monkeypatch.setenv("ZOO_OPS_BACKEND", "counted:reference")
    assert _run(x) == "reference"
    monkeypatch.delenv("ZOO_OPS_BACKEND")
    assert _run(x, backend="reference") == "reference" and _run(x) == "fast"
    # re-registering a backend forgets the remembered choices
    ops.register_backend("counted", "fast", lambda x: ("new fast", x), priority=10)
    assert _run(x) == "new fast"


def test_keyed_dispatch_keeps_warning_about_each_fallback(counted_op):
    x = torch.randn(2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="backend 'fast' cannot serve this input"):
        assert _run(x, backend="fast") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _run(x, backend="fast") == "reference"  # warned once per reason
    _dispatch._WARNED.clear()  # what `zoo bench ops` does to see a fallback: the choice was not remembered
    with pytest.warns(UserWarning, match="backend 'fast' cannot serve this input"):
        assert _run(x, backend="fast") == "reference"
    assert not _dispatch._CHOICES.get("counted")


def test_call_key_summarises_metadata_only():
    x = torch.randn(2, 3)
    assert _dispatch.call_key(x, 0.5, (2, 2), None, "nhwc") == _dispatch.call_key(torch.zeros(2, 3), 0.5, (2, 2),
                                                                                   None, "nhwc")
    assert _dispatch.call_key(x, 0.5) != _dispatch.call_key(x, 0.25)
    assert _dispatch.call_key(x, [2, 2]) is None  # a list could be changed in place: no key, checks run every call
    assert _dispatch.call_key(x, torch.bfloat16) != _dispatch.call_key(x, torch.float16)  # layer_norm's out dtype


def test_layer_norm_chooses_once_per_metadata(monkeypatch):
    # its key holds the autocast output dtype: without a key every call re-ran the checks and the selection
    # (about half of its 100 us host time per call on the H200 machine)
    monkeypatch.setattr(_dispatch, "_CHOICES", {})  # forget choices earlier tests made for these shapes
    monkeypatch.setattr(_dispatch, "_VALID", {})
    chosen = []
    select = _dispatch.select_backend
    monkeypatch.setattr(_dispatch, "select_backend", lambda *a, **k: chosen.append(a[0]) or select(*a, **k))
    norm, x = ops.LayerNorm(16), torch.randn(4, 16)
    with torch.no_grad():
        outs = [norm(x) for _ in range(3)]
        with torch.autocast("cpu", torch.bfloat16):
            outs += [norm(x) for _ in range(2)]
    assert chosen == ["layer_norm", "layer_norm"]  # float32 output, then bf16 under autocast
    assert outs[3].dtype == torch.bfloat16 and torch.equal(outs[0], outs[2])


def test_memo_is_bounded(counted_op, monkeypatch):
    monkeypatch.setattr(_dispatch, "_MEMO_LIMIT", 4)
    for n in range(1, 11):
        _run(torch.randn(n))
    assert len(_dispatch._CHOICES["counted"]) <= 4 and len(_dispatch._VALID["counted"]) <= 4


def test_a_real_op_still_rejects_bad_input_after_good_calls(randn):
    q, k, v, agent = randn(1, 2, 9, 8, seed=1), randn(1, 2, 9, 8, seed=2), randn(1, 2, 9, 8, seed=3), \
        randn(1, 2, 4, 8, seed=4)
    first = ops.agent_attention(q, k, v, agent)
    torch.testing.assert_close(ops.agent_attention(q, k, v, agent), first, rtol=0, atol=0)
    with pytest.raises(ValueError, match="agent_bias of shape \\(3, 4, 9\\) does not broadcast"):
        ops.agent_attention(q, k, v, agent, agent_bias=randn(3, 4, 9, seed=5))
    with pytest.raises(ValueError, match="topk must be an int in"):
        x = randn(1, 4, 4, 8, seed=6)
        ops.routing_attention(x, x, x, num_heads=2, region_size=2, topk=1, scale=0.3)
        ops.routing_attention(x, x, x, num_heads=2, region_size=2, topk=5, scale=0.3)


@pytest.mark.parametrize("mode", ["symbolic", "fake"])
def test_ops_trace_with_make_fx_including_symbolic_shapes(randn, mode):
    from torch.fx.experimental.proxy_tensor import make_fx

    q, agent = randn(2, 2, 9, 8, seed=1), randn(2, 2, 4, 8, seed=2)
    x = randn(1, 4, 4, 8, seed=3)

    def f(q, agent, x):
        out = ops.agent_attention(q, q, q, agent)
        return out, ops.routing_attention(x, x, x, num_heads=2, region_size=2, topk=2, scale=0.3)

    graph = make_fx(f, tracing_mode=mode)(q, agent, x)
    for got, want in zip(graph(q, agent, x), f(q, agent, x)):
        torch.testing.assert_close(got, want)
