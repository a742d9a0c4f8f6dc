"""layer_norm / LayerNorm: the reference against F.layer_norm (float64, float32, gradients, gradcheck), the autocast
output-dtype rule, input errors, the module's nn.LayerNorm compatibility, dispatch; the Triton kernels against the
reference in Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1: triton's own ``tl.sum`` & co. are built
in interpreted form only when triton is imported with it set) and on the GPU (fp32/fp16/bf16, autocast, determinism,
torch.compile)."""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo import ops
from zoo.ops import LayerNorm, layer_norm, registered_backends
from zoo.ops._dispatch import select_backend
from zoo.ops.triton import triton_missing_reason
from triton_checks import (assert_inference_launch_agrees, interpreter_fixture,
                           run_pytest_in_interpreter)

LN = importlib.import_module("zoo.ops.layer_norm")  # the module (``zoo.ops.layer_norm`` is the function)

# (leading shape, C): powers of two and not, one row, rows spanning several backward row blocks and programs
SHAPES = [((2, 5), 64), ((3, 7), 96), ((11,), 192), ((4, 100), 64), ((3,), 1), ((2, 3), 40)]


def _inputs(lead, channels, randn, dtype=torch.float32, device="cpu", affine=(True, True), seed=0):
    x = randn(*lead, channels, dtype=dtype, device=device, requires_grad=True, seed=seed, scale=2.0)
    with torch.no_grad():
        x += 0.5  # a nonzero mean per row
    w = randn(channels, dtype=dtype, device=device, requires_grad=True, seed=seed + 1) if affine[0] else None
    b = randn(channels, dtype=dtype, device=device, requires_grad=True, seed=seed + 2) if affine[1] else None
    return x, w, b


def _leaves(*tensors):
    return [t for t in tensors if t is not None]


# ----------------------------------------------------------------------------------------------------------------
# reference backend


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-13), (torch.float32, 1e-5)])
@pytest.mark.parametrize("lead, channels", SHAPES[:3] + SHAPES[4:5])
def test_reference_matches_f_layer_norm(lead, channels, dtype, atol, randn, assert_close, grads):
    x, w, b = _inputs(lead, channels, randn, dtype=dtype)
    out = layer_norm(x, w, b, eps=1e-5, backend="reference")
    expected = F.layer_norm(x, (channels,), w, b, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, expected, atol=atol, what="forward")
    for name, got, want in zip(("x", "weight", "bias"), grads(out, [x, w, b]), grads(expected, [x, w, b])):
        assert got.dtype == dtype
        assert_close(got, want, atol=atol * max(1.0, want.abs().max().item()), what=f"grad {name}")


def test_reference_float64_matches_explicit_formula(randn, assert_close):
    x, w, b = _inputs((3, 4), 24, randn, dtype=torch.float64)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-3) * w + b
    assert_close(layer_norm(x, w, b, eps=1e-3, backend="reference"), expected, atol=1e-13)


def test_gradcheck_reference(randn):
    x, w, b = _inputs((2, 3), 5, randn, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: layer_norm(*t, eps=1e-3, backend="reference"), (x, w, b),
                                    fast_mode=True)


@pytest.mark.parametrize("affine", [(False, True), (True, False), (False, False)])
def test_reference_without_weight_or_bias(affine, randn, assert_close, grads):
    x, w, b = _inputs((3, 4), 96, randn, dtype=torch.float64, affine=affine)
    out = layer_norm(x, w, b, backend="reference")
    expected = F.layer_norm(x, (96,), w, b)
    assert_close(out, expected, atol=1e-13)
    for got, want in zip(grads(out, _leaves(x, w, b)), grads(expected, _leaves(x, w, b))):
        assert_close(got, want, atol=1e-12)


def test_autocast_output_dtype_rule_on_cpu(randn, assert_close):
    x, w, b = _inputs((2, 6), 64, randn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer_norm(x, w, b)
        module_out = nn.functional.layer_norm(x, (64,), w, b)  # what nn.LayerNorm writes under autocast
        x64 = x.detach().double()
        kept = layer_norm(x64, w.detach().double(), None)  # autocast never recasts float64
    assert got.dtype == torch.bfloat16 and module_out.dtype == torch.float32 and kept.dtype == torch.float64
    # computed in float32 and rounded once: exactly nn.LayerNorm's output cast by the next autocast op
    assert torch.equal(got, module_out.to(torch.bfloat16))
    assert torch.equal(layer_norm(x.to(torch.bfloat16), w, b), F.layer_norm(
        x.to(torch.bfloat16).float(), (64,), w, b).to(torch.bfloat16))  # no autocast: the dtype of x
    # gradients come back in the inputs' dtypes, through the bf16 output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer_norm(x, w, b)
    gx, gw, gb = torch.autograd.grad(out.float().sum(), (x, w, b))
    assert gx.dtype == gw.dtype == gb.dtype == torch.float32
    assert_close(gb, torch.full_like(b, 12.0), atol=0.0)


def test_empty_batch(randn):
    x = torch.zeros(0, 7, 48, requires_grad=True)
    w, b = randn(48, requires_grad=True, seed=1), randn(48, requires_grad=True, seed=2)
    out = layer_norm(x, w, b)
    assert out.shape == (0, 7, 48)
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros(48)) and torch.equal(gb, torch.zeros(48))


@pytest.mark.parametrize("bad, message", [
    ({"weight": torch.ones(63)}, r"weight must be None or a floating-point \(64,\) tensor .* got shape \(63,\)"),
    ({"weight": torch.ones(64, 1)}, r"weight must be .* got shape \(64, 1\)"),
    ({"bias": torch.ones(32)}, r"bias must be .* got shape \(32,\)"),
    ({"bias": torch.ones(64, dtype=torch.int64)}, r"bias must be .* dtype torch.int64"),
    ({"weight": torch.ones(64, device="meta")}, r"weight must be on the device of x \(cpu\), got meta"),
    ({"x": torch.ones(())}, r"x must be a floating-point tensor of shape \(\.\.\., C\), got shape \(\)"),
    ({"x": torch.ones(2, 64, dtype=torch.int32)}, r"x must be .* dtype torch.int32"),
    ({"eps": -1e-5}, r"eps must be a finite real number >= 0, got -1e-05"),
    ({"eps": float("nan")}, r"eps must be .* got nan"),
])
def test_input_errors_name_the_argument_and_value(bad, message):
    args = {"x": torch.ones(2, 3, 64), "weight": torch.ones(64), "bias": torch.zeros(64), "eps": 1e-5}
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        layer_norm(**args)


# ----------------------------------------------------------------------------------------------------------------
# LayerNorm module


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"elementwise_affine": False}, {"eps": 1e-6}])
def test_module_is_a_drop_in_for_nn_layer_norm(kwargs, randn, assert_close):
    torch.manual_seed(0)
    theirs = nn.LayerNorm(96, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    ours = LayerNorm(96, **kwargs)
    assert isinstance(ours, nn.LayerNorm)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert ours.eps == theirs.eps and ours.normalized_shape == (96,)
    x = randn(2, 5, 96, seed=3)
    assert_close(ours(x), theirs(x), atol=1e-5)
    assert "1e-06" in repr(ours) if kwargs.get("eps") else "(96,)" in repr(ours)


def test_module_traces_under_compile_with_autocast(randn, assert_close):
    """Dispatch, the autocast dtype rule and the reference trace into one graph (no graph break)."""
    ln = LayerNorm(64)
    x = randn(3, 4, 64, seed=1, requires_grad=True)

    def f(x):
        return ln(x * 2.0)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compiled(x), f(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)
    assert_close(torch.autograd.grad(got.float().sum(), x)[0], torch.autograd.grad(want.float().sum(), x)[0],
                 atol=0.0)


def test_module_accepts_a_one_tuple_and_refuses_more_dimensions():
    assert LayerNorm((32,)).normalized_shape == (32,)
    with pytest.raises(ValueError, match=r"normalized_shape must be one dimension .* got \(4, 8\)"):
        LayerNorm((4, 8))
    with pytest.raises(ValueError, match=r"last dimension normalized_shape=32, got shape \(2, 31\)"):
        LayerNorm(32)(torch.ones(2, 31))


# ----------------------------------------------------------------------------------------------------------------
# dispatch


def test_registered_exported_and_reference_chosen_on_cpu(randn, monkeypatch):
    assert registered_backends("layer_norm") == ["triton", "reference"]
    assert "layer_norm" in ops.__all__ and "LayerNorm" in ops.__all__
    x, w, b = _inputs((2, 3), 64, randn)
    args = (x, w, b, 1e-5, torch.float32)
    assert select_backend("layer_norm", None, *args).name == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter serves CPU tensors, but is never chosen for them
    assert select_backend("layer_norm", None, *args).name == "reference"
    monkeypatch.delenv("TRITON_INTERPRET")
    if triton_missing_reason() is None:
        with pytest.warns(UserWarning, match="TRITON_INTERPRET"):
            out = layer_norm(x, w, b, backend="triton")
        assert torch.equal(out, layer_norm(x, w, b, backend="reference"))


def test_speed_rule_follows_the_measurements():
    faster = LN._triton_is_faster
    # BiFormer-T stage 0 (128 x 56 x 56 rows of 64): faster in inference and training
    assert faster(128 * 56 * 56 * 64, 64, training=False) and faster(128 * 56 * 56 * 64, 64, training=True)
    # stages 2 and 3, and one image: the forward wins up to 512 channels (direct launches)
    assert faster(128 * 14 * 14 * 256, 256, training=False) and faster(128 * 7 * 7 * 512, 512, False)
    assert faster(7 * 7 * 512, 512, training=False)
    # training: from 1M values up to 512 channels (VOLO-D2's stages at batch 64), not one image's or wider rows
    assert faster(64 * 28 * 28 * 256, 256, training=True) and faster(64 * 14 * 14 * 512, 512, training=True)
    assert not faster(7 * 7 * 512, 512, training=True) and not faster(64 * 197 * 768, 768, training=True)
    # wider rows: from about 8M values only (measured before direct launches)
    assert not faster(8 * 197 * 768, 768, training=False) and faster(64 * 197 * 768, 768, training=False)


def test_triton_supports_reasons(randn, monkeypatch):
    x = randn(2, 64)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in LN._triton_supports(x, None, None, 1e-5, torch.float32)
    assert "float64" in LN._triton_supports(x.double(), None, None, 1e-5, torch.float64)
    assert "device meta" in LN._triton_supports(x.to("meta"), None, None, 1e-5, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert LN._triton_supports(x, None, None, 1e-5, torch.float32) is None
    assert "bfloat16" in LN._triton_supports(x, None, None, 1e-5, torch.bfloat16)
    assert "C=8200 is larger than 8192" in LN._triton_supports(torch.ones(2, 8200), None, None, 1e-5,
                                                               torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels in the CPU interpreter (the tests below run in the subprocess started by the last one)

INTERPRETING = LN.interpreter_requested()


interpreter = interpreter_fixture(lambda: LN._kernels()[0])


def _check_triton(x, w, b, assert_close, grads, tol=None, out_dtype=None):
    """Triton forward and gradients of every leaf against the float64 reference on the same values."""
    out = layer_norm(x, w, b, backend="triton")
    assert out.dtype == (out_dtype or x.dtype) and out.shape == x.shape
    with torch.no_grad():  # the inference launch (no autograd node, no statistics stored)
        assert_inference_launch_agrees(layer_norm(x, w, b, backend="triton"), out)
    leaves = _leaves(x, w, b)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    ref = layer_norm(*(next(it) if t is not None else None for t in (x, w, b)), backend="reference")
    tol = tol or {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}[out.dtype]
    assert_close(out, ref, atol=tol * max(ref.abs().max().item(), 1e-3), what=f"forward {out.dtype}")
    got = grads(out, leaves)
    want = grads(ref, ref_leaves)
    for i, (g, w_) in enumerate(zip(got, want)):
        assert g.dtype == leaves[i].dtype
        gtol = tol if leaves[i].dtype == out.dtype else 4e-3
        # (C = 1: dx is zero up to rounding, hence the floor under the scale)
        assert_close(g, w_, atol=gtol * max(w_.abs().max().item(), 1e-3), what=f"grad {i} {leaves[i].dtype}")
    return out, got


@pytest.mark.parametrize("lead, channels", SHAPES, ids=lambda v: str(v))
def test_triton_interpreter_fp32(lead, channels, interpreter, randn, assert_close, grads):
    x, w, b = _inputs(lead, channels, randn)
    _check_triton(x, w, b, assert_close, grads)


@pytest.mark.parametrize("lead, channels", [((4, 100), 64), ((3, 7), 96), ((11,), 192)])
def test_triton_interpreter_fp16(lead, channels, interpreter, randn, assert_close, grads):
    x, w, b = _inputs(lead, channels, randn, dtype=torch.float16)
    _check_triton(x, w, b, assert_close, grads)


@pytest.mark.parametrize("affine", [(False, True), (True, False), (False, False)])
def test_triton_interpreter_without_weight_or_bias(affine, interpreter, randn, assert_close, grads):
    x, w, b = _inputs((3, 40), 96, randn, affine=affine)
    _check_triton(x, w, b, assert_close, grads)


def test_triton_interpreter_dtypes_strides_and_frozen_inputs(interpreter, randn, assert_close, grads):
    # fp16 activations with float32 parameters (a model under autocast keeps its parameters in float32)
    x, _, _ = _inputs((5, 30), 192, randn, dtype=torch.float16)
    _, w, b = _inputs((1,), 192, randn, seed=4)
    _check_triton(x, w, b, assert_close, grads, tol=4e-3)
    # autocast: float32 in, the autocast dtype out (float16: the interpreter has no bfloat16)
    x, w, b = _inputs((3, 9), 64, randn)
    with torch.autocast("cpu", dtype=torch.float16):
        _check_triton(x, w, b, assert_close, grads, tol=4e-3, out_dtype=torch.float16)
    # non-contiguous x: channels-last view of an NCHW map
    base = randn(2, 96, 5, 7, seed=9, scale=3.0)
    x = base.permute(0, 2, 3, 1).requires_grad_()
    _, w, b = _inputs((1,), 96, randn, seed=5)
    _check_triton(x, w, b, assert_close, grads)
    # frozen parameters / frozen input: only the gradients asked for
    x, w, b = _inputs((4, 10), 64, randn)
    w.requires_grad_(False)
    out = layer_norm(x, w, b, backend="triton")
    _, gb = torch.autograd.grad(out.sum(), (x, b))
    assert_close(gb, torch.full_like(b, 40.0), atol=1e-5)
    x.requires_grad_(False)
    (gb,) = torch.autograd.grad(layer_norm(x, w, b, backend="triton").sum(), (b,))
    assert_close(gb, torch.full_like(b, 40.0), atol=1e-5)


def test_triton_interpreter_empty_batch_and_determinism(interpreter, randn, grads):
    x = torch.zeros(0, 5, 64, requires_grad=True)
    w, b = randn(64, requires_grad=True, seed=1), randn(64, requires_grad=True, seed=2)
    out = layer_norm(x, w, b, backend="triton")
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, w, b))
    assert out.shape == gx.shape == (0, 5, 64) and not gw.any() and not gb.any()
    with torch.no_grad():
        assert layer_norm(x, w, b, backend="triton").shape == (0, 5, 64)
    x, w, b = _inputs((4, 100), 64, randn)  # 7 row blocks over 3 backward programs
    first = [layer_norm(x, w, b, backend="triton"), *grads(layer_norm(x, w, b, backend="triton"), [x, w, b])]
    again = [layer_norm(x, w, b, backend="triton"), *grads(layer_norm(x, w, b, backend="triton"), [x, w, b])]
    for a, c in zip(first, again):
        assert torch.equal(a, c)


def test_triton_interpreter_custom_ops_and_compile(interpreter, randn, assert_close):
    x, w, b = _inputs((3, 5), 96, randn)
    torch.library.opcheck(torch.ops.zoo.layer_norm_fwd.default, (x, w, b, 1e-5, torch.float32),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.zoo.layer_norm_fwd.default, (x, None, None, 1e-5, torch.float16),
                          test_utils=("test_schema", "test_faketensor"))

    def loss(x, w, b):
        return layer_norm(x * 2.0, w, b, backend="triton").square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    want = torch.autograd.grad(loss(x, w, b), (x, w, b))
    for a, c in zip(got, want):
        assert torch.equal(a, c)


def test_triton_kernels_under_interpreter():
    """Runs the interpreter tests above in a fresh process with TRITON_INTERPRET=1."""
    if INTERPRETING:
        pytest.skip("already interpreting: the tests above ran in this process")
    run_pytest_in_interpreter(__file__, "interpreter and not under_interpreter", passed=15)


# ----------------------------------------------------------------------------------------------------------------
# GPU


GPU_SHAPES = [((128, 56, 56), 64), ((128, 28, 28), 128), ((128, 14, 14), 256), ((128, 7, 7), 512),
              ((8, 56, 56), 96), ((8, 28, 28), 192), ((3, 7), 1000), ((5,), 4096), ((3,), 8192)]


@pytest.mark.gpu
def test_gpu_auto_choice_follows_the_speed_rule():
    x = torch.randn(128, 56, 56, 64, device="cuda", dtype=torch.bfloat16)
    w, b = torch.ones(64, device="cuda"), torch.zeros(64, device="cuda")
    with torch.no_grad():
        assert select_backend("layer_norm", None, x, w, b, 1e-5, torch.bfloat16).name == "triton"
        assert select_backend("layer_norm", None, x[:2], w, b, 1e-5, torch.bfloat16).name == "triton"
    w.requires_grad_(True)  # training at a small size: the reference
    assert select_backend("layer_norm", None, x[:2], w, b, 1e-5, torch.bfloat16).name == "reference"
    wide = torch.randn(2, 197, 768, device="cuda", dtype=torch.bfloat16)
    w, b = torch.ones(768, device="cuda"), torch.zeros(768, device="cuda")
    with torch.no_grad():
        assert select_backend("layer_norm", None, wide, w, b, 1e-5, torch.bfloat16).name == "reference"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead, channels", GPU_SHAPES, ids=lambda v: str(v))
def test_triton_gpu_matches_reference(lead, channels, dtype, randn, assert_close, grads, assert_no_fallback):
    x, w, b = _inputs(lead, channels, randn, dtype=dtype, device="cuda")
    with assert_no_fallback():
        _check_triton(x, w, b, assert_close, grads)


@pytest.mark.gpu
@pytest.mark.parametrize("affine", [(False, True), (True, False), (False, False)])
def test_triton_gpu_without_weight_or_bias(affine, randn, assert_close, grads):
    x, w, b = _inputs((4, 33), 192, randn, dtype=torch.bfloat16, device="cuda", affine=affine)
    _check_triton(x, w, b, assert_close, grads)


@pytest.mark.gpu
def test_triton_gpu_autocast_module_and_determinism(randn, assert_close, grads, monkeypatch):
    monkeypatch.setenv("ZOO_OPS_BACKEND", "layer_norm:triton")  # this size is below the auto-choice rule
    torch.manual_seed(0)
    theirs = nn.LayerNorm(64).cuda()
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours = LayerNorm(64).cuda()
    ours.load_state_dict(theirs.state_dict())
    x = randn(16, 28, 28, 64, device="cuda", requires_grad=True, seed=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = ours(x)
        want = theirs(x)
    assert got.dtype == torch.bfloat16 and want.dtype == torch.float32
    assert_close(got, want, atol=1e-2 * want.abs().max().item())
    first = grads(ours(x), [x, ours.weight, ours.bias])
    again = grads(ours(x), [x, ours.weight, ours.bias])
    for a, c in zip(first, again):
        assert torch.equal(a, c)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ours(torch.zeros(0, 64, device="cuda")).shape == (0, 64)


@pytest.mark.gpu
def test_triton_gpu_compiles_without_graph_breaks(randn, assert_close, monkeypatch):
    from triton_checks import assert_inductor_launches, run_compiled

    monkeypatch.setenv("ZOO_OPS_BACKEND", "layer_norm:triton")
    x, w, b = _inputs((16, 28, 28), 96, randn, dtype=torch.bfloat16, device="cuda")

    def f(x, w, b):
        return layer_norm(x * 2, w, b).float().square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    eager = torch.autograd.grad(f(x, w, b), (x, w, b))
    grads, code = run_compiled(lambda: torch.autograd.grad(compiled(x, w, b), (x, w, b)))
    assert_inductor_launches(code, "forward_kernel", "backward_kernel")
    for g, e in zip(grads, eager):
        assert_close(g.float(), e.float(), atol=1e-2 * e.abs().max().item(), what="compiled grad")
    xf, wf, bf = (t.detach().float() for t in (x, w, b))
    torch.library.opcheck(torch.ops.zoo.layer_norm_fwd.default, (xf, wf, bf, 1e-5, torch.bfloat16))
