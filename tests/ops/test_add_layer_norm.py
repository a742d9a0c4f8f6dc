"""add_layer_norm: the residual sum and the norm after it. The reference is ``x + residual`` then ``layer_norm``
(bitwise, with gradients); input errors; dispatch; the one-kernel Triton forward against the sum and the
layer_norm kernel on it, in Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1) and on the GPU; the
blocks of every family that use it against the unfused sum and norm."""
from __future__ import annotations

import importlib

import pytest
import torch

from zoo import ops
from zoo.ops import add_layer_norm, layer_norm, registered_backends
from zoo.ops._dispatch import select_backend
from triton_checks import assert_inference_launch_agrees, interpreter_fixture, run_pytest_in_interpreter

LN = importlib.import_module("zoo.ops.layer_norm")
INTERPRETING = LN.interpreter_requested()
interpreter = interpreter_fixture(lambda: LN._kernels()[0])

# (leading shape, C): DeiT-like tokens, one row, rows spanning several programs, a width no power of two
SHAPES = [((2, 5), 64), ((3,), 1), ((4, 100), 96), ((2, 3), 40)]


def _inputs(lead, channels, randn, x_dtype=torch.float32, r_dtype=torch.float32, device="cpu", seed=0,
            requires_grad=False):
    x = randn(*lead, channels, dtype=x_dtype, device=device, seed=seed, scale=2.0) + 0.5
    r = randn(*lead, channels, dtype=r_dtype, device=device, seed=seed + 1)
    w = randn(channels, device=device, seed=seed + 2)
    b = randn(channels, device=device, seed=seed + 3)
    return [t.requires_grad_(requires_grad) for t in (x, r, w, b)]


# ----------------------------------------------------------------------------------------------------------------
# reference backend (CPU)


@pytest.mark.parametrize("x_dtype, r_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.float16, torch.float16), (torch.float64, torch.float64)])
@pytest.mark.parametrize("lead, channels", SHAPES[:3], ids=str)
def test_reference_is_the_sum_then_layer_norm_bitwise_with_gradients(lead, channels, x_dtype, r_dtype, randn):
    x, r, w, b = _inputs(lead, channels, randn, x_dtype, r_dtype, requires_grad=True)
    total, y = add_layer_norm(x, r, w, b, 1e-6, backend="reference")
    want_total = x + r
    want = layer_norm(want_total, w, b, 1e-6)
    assert total.dtype == torch.promote_types(x_dtype, r_dtype) and torch.equal(total, want_total)
    assert y.dtype == want.dtype and torch.equal(y, want)
    # both outputs reach the loss
    got = torch.autograd.grad(((total * 0.5).sum() + (y.double() ** 2).sum()), [x, r, w, b])
    expected = torch.autograd.grad(((want_total * 0.5).sum() + (want.double() ** 2).sum()), [x, r, w, b])
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_autocast_writes_the_norm_in_the_autocast_dtype_and_the_sum_as_plus(randn):
    x, r, w, b = _inputs((2, 7), 32, randn, r_dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, y = add_layer_norm(x, r, w, b)
        want = layer_norm(x + r, w, b)
    assert total.dtype == torch.float32 and y.dtype == torch.bfloat16 == want.dtype
    assert torch.equal(total, x + r) and torch.equal(y, want)


@pytest.mark.parametrize("bad, message", [
    (dict(residual=torch.ones(2, 4, 7)), r"residual must have the shape and device of x \(\(2, 4, 8\) on cpu\), "
                                         r"got \(2, 4, 7\) on cpu"),
    (dict(residual=torch.ones(2, 4, 8, dtype=torch.long)), "residual must be a floating-point tensor, got dtype"),
    (dict(residual=None), "residual must be a floating-point tensor, got NoneType"),
    (dict(weight=torch.ones(7)), r"weight must be None or a floating-point \(8,\) tensor"),
    (dict(eps=-1.0), "eps must be a finite real number >= 0, got -1.0"),
    (dict(x=torch.ones(2, 4, 8, dtype=torch.long)), "x must be a floating-point tensor of shape"),
])
def test_input_errors_name_the_argument_and_value(bad, message):
    args = dict(x=torch.ones(2, 4, 8), residual=torch.ones(2, 4, 8), weight=torch.ones(8), bias=torch.zeros(8),
                eps=1e-5)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        add_layer_norm(**args)


def test_registered_exported_and_reference_chosen_on_cpu(randn):
    assert registered_backends("add_layer_norm") == ["triton", "reference"]
    assert "add_layer_norm" in ops.__all__
    x, r, w, b = _inputs((2, 3), 64, randn)
    args = (x, r, w, b, 1e-5, torch.float32, torch.float32)
    assert select_backend("add_layer_norm", None, *args).name == "reference"
    reason = LN._add_triton_supports(x, r, w.requires_grad_(), b, 1e-5, torch.float32, torch.float32)
    assert reason is not None and "training" in reason


# calls of add_layer_norm in one forward: one a block (its attention branch's sum with the MLP's norm), and where
# blocks pass their last sum on (all but BiFormer's), one more a block after a stage's first (with the next block's
# first norm)
FUSED_SUMS = {"agent_deit_tiny": 12 + 11, "agent_swin_t": (2 + 2 + 6 + 2) + (1 + 1 + 5 + 1),
              "agent_pvt_tiny": (2 + 2 + 2 + 2) + (1 + 1 + 1 + 1), "agent_cswin_t": (2 + 4 + 18 + 1) + (1 + 3 + 17 + 0),
              "biformer_tiny": 2 + 2 + 8 + 2,
              # VOLO-D1: outlookers, transformers (three stages), class-attention blocks
              "zoo_volo_d1_224": (4 + 14 + 2) + (3 + (3 + 7 + 1))}


@pytest.mark.parametrize("name", FUSED_SUMS)
def test_blocks_sum_their_branches_through_the_op(name, monkeypatch):
    """The pre-norm blocks of these families make their residual sums with the norm that follows through
    add_layer_norm (and give the outputs of the sum then the norm: the families' parity tests)."""
    import timm

    from zoo.backbones import _layers

    calls = []
    real = _layers.add_layer_norm

    def counting(x, residual, weight, bias, eps):
        calls.append(x.shape[-1])
        return real(x, residual, weight, bias, eps)

    monkeypatch.setattr(_layers, "add_layer_norm", counting)
    model = timm.create_model(name).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert len(calls) == FUSED_SUMS[name]


# ----------------------------------------------------------------------------------------------------------------
# triton backend: Triton's CPU interpreter (subprocess)


def _check_triton(x, r, w, b, eps=1e-5):
    """The one-kernel forward: the sum bitwise ``x + r``; the norm that of the layer_norm kernel's inference launch
    on that sum (bitwise in the interpreter, within 2 eps on a GPU)."""
    with torch.no_grad():
        total, y = add_layer_norm(x, r, w, b, eps, backend="triton")
        want = layer_norm(x + r, w, b, eps, backend="triton")
    assert total.dtype == torch.promote_types(x.dtype, r.dtype) and torch.equal(total, x + r)
    assert_inference_launch_agrees(y, want)
    return total, y


@pytest.mark.parametrize("x_dtype, r_dtype", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                              (torch.float16, torch.float16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("lead, channels", SHAPES, ids=str)
def test_triton_interpreter_matches_the_sum_and_the_norm_kernel(lead, channels, x_dtype, r_dtype, interpreter,
                                                                randn):
    _check_triton(*_inputs(lead, channels, randn, x_dtype, r_dtype, seed=5))


def test_triton_interpreter_autocast_strides_and_empty(interpreter, randn):
    x, r, w, b = _inputs((3, 9), 64, randn, r_dtype=torch.float16, seed=6)
    with torch.autocast("cpu", dtype=torch.float16):  # float32 stream + fp16 branch: float32 sum, fp16 norm
        total, y = _check_triton(x, r, w, b)
    assert total.dtype == torch.float32 and y.dtype == torch.float16
    base = randn(2, 96, 5, 7, seed=7, scale=3.0)  # a channels-last view of an NCHW map: copied, same values
    x = base.permute(0, 2, 3, 1)
    _check_triton(x, torch.ones_like(x), *_inputs((1,), 96, randn, seed=8)[2:])
    total, y = _check_triton(torch.zeros(0, 4, 64), torch.zeros(0, 4, 64), w, b)
    assert total.shape == y.shape == (0, 4, 64)


def test_triton_kernels_under_interpreter():
    """Runs the interpreter tests above in a fresh process with TRITON_INTERPRET=1."""
    if INTERPRETING:
        pytest.skip("already interpreting: the tests above ran in this process")
    run_pytest_in_interpreter(__file__, "interpreter and not under_interpreter", passed=17)


# ----------------------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_gpu_auto_choice_is_the_kernel_for_inference_only(randn):
    x, r, w, b = _inputs((128, 197), 192, randn, r_dtype=torch.bfloat16, device="cuda")
    args = (x, r, w, b, 1e-6, torch.float32, torch.bfloat16)
    with torch.no_grad():
        assert select_backend("add_layer_norm", None, *args).name == "triton"
    assert select_backend("add_layer_norm", None, x, r.requires_grad_(), *args[2:]).name == "reference"


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype, r_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                              (torch.float32, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("lead, channels", [((128, 197), 192), ((8, 56, 56), 96), ((3, 7), 1000)], ids=str)
def test_triton_gpu_matches_the_sum_and_the_norm_kernel(lead, channels, x_dtype, r_dtype, randn,
                                                        assert_no_fallback):
    with assert_no_fallback():
        _check_triton(*_inputs(lead, channels, randn, x_dtype, r_dtype, device="cuda", seed=9))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, y = _check_triton(*_inputs(lead, channels, randn, x_dtype, r_dtype, device="cuda", seed=10))
    assert y.dtype == torch.bfloat16


@pytest.mark.gpu
def test_gpu_models_with_the_fused_sum_match_the_unfused_blocks(monkeypatch):
    """Eager bf16 inference of each family with the one-kernel sum and norm against the same model with the reference
    (the sum, then the norm's own kernel): the norm kernels differ only in their compiled reduction layout."""
    import timm

    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224, device="cuda")
    for name in ("agent_deit_tiny", "agent_swin_t", "biformer_tiny", "zoo_volo_d1_224"):
        model = timm.create_model(name).cuda().eval()
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            fused = model(x).float()
            monkeypatch.setenv("ZOO_OPS_BACKEND", "add_layer_norm:reference")
            unfused = model(x).float()
            monkeypatch.delenv("ZOO_OPS_BACKEND")
        err = (fused - unfused).abs().max().item() / unfused.abs().max().item()
        assert err < 2e-2, f"{name}: {err:.3g}"
