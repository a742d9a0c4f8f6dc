"""zoo.ops.linear: the reference is F.linear bitwise; input errors; the backends' rules (the kernel only inside
linears_as_op); linears_as_op sends nn.Linear's calls to the op; the triton backend's gradients against the
reference in Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1) and on the GPU, also inside a CUDA
graph."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo import ops
from zoo.ops import linear, linears_as_op, registered_backends
from zoo.ops._dispatch import select_backend
from zoo.ops.triton import interpreter_requested
from triton_checks import interpreter_fixture, run_pytest_in_interpreter

LM = importlib.import_module("zoo.ops.linear")  # the module (``zoo.ops.linear`` is the function)


def _layer(c_in, c_out, randn, device="cpu", seed=1):
    w = randn(c_out, c_in, device=device, seed=seed, scale=max(c_in, 1) ** -0.5).requires_grad_()
    b = randn(c_out, device=device, seed=seed + 1, scale=0.5).requires_grad_()
    return w, b


def _grads(x, w, b, backend, randn, seed=11, **kwargs):
    y = linear(x, w, b, backend=backend)
    g = randn(*y.shape, dtype=y.dtype, device=y.device, seed=seed)
    return (y, *torch.autograd.grad(y, (x, w, b), g, **kwargs))


def test_reference_is_f_linear_bitwise_with_gradients(randn, grads):
    x = randn(3, 5, 24, requires_grad=True, seed=4)
    w, b = _layer(24, 70, randn)
    got, want = linear(x, w, b), F.linear(x, w, b)
    assert torch.equal(got, want)
    for g, r in zip(grads(got, [x, w, b]), grads(want, [x, w, b])):
        assert torch.equal(g, r)
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_input_errors_name_the_argument_and_value():
    x, w, b = torch.ones(2, 8), torch.ones(16, 8), torch.ones(16)
    for args, message in [((x.long(), w, b), "x must be a floating-point tensor"),
                          (([[1.0] * 8], w, b), "x must be a floating-point tensor .*got list"),
                          ((x, torch.ones(16, 9), b), r"weight must be .* \(C_out, 8\) .*got shape \(16, 9\)"),
                          ((x, w, torch.ones(15)), r"bias must be None or .* \(16,\), got shape \(15,\)"),
                          ((x, w, torch.ones(16, device="meta")), "bias must be on the device of x")]:
        with pytest.raises(ValueError, match=message):
            linear(*args)


def test_backend_reasons(randn, monkeypatch):
    assert registered_backends("linear") == ["triton", "reference"] and "linear" in ops.__all__
    x, (w, b) = randn(2, 8), _layer(8, 16, randn)
    supports, prefer = LM._triton_supports, LM._triton_prefer
    assert "only the backward" in supports(x, w, None) and "only the backward" in supports(x, w, b.detach())
    with torch.no_grad():
        assert "only the backward" in supports(x, w, b)
    assert "TRITON_INTERPRET=1" in supports(x, w, b)
    monkeypatch.setattr(LM, "_kernels_interpreted", lambda: True)
    assert supports(x, w, b) is None and "float64" in supports(x.double(), w, b)
    assert "reference is faster" in prefer(x, w, b)
    assert select_backend("linear", None, x, w, b).name == "reference"


def test_linears_as_op_sends_linear_layers_to_the_op_inside_only(randn, monkeypatch):
    """Inside, F.linear calls (an nn.Linear's, keyword bias too) reach the op with their arguments, and the op's
    automatic choice knows it is inside; outside, and after an exception left the scope, neither."""
    calls, real = [], LM.linear
    monkeypatch.setattr(LM, "linear", lambda *a, **k: calls.append((len(a), tuple(k))) or real(*a, **k))
    layer, x = nn.Linear(8, 4), randn(3, 8)
    with linears_as_op():
        assert LM._host_once()
        with linears_as_op():
            y = layer(x)
        z = F.linear(x, layer.weight, bias=layer.bias)
        assert LM._host_once()
    assert calls == [(3, ()), (2, ("bias",))] and not LM._host_once()
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias)) and torch.equal(z, y)
    with pytest.raises(RuntimeError, match="inside"):
        with linears_as_op():
            raise RuntimeError("inside")
    layer(x)
    assert len(calls) == 2 and not LM._host_once()


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel in the CPU interpreter (the tests below run in the subprocess started by the last one)

INTERPRETING = interpreter_requested()

interpreter = interpreter_fixture(lambda: LM._kernels()[0].column_sum_kernel)


def _assert_like_reference(got, want, assert_close, bias_tol):
    """Forward, input and weight gradients bitwise the reference's; the bias's within ``bias_tol`` of its scale."""
    for name, g, r in zip(("y", "x", "weight"), got, want):
        assert g.dtype == r.dtype and torch.equal(g, r), name
    if not want[3].any():  # no rows: a zero bias gradient
        assert torch.equal(got[3], want[3])
    else:
        assert_close(got[3], want[3], atol=bias_tol * want[3].abs().max().item(), what="bias")


@pytest.mark.parametrize("lead, c_in, c_out", [((3, 50), 24, 70), ((150,), 16, 300), ((2, 5, 7), 8, 1),
                                               ((0, 4), 8, 16)], ids=str)
def test_triton_interpreter_gradients(lead, c_in, c_out, interpreter, randn, assert_close):
    """float32: forward, x's and the weight's gradients bitwise the reference's (the same ATen calls); the bias's
    up to the order of its float32 sum (three row splits in the interpreter)."""
    x = randn(*lead, c_in, requires_grad=True, seed=5)
    w, b = _layer(c_in, c_out, randn)
    got, want = (_grads(x, w, b, backend, randn) for backend in ("triton", "reference"))
    _assert_like_reference(got, want, assert_close, 2e-6)


def test_triton_interpreter_fp16_autocast_and_strided_input(interpreter, randn, assert_close):
    """Under fp16 autocast (its casts of x and the float32 parameters made by the op) and for a transposed x, the
    gradients come back in the inputs' dtypes; the bias's is the fp16 column sum rounded once."""
    x = randn(24, 150, requires_grad=True, seed=6)
    xt = x.t()
    w, b = _layer(24, 40, randn)
    with torch.autocast("cpu", dtype=torch.float16):
        got, want = (_grads(xt, w, b, backend, randn) for backend in ("triton", "reference"))
    assert got[0].dtype == torch.float16 and got[1].dtype == got[2].dtype == got[3].dtype == torch.float32
    _assert_like_reference(got, want, assert_close, 2e-3)
    assert torch.equal(got[3], got[3].half().float())  # rounded to fp16 once


def test_triton_interpreter_double_backward(interpreter, randn, assert_close):
    """With create_graph=True the backward records ATen's ops, so second derivatives are the reference's."""
    x = randn(3, 20, 8, requires_grad=True, seed=9)
    w, b = _layer(8, 24, randn)
    second = []
    for backend in ("triton", "reference"):
        y = linear(x, w, b, backend=backend)
        gx, gw, gb = torch.autograd.grad(y.square().sum(), (x, w, b), create_graph=True)
        second.append(torch.autograd.grad(gx.square().sum() + gw.square().sum() + gb.square().sum(), (x, w, b)))
    for name, g, r in zip(("x", "weight", "bias"), *second):
        assert_close(g, r, atol=2e-6 * r.abs().max().item(), what=f"second derivative, {name}")


def test_triton_interpreter_layers_inside_the_scope_take_the_kernel(interpreter, randn, assert_close, monkeypatch):
    """A block's nn.Linear layers inside linears_as_op: their backward sums the bias gradients with the kernel (the
    interpreter is never chosen on its own: forced here), and the block's gradients are the reference's."""
    monkeypatch.setenv("ZOO_OPS_BACKEND", "linear:triton")
    sums, real = [], LM.column_sums
    monkeypatch.setattr(LM, "column_sums", lambda g, *a, **k: sums.append(tuple(g.shape)) or real(g, *a, **k))
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5))
    x = randn(4, 6, 8, seed=3)
    with linears_as_op():
        got = torch.autograd.grad(block(x).square().sum(), list(block.parameters()))
    want = torch.autograd.grad(block(x).square().sum(), list(block.parameters()))
    assert sums == [(24, 5), (24, 32)]
    for g, r in zip(got, want):
        assert_close(g, r, atol=2e-6 * r.abs().max().item(), what="block gradient")


def test_triton_kernels_under_interpreter():
    """Runs the interpreter tests above in a fresh process with TRITON_INTERPRET=1."""
    if INTERPRETING:
        pytest.skip("already interpreting: the tests above ran in this process")
    run_pytest_in_interpreter(__file__, "interpreter and not under_interpreter", passed=7)


# ----------------------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_gpu_choice_only_inside_the_scope_for_training_calls(randn):
    x = randn(64, 32, device="cuda", dtype=torch.bfloat16)
    w, b = _layer(32, 48, randn, device="cuda")
    assert select_backend("linear", None, x, w, b).name == "reference"
    assert "outside linears_as_op" in LM._triton_prefer(x, w, b)
    with linears_as_op():
        assert select_backend("linear", None, x, w, b).name == "triton"
        with torch.no_grad():
            assert select_backend("linear", None, x, w, b).name == "reference"
        assert select_backend("linear", None, x, w, b.detach()).name == "reference"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, c_in, c_out", [(8 * 3136, 96, 288), (8 * 197, 192, 576), (1000, 40, 70), (5, 8, 300)],
                         ids=str)
def test_triton_gpu_gradients(rows, c_in, c_out, dtype, randn, assert_close, assert_no_fallback):
    """Chosen for training calls inside linears_as_op; forward, x's and the weight's gradients bitwise the
    reference's, the bias's within the rounding of its float32 sum; repeated calls (replayed from call plans from the
    third) give the same values."""
    x = randn(rows, c_in, device="cuda", requires_grad=True, seed=12)
    w, b = _layer(c_in, c_out, randn, device="cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        want = _grads(x, w, b, "reference", randn)
        with linears_as_op(), assert_no_fallback():
            assert select_backend("linear", None, x, w, b).name == "triton"
            runs = [_grads(x, w, b, None, randn) for _ in range(4)]
    tol = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}[dtype]
    _assert_like_reference(runs[0], want, assert_close, tol)
    for later in runs[1:]:
        assert all(torch.equal(g, r) for g, r in zip(later, runs[0]))


@pytest.mark.gpu
def test_triton_gpu_inside_a_cuda_graph(randn, assert_close):
    """A linear layer's forward and backward captured in CUDA graphs inside linears_as_op, replayed on new values:
    the same values as eager calls of the op on those values (bias gradient summed by the kernel in both)."""
    layer = nn.Linear(96, 288, device="cuda")
    x = torch.zeros(4, 3136, 96, device="cuda", requires_grad=True)
    g = torch.zeros(4, 3136, 288, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), linears_as_op(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), g)  # warm-up: kernels compiled, plans made
    torch.cuda.current_stream().wait_stream(stream)
    fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with linears_as_op(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        with torch.cuda.graph(fwd):
            y = layer(x)
        with torch.cuda.graph(bwd, pool=fwd.pool()):
            grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), g, retain_graph=True)
    for seed in (1, 2):
        with torch.no_grad():
            x.copy_(randn(*x.shape, device="cuda", seed=seed))
            g.copy_(randn(*g.shape, device="cuda", dtype=torch.bfloat16, seed=seed + 10))
        fwd.replay()
        bwd.replay()
        with linears_as_op(), torch.autocast("cuda", dtype=torch.bfloat16):
            want = _grads(x, layer.weight, layer.bias, "triton", lambda *s, **k: g)
        assert torch.equal(y, want[0])
        for name, got, ref in zip(("x", "weight", "bias"), grads, want[1:]):
            assert torch.equal(got, ref), name
