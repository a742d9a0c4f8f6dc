"""mlp / Mlp / SequentialMlp: the reference against timm's Mlp and nn.Sequential (bitwise, with gradients), the modules
as drop-ins (keys, fallbacks to the unfused path), input errors, dispatch and its speed rule; the fused Triton kernel
against a float64 oracle that rounds where the unfused layers write 16-bit values, in Triton's CPU interpreter (a
subprocess with TRITON_INTERPRET=1) and on the GPU (bf16/fp16/fp32, autocast, torch.compile, a model)."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp as TimmMlp
from torch import nn

from zoo import ops
from zoo.ops import Mlp, SequentialMlp, linear_gelu, mlp, registered_backends
from zoo.ops._dispatch import select_backend
from zoo.ops.triton import interpreter_requested
from triton_checks import interpreter_fixture, run_pytest_in_interpreter

FM = importlib.import_module("zoo.ops.mlp")  # the module (``zoo.ops.mlp`` is the function)

# (leading shape, C_in, H, C_out): hidden widths not a multiple of the 32-column step, rows not a multiple of the
# 128-row tile, one channel, a 256-wide row, different in and out widths
SHAPES = [((3, 50), 24, 70, 24), ((2, 130), 64, 256, 64), ((7,), 1, 16, 3), ((5, 9), 40, 100, 72),
          ((130,), 256, 96, 200)]


def _weights(c_in, hidden, c_out, randn, dtype=torch.float32, device="cpu", bias=(True, True), seed=1):
    w1 = randn(hidden, c_in, dtype=dtype, device=device, seed=seed, scale=max(c_in, 1) ** -0.5)
    b1 = randn(hidden, dtype=dtype, device=device, seed=seed + 1, scale=0.5) if bias[0] else None
    w2 = randn(c_out, hidden, dtype=dtype, device=device, seed=seed + 2, scale=hidden ** -0.5)
    b2 = randn(c_out, dtype=dtype, device=device, seed=seed + 3, scale=0.5) if bias[1] else None
    return w1, b1, w2, b2


def _oracle(x, w1, b1, w2, b2, dtype):
    """float64 MLP rounding to ``dtype`` where the unfused layers write it: inputs, fc1's output, the GELU's output."""
    def r(t):
        return None if t is None else t.to(dtype).double()
    x, w1, b1, w2, b2 = (r(t) for t in (x, w1, b1, w2, b2))
    h = x @ w1.T + (b1 if b1 is not None else 0)
    h = r(F.gelu(r(h)))
    return h @ w2.T + (b2 if b2 is not None else 0)


def _timm_pair(c_in, hidden, c_out, seed=0, **kwargs):
    torch.manual_seed(seed)
    theirs = TimmMlp(c_in, hidden, c_out, **kwargs)
    ours = Mlp(c_in, hidden, c_out, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


# ----------------------------------------------------------------------------------------------------------------
# reference backend and modules (CPU)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_is_timm_mlp_bitwise_with_gradients(dtype, randn, grads):
    theirs, ours = _timm_pair(24, 70, 20)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    x = randn(3, 5, 24, dtype=dtype, requires_grad=True, seed=4)
    want = theirs(x)
    got = mlp(x, ours.fc1.weight, ours.fc1.bias, ours.fc2.weight, ours.fc2.bias, backend="reference")
    assert torch.equal(got, want)
    for g, w in zip(grads(got, [x, ours.fc1.weight, ours.fc2.bias]), grads(want, [x, theirs.fc1.weight,
                                                                                    theirs.fc2.bias])):
        assert torch.equal(g, w)


def test_gradcheck_reference(randn):
    x = randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w1, b1, w2, b2 = (t.requires_grad_() for t in _weights(5, 7, 4, randn, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda *a: mlp(*a, backend="reference"), (x, w1, b1, w2, b2))


def test_mlp_module_is_a_drop_in_for_timm_mlp(randn):
    theirs, ours = _timm_pair(32, 96, 32, drop=0.0)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight",
                                                                    "fc2.bias"]
    x = randn(2, 10, 32, seed=3)
    for train in (True, False):
        theirs.train(train), ours.train(train)
        assert torch.equal(ours(x), theirs(x))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the autocast-cached weights' path
        got, want = ours.eval()(x), theirs.eval()(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("kwargs, fusable", [
    (dict(), True), (dict(act_layer=nn.ReLU), False), (dict(act_layer=lambda: nn.GELU(approximate="tanh")), False),
    (dict(norm_layer=nn.LayerNorm), False), (dict(use_conv=True), False)])
def test_mlp_module_fuses_only_what_the_kernel_computes(kwargs, fusable):
    assert Mlp(16, 32, **kwargs)._fusable_layers is fusable


def test_modules_fuse_only_widths_where_the_kernel_measured_faster():
    assert Mlp(128, 1024)._fusable_layers and Mlp(64, 512, 96)._fusable_layers
    assert not Mlp(192, 768)._fusable_layers and not Mlp(128, 512, 130)._fusable_layers
    assert not SequentialMlp(nn.Linear(256, 768), nn.GELU(), nn.Linear(768, 256))._fusable_layers


def test_modules_call_the_op_only_in_compiled_inference(randn, monkeypatch):
    calls = []
    monkeypatch.setattr(FM, "mlp", lambda *a, **k: calls.append(1) or FM._reference(*a, None))
    module, seq = Mlp(16, 32, drop=0.1), SequentialMlp(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    x = randn(2, 16)
    with torch.no_grad():
        module.eval()(x), seq(x)  # eager: timm's forward (host time, see Mlp)
    assert calls == []
    torch._dynamo.reset()
    for m in (module.train(), seq):  # dropout active / autograd records the parameters: unfused in the graph too
        torch.compile(m, backend="eager")(x)
    assert calls == []
    module.eval()
    with torch.no_grad():
        for m in (module, seq):
            torch.compile(m, backend="eager")(x)
    assert calls == [1, 1]


def test_is_identity_names_the_calls_that_change_nothing():
    from timm.layers import DropPath

    from zoo.ops.mlp import is_identity

    dropout, drop_path = nn.Dropout(0.1), DropPath(0.1)
    assert is_identity(nn.Identity()) and is_identity(nn.Dropout(0.0)) and is_identity(DropPath(0.0))
    assert not is_identity(dropout) and not is_identity(drop_path)  # training mode with a probability
    dropout.eval(), drop_path.eval()
    assert is_identity(dropout) and is_identity(drop_path)
    assert not is_identity(nn.GELU()) and not is_identity(nn.LayerNorm(4))
    hooked = nn.Identity()
    hooked.register_forward_hook(lambda *args: None)  # a hook observes the call: it is made
    assert not is_identity(hooked)
    backward_hooked = nn.Identity()
    backward_hooked.register_full_backward_hook(lambda *args: None)
    assert not is_identity(backward_hooked)
    global_hook = nn.modules.module.register_module_forward_pre_hook(lambda *args: None)
    try:
        assert not is_identity(nn.Identity())
    finally:
        global_hook.remove()


def test_mlp_module_skips_its_no_op_layers_with_the_same_outputs(randn, monkeypatch):
    """Without dropout (or in eval mode) the module calls fc1, act and fc2 only; outputs equal timm's forward."""
    torch.manual_seed(0)
    ours = Mlp(16, 64, drop=0.1)
    x = randn(3, 5, 16, seed=2)
    called = []
    for name in ("drop1", "norm", "drop2"):
        getattr(ours, name).register_forward_pre_hook(lambda m, args, n=name: called.append(n))
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), TimmMlp.forward(ours, x))
    assert called == ["drop1", "norm", "drop2"] * 2  # hooked: observed, so called (ours and timm's forward)
    plain = Mlp(16, 64, drop=0.1).eval()
    plain.load_state_dict(ours.state_dict())
    monkeypatch.setattr(nn.Dropout, "forward", lambda self, x: pytest.fail("a no-op dropout was called"))
    with torch.no_grad():
        assert torch.equal(plain(x), ours.fc2(ours.act(ours.fc1(x))))


def test_sequential_mlp_keeps_keys_and_fuses_only_linear_gelu_linear(randn):
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Linear(16, 48), nn.Identity(), nn.GELU(), nn.Linear(48, 16))
    ours = SequentialMlp(nn.Linear(16, 48), nn.Identity(), nn.GELU(), nn.Linear(48, 16))
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == ["0.weight", "0.bias", "3.weight", "3.bias"] and ours._fusable_layers
    x = randn(3, 4, 16, seed=2)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    assert not SequentialMlp(nn.Linear(16, 48), nn.Conv1d(4, 4, 1), nn.GELU(), nn.Linear(48, 16))._fusable_layers
    assert not SequentialMlp(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 16))._fusable_layers
    assert not SequentialMlp(nn.Linear(16, 16))._fusable_layers


def test_empty_rows_and_no_biases(randn):
    w1, _, w2, _ = _weights(8, 16, 4, randn)
    assert mlp(torch.zeros(0, 8), w1, None, w2, None).shape == (0, 4)
    x = randn(3, 8)
    assert torch.equal(mlp(x, w1, None, w2, None), F.linear(F.gelu(F.linear(x, w1)), w2))


def test_linear_gelu_reference_is_the_two_layers_bitwise_with_gradients(randn, grads):
    x = randn(3, 5, 24, requires_grad=True, seed=4)
    w, b, _, _ = (None if t is None else t.requires_grad_() for t in _weights(24, 70, 8, randn))
    got, want = linear_gelu(x, w, b), F.gelu(F.linear(x, w, b))
    assert torch.equal(got, want)
    for g, r in zip(grads(got, [x, w, b]), grads(want, [x, w, b])):
        assert torch.equal(g, r)
    assert torch.equal(linear_gelu(x, w, None), F.gelu(F.linear(x, w)))


def _routed(monkeypatch) -> list:
    """The weight shapes :func:`linear_gelu` is called with from now on."""
    calls, real = [], FM.linear_gelu
    monkeypatch.setattr(FM, "linear_gelu", lambda *a, **k: calls.append(tuple(a[1].shape)) or real(*a, **k))
    return calls


@pytest.mark.parametrize("drop", [0.0, 0.25])
def test_mlp_module_routes_eager_training_through_linear_gelu(drop, randn, grads, monkeypatch):
    """In training with gradients act(fc1(x)) is one linear_gelu call; outputs and gradients are timm's bitwise, with
    dropout drawing the same masks."""
    calls = _routed(monkeypatch)
    theirs, ours = _timm_pair(16, 48, 12, drop=drop)
    x = randn(2, 5, 16, requires_grad=True, seed=1)
    torch.manual_seed(3)
    got = ours(x)
    torch.manual_seed(3)
    want = theirs(x)
    assert torch.equal(got, want) and calls == [(48, 16)]
    mine = grads(got, [x, ours.fc1.weight, ours.fc1.bias, ours.fc2.bias])
    for g, r in zip(mine, grads(want, [x, theirs.fc1.weight, theirs.fc1.bias, theirs.fc2.bias])):
        assert torch.equal(g, r)


def test_modules_take_linear_gelu_only_where_the_two_calls_do_nothing_else(randn, monkeypatch):
    calls = _routed(monkeypatch)
    x = randn(2, 16)
    with torch.no_grad():
        Mlp(16, 32)(x)  # inference
    Mlp(16, 32, act_layer=lambda: nn.GELU(approximate="tanh"))(x)
    Mlp(16, 32, act_layer=nn.ReLU)(x)
    frozen = Mlp(16, 32)
    frozen.fc1.bias.requires_grad_(False)  # no bias gradient to fuse
    frozen(x)
    hooked = Mlp(16, 32)
    hooked.fc1.register_forward_hook(lambda *args: None)  # the hook must see fc1's call
    hooked(x)
    subclassed = Mlp(16, 32)
    subclassed.fc1 = type("Lora", (nn.Linear,), {})(16, 32)  # a subclass's forward may differ
    subclassed(x)
    global_hook = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        Mlp(16, 32)(x)
    finally:
        global_hook.remove()
    torch._dynamo.reset()
    torch.compile(Mlp(16, 32), backend="eager")(x)  # inductor fuses the backward itself
    assert calls == []
    Mlp(16, 32)(x), SequentialMlp(nn.Linear(16, 32), nn.Identity(), nn.GELU(), nn.Linear(32, 16))(x)
    SequentialMlp(nn.Linear(16, 32), nn.Dropout(0.5), nn.GELU(), nn.Linear(32, 16))(x)  # a dropout in between
    assert calls == [(32, 16), (32, 16)]


def test_linear_gelu_input_errors_name_the_argument_and_value():
    x, w, b = torch.ones(2, 8), torch.ones(16, 8), torch.ones(16)
    for args, message in [((x.long(), w, b), "x must be a floating-point tensor"),
                          ((x, torch.ones(16, 9), b), r"weight must be .* \(H, 8\) .*got shape \(16, 9\)"),
                          ((x, w, torch.ones(15)), r"bias must be None or .* \(16,\), got shape \(15,\)"),
                          ((x, w, torch.ones(16, device="meta")), "bias must be on the device of x")]:
        with pytest.raises(ValueError, match=message):
            linear_gelu(*args)


def test_linear_gelu_backend_reasons(randn, monkeypatch):
    assert registered_backends("linear_gelu") == ["triton", "reference"] and "linear_gelu" in ops.__all__
    x, (w, b, _, _) = randn(2, 8), _weights(8, 16, 4, randn)
    supports, prefer = FM._linear_gelu_supports, FM._linear_gelu_prefer
    assert "only the backward" in supports(x, w, b) and "only the backward" in supports(x, w, None)
    b.requires_grad_()
    assert "TRITON_INTERPRET=1" in supports(x, w, b)
    monkeypatch.setattr(FM, "_gelu_kernels_interpreted", lambda: True)
    assert supports(x, w, b) is None and "float64" in supports(x.double(), w, b)
    assert "reference is faster" in prefer(x, w, b)
    assert select_backend("linear_gelu", None, x, w, b).name == "reference"


def _bad(**override):
    x, w1, b1, w2, b2 = torch.ones(2, 8), torch.ones(16, 8), torch.ones(16), torch.ones(4, 16), torch.ones(4)
    args = dict(x=x, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2)
    args.update(override)
    return args


@pytest.mark.parametrize("args, message", [
    (_bad(x=torch.ones(2, 8, dtype=torch.long)), "x must be a floating-point tensor"),
    (_bad(fc1_weight=torch.ones(16, 9)), r"fc1_weight .*got shape \(16, 9\)"),
    (_bad(fc1_bias=torch.ones(15)), r"fc1_bias .*got shape \(15,\)"),
    (_bad(fc2_weight=torch.ones(4, 15)), r"fc2_weight .*got shape \(4, 15\)"),
    (_bad(fc2_bias=torch.ones(5)), r"fc2_bias .*got shape \(5,\)"),
    (_bad(fc2_weight=torch.ones(4, 16, dtype=torch.float64)), "fc2_weight has dtype torch.float64 but x has"),
    (_bad(fc1_weight=torch.ones(16, 8, device="meta")), "fc1_weight must be on the device of x"),
])
def test_input_errors_name_the_argument_and_value(args, message):
    with pytest.raises(ValueError, match=message):
        mlp(**args)
    with pytest.raises(ValueError, match="activation must be one of"):
        mlp(**_bad(), activation="relu")


def test_registered_exported_and_reference_chosen_on_cpu(randn, monkeypatch):
    assert registered_backends("mlp") == ["triton", "reference"]
    assert {"mlp", "Mlp", "SequentialMlp"} <= set(ops.__all__)
    x, (w1, b1, w2, b2) = randn(2, 8), _weights(8, 16, 8, randn)
    assert select_backend("mlp", None, x, w1, b1, w2, b2, torch.float32).name == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter serves CPU tensors, but is never chosen for them
    assert select_backend("mlp", None, x, w1, b1, w2, b2, torch.float32).name == "reference"


def test_triton_supports_and_prefer_reasons(randn, monkeypatch):
    x, (w1, b1, w2, b2) = randn(2, 64), _weights(64, 128, 64, randn)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(FM, "_kernels_interpreted", lambda: True)
    supports, prefer = FM._triton_supports, FM._triton_prefer
    assert supports(x, w1, b1, w2, b2, torch.float32) is None
    assert "training" in supports(x.requires_grad_(), w1, b1, w2, b2, torch.float32)
    x = x.detach()
    assert "float64" in supports(x.double(), w1, b1, w2, b2, torch.float64)
    assert "bfloat16" in supports(x, w1, b1, w2, b2, torch.bfloat16)
    wide = _weights(300, 16, 8, randn)
    assert "C_in=300, C_out=8: at most 256" in supports(randn(2, 300), *wide, torch.float32)
    assert "reference is faster" in prefer(x, w1, b1, w2, b2, torch.float16)
    cuda = torch.device("cuda")
    fake = type("T", (), {"device": cuda, "shape": (2, 192)})()
    assert "above 128" in prefer(fake, w1, b1, type("W", (), {"shape": (192, 128)})(), b2, torch.bfloat16)
    assert "float32" in prefer(fake, w1, b1, w2, b2, torch.float32)
    assert prefer(type("T", (), {"device": cuda, "shape": (2, 64)})(), w1, b1, w2, b2, torch.bfloat16) is None


def test_tiles_follow_the_h200_sweep():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert FM._tiles(64, 64, bf16) == (128, 64, 64, 4, 3)
    assert FM._tiles(96, 96, bf16) == (128, 128, 128, 4, 3)
    assert FM._tiles(192, 150, bf16) == (128, 256, 256, 8, 3)
    assert FM._tiles(192, 150, fp32) == (64, 256, 256, 8, 1) and FM._tiles(96, 64, fp32) == (128, 128, 64, 4, 2)
    assert FM._BLOCK_H == 32


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel in the CPU interpreter (the tests below run in the subprocess started by the last one)

INTERPRETING = interpreter_requested()


interpreter = interpreter_fixture(lambda: FM._kernel())


def _check_triton(x, weights, compute, assert_close, tol):
    out = mlp(x, *weights, backend="triton")
    assert out.dtype == compute and out.shape == (*x.shape[:-1], weights[2].shape[0])
    want = _oracle(x, *weights, compute)
    assert_close(out, want, atol=tol * max(want.abs().max().item(), 1e-3), what=f"forward {compute}")
    return out


@pytest.mark.parametrize("bias", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("lead, c_in, hidden, c_out", SHAPES, ids=str)
def test_triton_interpreter_fp32(lead, c_in, hidden, c_out, bias, interpreter, randn, assert_close):
    x = randn(*lead, c_in, seed=5)
    _check_triton(x, _weights(c_in, hidden, c_out, randn, bias=bias), torch.float32, assert_close, 2e-6)


@pytest.mark.parametrize("lead, c_in, hidden, c_out", SHAPES[:3], ids=str)
def test_triton_interpreter_fp16_and_fp16_autocast(lead, c_in, hidden, c_out, interpreter, randn, assert_close):
    x = randn(*lead, c_in, seed=6)
    weights = _weights(c_in, hidden, c_out, randn)
    _check_triton(x.half(), [w.half() for w in weights], torch.float16, assert_close, 4e-3)
    with torch.autocast("cpu", dtype=torch.float16):  # float32 inputs and weights, fp16 compute, fp16 out
        _check_triton(x, weights, torch.float16, assert_close, 4e-3)


def test_triton_interpreter_modules_repeatability_and_empty(interpreter, randn, assert_close, monkeypatch):
    monkeypatch.setenv("ZOO_OPS_BACKEND", "mlp:triton")  # the interpreter is never chosen automatically
    theirs, ours = _timm_pair(48, 200, 48)
    seq = SequentialMlp(ours.fc1, nn.Identity(), nn.GELU(), ours.fc2)
    x = randn(2, 70, 48, seed=7)
    torch._dynamo.reset()
    with torch.no_grad():
        want = theirs(x)
        compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
        got, again = compiled(x), compiled(x)
        via_seq = torch.compile(seq, backend="aot_eager", fullgraph=True)(x)
    assert_close(got, want, atol=2e-6 * want.abs().max().item(), what="module")
    assert torch.equal(got, again) and torch.equal(got, via_seq)
    assert mlp(torch.zeros(0, 3, 48), ours.fc1.weight.detach(), None, ours.fc2.weight.detach(), None,
               backend="triton").shape == (0, 3, 48)


def test_triton_interpreter_custom_op_and_compile(interpreter, randn):
    x = randn(3, 5, 24, seed=8)
    w1, b1, w2, b2 = _weights(24, 40, 16, randn)
    torch.library.opcheck(torch.ops.zoo.mlp_fwd.default, (x, w1, b1, w2, b2, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.zoo.mlp_fwd.default, (x.half(), w1.half(), None, w2.half(), None,
                                                         torch.float16), test_utils=("test_schema", "test_faketensor"))

    def f(x):
        return mlp(x * 2.0, w1, b1, w2, b2, backend="triton").square().sum()

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, backend="aot_eager", fullgraph=True)(x), f(x))


def test_triton_interpreter_compiled_model_routes_its_narrow_mlps(interpreter, assert_close, monkeypatch):
    import timm

    import zoo  # noqa: F401  (registers the models)

    monkeypatch.setenv("ZOO_OPS_BACKEND", "mlp:triton")
    calls = []
    launch = FM._launch
    monkeypatch.setattr(FM, "_launch", lambda *a, **k: calls.append(a[0].shape[-1]) or launch(*a, **k))
    torch.manual_seed(0)
    model = timm.create_model("agent_pvt_tiny").eval()
    x = torch.randn(1, 3, 64, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend="aot_eager")(x)
    assert calls == [64, 64, 128, 128]  # the blocks of stages 0 and 1; stages 2-3 (320, 512 channels) stay unfused
    assert_close(got, want, atol=1e-5 * want.abs().max().item(), what="compiled model logits")


def _linear_gelu_grads(x, w, b, backend, randn):
    y = linear_gelu(x, w, b, backend=backend)
    g = randn(*y.shape, dtype=y.dtype, device=y.device, seed=11)
    return (y, *torch.autograd.grad(y, (x, w, b), g))


@pytest.mark.parametrize("lead, c_in, hidden", [((3, 50), 24, 70), ((150,), 16, 300), ((2, 5, 7), 8, 1),
                                               ((0, 4), 8, 16)], ids=str)
def test_triton_interpreter_linear_gelu_gradients(lead, c_in, hidden, interpreter, randn, assert_close):
    """float32: the forward is the reference's (the same ATen calls); the gradients agree up to the order of float32
    sums (the bias's over up to three row splits, the interpreter's three programs)."""
    x = randn(*lead, c_in, requires_grad=True, seed=5)
    w, b, _, _ = (t.requires_grad_() for t in _weights(c_in, hidden, 4, randn))
    got, want = (_linear_gelu_grads(x, w, b, backend, randn) for backend in ("triton", "reference"))
    assert torch.equal(got[0], want[0])
    for name, g, r in zip(("y", "x", "weight", "bias"), got, want):
        if r.numel() == 0 or not r.any():  # no rows: empty outputs, zero weight and bias gradients
            assert g.shape == r.shape and torch.equal(g, r), name
        else:
            assert_close(g, r, atol=2e-6 * r.abs().max().item(), what=name)


def test_triton_interpreter_linear_gelu_double_backward(interpreter, randn, assert_close):
    """With create_graph=True the backward records its own graph (ATen's ops), so second derivatives (a gradient
    penalty's) are the reference's."""
    x = randn(3, 20, 8, requires_grad=True, seed=9)
    w, b, _, _ = (t.requires_grad_() for t in _weights(8, 24, 4, randn))
    second = []
    for backend in ("triton", "reference"):
        y = linear_gelu(x, w, b, backend=backend)
        gx, gb = torch.autograd.grad(y.square().sum(), (x, b), create_graph=True)
        second.append(torch.autograd.grad(gx.square().sum() + gb.square().sum(), (x, w, b)))
    for name, g, r in zip(("x", "weight", "bias"), *second):
        assert_close(g, r, atol=2e-6 * r.abs().max().item(), what=f"second derivative, {name}")


def test_triton_interpreter_linear_gelu_fp16_autocast_rounds_like_the_layers(interpreter, randn, assert_close):
    """Under fp16 autocast the bias's gradient is the fp16 column sum (rounded once), in the parameter's float32."""
    x = randn(150, 24, requires_grad=True, seed=6)
    w, b, _, _ = (t.requires_grad_() for t in _weights(24, 40, 4, randn))
    with torch.autocast("cpu", dtype=torch.float16):
        got, want = (_linear_gelu_grads(x, w, b, backend, randn) for backend in ("triton", "reference"))
    assert got[0].dtype == torch.float16 and got[3].dtype == torch.float32
    for name, g, r in zip(("y", "x", "weight", "bias"), got, want):
        assert_close(g.float(), r.float(), atol=2e-3 * r.abs().max().item(), what=name)
    assert torch.equal(got[3], got[3].half().float())  # rounded to fp16 once


def test_triton_interpreter_mlp_training_takes_the_kernel(interpreter, randn, assert_close, monkeypatch):
    monkeypatch.setenv("ZOO_OPS_BACKEND", "linear_gelu:triton")
    launches = []
    real = FM._launch_gelu_backward
    monkeypatch.setattr(FM, "_launch_gelu_backward", lambda *a, **k: launches.append(a[1].shape) or real(*a, **k))
    theirs, ours = _timm_pair(16, 48, 16)
    x = randn(3, 20, 16, seed=7)
    got, want = ours(x), theirs(x)
    assert torch.equal(got, want)
    g = randn(*got.shape, seed=8)
    for p, q in zip(torch.autograd.grad(got, list(ours.parameters()), g),
                    torch.autograd.grad(want, list(theirs.parameters()), g)):
        assert_close(p, q, atol=2e-6 * q.abs().max().item(), what="parameter gradient")
    assert launches == [(3, 20, 48)]


def test_triton_kernels_under_interpreter():
    """Runs the interpreter tests above in a fresh process with TRITON_INTERPRET=1."""
    if INTERPRETING:
        pytest.skip("already interpreting: the tests above ran in this process")
    run_pytest_in_interpreter(__file__, "interpreter and not under_interpreter", passed=28)


# ----------------------------------------------------------------------------------------------------------------
# GPU

GPU_SHAPES = [(128 * 196, 64, 512, 64), (8 * 784, 128, 1024, 128), (8 * 3136, 96, 384, 96), (8 * 784, 192, 768, 192),
              (1000, 256, 70, 100), (3, 64, 192, 64)]


@pytest.mark.gpu
def test_gpu_auto_choice_follows_the_speed_rule(randn):
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    w1, b1, w2, b2 = _weights(64, 256, 64, randn, device="cuda")
    with torch.no_grad():
        assert select_backend("mlp", None, x, w1, b1, w2, b2, torch.bfloat16).name == "triton"
        assert select_backend("mlp", None, x.float(), w1, b1, w2, b2, torch.float32).name == "reference"
        wide = _weights(192, 768, 192, randn, device="cuda")
        assert select_backend("mlp", None, torch.ones(4, 192, device="cuda"), *wide,
                              torch.bfloat16).name == "reference"
    assert select_backend("mlp", None, x, w1.requires_grad_(), b1, w2, b2, torch.bfloat16).name == "reference"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize("rows, c_in, hidden, c_out", GPU_SHAPES, ids=str)
def test_triton_gpu_matches_the_rounding_oracle(rows, c_in, hidden, c_out, dtype, tol, randn, assert_close,
                                                 assert_no_fallback):
    x = randn(rows, c_in, device="cuda", seed=9)
    weights = _weights(c_in, hidden, c_out, randn, device="cuda")
    with assert_no_fallback():
        _check_triton(x.to(dtype), [w.to(dtype) for w in weights], dtype, assert_close, tol)
        if dtype != torch.float32:
            with torch.autocast("cuda", dtype=dtype):  # float32 weights cast once per call
                _check_triton(x, weights, dtype, assert_close, tol)


@pytest.mark.gpu
def test_triton_gpu_compiles_without_graph_breaks(randn, assert_close):
    from triton_checks import assert_inductor_launches, compiled_inference

    _, ours = _timm_pair(64, 512, 64)
    ours = ours.cuda().eval()
    x = randn(4, 196, 64, device="cuda", seed=10)
    eager, got, code = compiled_inference(lambda x: ours(x * 2), x)
    assert_inductor_launches(code, "forward_kernel")
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), eager.float(), atol=1e-2 * eager.float().abs().max().item(), what="compiled")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, c_in, hidden", [(8 * 3136, 64, 512), (8 * 197, 192, 768), (1000, 40, 70), (5, 8, 300)],
                         ids=str)
def test_triton_gpu_linear_gelu_gradients(rows, c_in, hidden, dtype, randn, assert_close, assert_no_fallback):
    """Chosen for training calls; the forward is the reference's bitwise, the input gradients within a unit in the
    last place of the dtype, the bias's within the rounding of its float32 sum; repeated calls (replayed from call
    plans from the third) give the same values."""
    x = randn(rows, c_in, device="cuda", requires_grad=True, seed=12)
    w, b, _, _ = (t.requires_grad_() for t in _weights(c_in, hidden, 4, randn, device="cuda"))
    assert select_backend("linear_gelu", None, x, w, b).name == "triton"
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        want = _linear_gelu_grads(x, w, b, "reference", randn)
        with assert_no_fallback():
            runs = [_linear_gelu_grads(x, w, b, "triton", randn) for _ in range(4)]
    tol = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}[dtype]
    assert torch.equal(runs[0][0], want[0])
    for name, g, r in zip(("y", "x", "weight", "bias"), runs[0], want):
        assert_close(g.float(), r.float(), atol=tol * r.float().abs().max().item(), what=name)
    for later in runs[1:]:
        assert all(torch.equal(g, r) for g, r in zip(later, runs[0]))


@pytest.mark.gpu
def test_triton_gpu_mlp_training_step_matches_timm(randn, assert_close):
    """A bf16 autocast training step of the module (the linear_gelu backward kernel) against timm's Mlp."""
    theirs, ours = (m.cuda() for m in _timm_pair(64, 256, 64))
    x = randn(4, 196, 64, device="cuda", seed=13)
    g = randn(4, 196, 64, device="cuda", seed=14)
    results = []
    for model in (ours, theirs):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        results.append((out, torch.autograd.grad(out, list(model.parameters()), g.bfloat16())))
    assert torch.equal(results[0][0], results[1][0])
    for p, q in zip(results[0][1], results[1][1]):
        assert_close(p, q, atol=8e-3 * q.abs().max().item(), what="parameter gradient")
