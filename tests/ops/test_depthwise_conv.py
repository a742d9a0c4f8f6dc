"""depthwise_conv: the reference against nn.Conv2d / F.interpolate as the models wrote them (bitwise, with
gradients), input errors, dispatch; the fused Triton kernel against a float64 oracle that rounds where the unfused
layers write, in Triton's CPU interpreter (a subprocess with TRITON_INTERPRET=1) and on the GPU (bf16/fp16/fp32,
autocast, torch.compile, models)."""
from __future__ import annotations

import contextlib
import importlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo import ops
from zoo.ops import depthwise_conv, registered_backends
from zoo.ops._dispatch import select_backend
from zoo.ops.triton import interpreter_requested, triton_missing_reason
from triton_checks import interpreter_fixture, require_triton, run_pytest_in_interpreter

DW = importlib.import_module("zoo.ops.depthwise_conv")  # the module (``zoo.ops.depthwise_conv`` is the function)

# (B, H_in, W_in, C, K, size): Agent-Swin windows (a slice of qkv), Agent-PVT upsampled values, BiFormer's 5x5 LePE,
# channels that no channel block divides, a non-square upsampling with odd ratios, a downsampling, one pixel, rows
# wider than a tile (two column blocks, the last partial)
CASES = [(3, 7, 7, 96, 3, None), (2, 7, 7, 64, 3, (28, 28)), (2, 6, 5, 40, 5, None), (2, 7, 7, 20, 3, (14, 14)),
         (1, 9, 11, 24, 3, (20, 17)), (2, 12, 10, 16, 3, (5, 7)), (2, 1, 1, 8, 3, None), (1, 3, 70, 8, 3, None)]


def _inputs(b, h_in, w_in, c, k, size, randn, dtype=torch.float32, device="cpu", seed=0, bias=True, residual=True):
    """x as a slice of a wider projection (the models' layout), weight, bias, residual."""
    proj = randn(b, h_in, w_in, 3 * c, dtype=dtype, device=device, seed=seed)
    x = proj[..., c:2 * c]
    weight = randn(c, 1, k, k, dtype=dtype, device=device, seed=seed + 1, scale=1 / k)
    b_ = randn(c, dtype=dtype, device=device, seed=seed + 2, scale=0.5) if bias else None
    h, w = size or (h_in, w_in)
    r = randn(b, h, w, c, dtype=dtype, device=device, seed=seed + 3) if residual else None
    return x, weight, b_, r


def _unfused(x, weight, bias, residual, size):
    """The models' former code: values to NCHW, resized, nn.Conv2d-style conv, back to channels-last, plus out."""
    b, h, w, c = x.shape
    maps = x.permute(0, 3, 1, 2).reshape(b, c, h, w)
    if size is not None:
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    y = F.conv2d(maps, weight, bias, padding=weight.shape[-1] // 2, groups=c).permute(0, 2, 3, 1)
    return y if residual is None else residual + y


def _oracle(x, weight, bias, residual, size, compute):
    """float64 result, rounding where the unfused layers write: the resized map (x's dtype), the conv inputs and
    output (``compute``), the sum (its promoted dtype)."""
    def r(t, dtype):
        return None if t is None else t.to(dtype).double()
    maps = x.double().permute(0, 3, 1, 2)
    if size is not None:
        maps = r(F.interpolate(maps, size=size, mode="bilinear", align_corners=False), x.dtype)
    y = F.conv2d(r(maps, compute), r(weight, compute), r(bias, compute), padding=weight.shape[-1] // 2,
                 groups=x.shape[-1])
    y = r(y, compute).permute(0, 2, 3, 1)
    return y if residual is None else y + residual.double()


# ----------------------------------------------------------------------------------------------------------------
# reference backend (CPU)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_reference_is_the_unfused_layers_bitwise_with_gradients(case, dtype, randn, grads):
    x, weight, bias, residual = (t.requires_grad_() for t in _inputs(*case, randn, dtype=dtype))
    size = case[-1]
    want = _unfused(x, weight, bias, residual, size)
    got = depthwise_conv(x, weight, bias, residual=residual, size=size, backend="reference")
    assert torch.equal(got, want)
    for g, w in zip(grads(got, [x, weight, bias, residual]), grads(want, [x, weight, bias, residual])):
        assert torch.equal(g, w)


def test_gradcheck_reference(randn):
    x, weight, bias, residual = (t.requires_grad_() for t in _inputs(2, 3, 4, 5, 3, (5, 6), randn,
                                                                     dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda *a: depthwise_conv(*a[:3], residual=a[3], size=(5, 6), backend="reference"), (x, weight, bias, residual))


def test_no_bias_no_residual_and_autocast_dtypes(randn):
    x, weight, _, _ = _inputs(2, 5, 5, 8, 3, None, randn)
    want = F.conv2d(x.permute(0, 3, 1, 2), weight, padding=1, groups=8).permute(0, 2, 3, 1)
    assert torch.equal(depthwise_conv(x, weight), want)
    residual = randn(2, 5, 5, 8, seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 conv; a float32 residual promotes the sum, as "+" does
        assert depthwise_conv(x, weight).dtype == torch.bfloat16
        assert depthwise_conv(x, weight, residual=residual).dtype == torch.float32


def _bad(**override):
    x, weight, bias, residual = _inputs(2, 4, 4, 6, 3, None, lambda *s, **k: torch.randn(*s, dtype=k.get("dtype")))
    args = dict(x=x, weight=weight, bias=bias, residual=residual)
    args.update(override)
    return args


@pytest.mark.parametrize("args, message", [
    (_bad(x=torch.ones(2, 4, 6)), r"x must be a floating-point \(B, H, W, C\) tensor, got shape \(2, 4, 6\)"),
    (_bad(x=torch.ones(2, 4, 4, 6, dtype=torch.long)), "x must be a floating-point"),
    (_bad(weight=torch.ones(6, 1, 2, 2)), r"weight must be .* odd K .* got shape \(6, 1, 2, 2\)"),
    (_bad(weight=torch.ones(5, 1, 3, 3)), r"\(C=6\), got shape \(5, 1, 3, 3\)"),
    (_bad(weight=torch.ones(6, 2, 3, 3)), "weight must be"),
    (_bad(bias=torch.ones(5)), r"bias must be None or a floating-point \(C,\) tensor \(C=6\), got shape \(5,\)"),
    (_bad(residual=torch.ones(2, 4, 5, 6)), r"residual .* shape \(2, 4, 4, 6\) .* got shape \(2, 4, 5, 6\)"),
    (_bad(size=(4, 0)), r"size must be None or two positive ints \(H, W\), got \(4, 0\)"),
    (_bad(size=(3,)), "size must be None or two positive ints"),
    (_bad(weight=torch.ones(6, 1, 3, 3, dtype=torch.float64)), "weight has dtype torch.float64 but x has"),
    (_bad(weight=torch.ones(6, 1, 3, 3, device="meta")), "weight must be on the device of x"),
    (_bad(residual=None, inplace=True), "inplace=True adds into residual, which is None"),
    (_bad(residual=torch.ones(2, 4, 4, 6, dtype=torch.float16), inplace=True),
     r"inplace=True writes the sum in residual's dtype torch.float16, but the sum is torch.float32"),
    (_bad(residual=torch.ones(2, 4, 4, 6, requires_grad=True), inplace=True),
     "inplace=True is for calls autograd does not record"),
])
def test_input_errors_name_the_argument_and_value(args, message):
    with pytest.raises(ValueError, match=message):
        depthwise_conv(**args)


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=str)
def test_reference_inplace_adds_into_the_residual(case, randn):
    """inplace=True writes ``residual + conv`` into the residual itself, a strided view included (Agent-DeiT's patch
    rows past the class token): the same values as the out-of-place sum, nothing else of the base touched."""
    x, weight, bias, residual = _inputs(*case, randn)
    want = depthwise_conv(x, weight, bias, residual=residual, size=case[-1], backend="reference")
    base = torch.cat([torch.full_like(residual[:, :1], 7.0), residual], dim=1)  # a row before the view, kept
    view = base[:, 1:]
    with torch.no_grad():
        got = depthwise_conv(x, weight, bias, residual=view, size=case[-1], inplace=True, backend="reference")
    assert got is view and torch.equal(view, want)
    assert torch.equal(base[:, :1], torch.full_like(residual[:, :1], 7.0))


# (channels, kernel) of every call: Agent-Swin's value conv in its agent blocks (stages 0-2), Agent-DeiT's in every
# block (patch tokens only); BiFormer's position-embedding conv then LePE in every block
MODEL_CONVS = {"agent_swin_t": [(c, 3) for c, depth in ((96, 2), (192, 2), (384, 6)) for _ in range(depth)],
               "agent_deit_tiny": [(192, 3)] * 12,
               # LePE per branch: stages 1-2 one global branch a block, stage 3 two 128-channel stripe branches
               "agent_cswin_t": [(64, 3)] * 2 + [(128, 3)] * (4 + 2 * 18) + [(512, 3)],
               "biformer_tiny": [(c, k) for c, depth in ((64, 2), (128, 2), (256, 8), (512, 2)) for _ in range(depth)
                                 for k in (3, 5)]}


@pytest.mark.parametrize("name", MODEL_CONVS)
def test_models_route_their_depthwise_convs_through_the_op(name, monkeypatch):
    import timm

    import zoo  # noqa: F401  (registers the models)

    calls = []
    dispatch = DW.dispatch
    monkeypatch.setattr(DW, "dispatch", lambda op, backend, x, w, *a, **k: calls.append((x.shape[-1], w.shape[-1]))
                        or dispatch(op, backend, x, w, *a, **k))
    with torch.no_grad():
        timm.create_model(name).eval()(torch.randn(1, 3, 224, 224))
    assert calls == MODEL_CONVS[name]


def test_registered_exported_and_reference_chosen_on_cpu(randn, monkeypatch):
    assert registered_backends("depthwise_conv") == ["triton", "reference"]
    assert "depthwise_conv" in ops.__all__
    x, weight, bias, residual = _inputs(*CASES[0], randn)
    assert select_backend("depthwise_conv", None, x, weight, bias, residual, (7, 7), torch.float32).name == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter serves CPU tensors, but is never chosen for them
    monkeypatch.setattr(DW, "_kernels_interpreted", lambda: True)
    assert select_backend("depthwise_conv", None, x, weight, bias, residual, (7, 7), torch.float32).name == "reference"
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(DW, "_kernels_interpreted", lambda: False)
    why = re.escape(triton_missing_reason() or "TRITON_INTERPRET=1")
    with pytest.warns(UserWarning, match=why):  # asked for, unavailable: falls back, says why
        got = depthwise_conv(x, weight, bias, residual=residual, backend="triton")
    assert torch.equal(got, _unfused(x, weight, bias, residual, None))


def test_triton_supports_reasons(randn, monkeypatch):
    monkeypatch.setattr(DW, "_kernels_interpreted", lambda: True)
    x, weight, bias, residual = _inputs(*CASES[0], randn)
    supports = DW._triton_supports
    assert supports(x, weight, bias, residual, (7, 7), torch.float32) is None
    assert supports(x.requires_grad_(), weight, bias, residual, (7, 7), torch.float32) is None  # training: eager
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # and traced (the op's registered autograd)
    assert supports(x, weight, bias, residual, (7, 7), torch.float32) is None
    monkeypatch.undo()
    monkeypatch.setattr(DW, "_kernels_interpreted", lambda: True)
    x = x.detach()
    assert "float64" in supports(x.double(), weight, bias, residual, (7, 7), torch.float64)
    assert "bfloat16" in supports(x, weight, bias, residual, (7, 7), torch.bfloat16)
    assert "kernel size 9: at most 7" in supports(x, torch.ones(96, 1, 9, 9), bias, residual, (7, 7), torch.float32)
    monkeypatch.setattr(DW, "_kernels_interpreted", lambda: False)
    assert "TRITON_INTERPRET=1" in supports(x, weight, bias, residual, (7, 7), torch.float32)


def test_torch_func_transforms_take_the_reference(randn, monkeypatch):
    """Inside ``torch.func.grad`` / ``vmap`` the kernels (which read raw memory, and whose training node has no
    functorch rules) refuse, a requested triton backend falls back with that reason, and no earlier call's choice is
    reused there."""
    from zoo.ops._dispatch import call_key

    require_triton()
    monkeypatch.setattr(DW, "_kernels_interpreted", lambda: True)  # the kernels would take these CPU tensors
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, weight, bias, residual = _inputs(*CASES[0], randn)
    assert DW._triton_supports(x, weight, bias, residual, (7, 7), torch.float32) is None

    def loss(w, backend):
        return depthwise_conv(x, w, bias, residual=residual, backend=backend).square().sum()

    with pytest.warns(UserWarning, match="inside a torch.func transform"):
        got = torch.func.grad(loss)(weight, "triton")
    assert torch.equal(got, torch.func.grad(loss)(weight, "reference"))
    keys = torch.func.vmap(lambda t: torch.tensor(call_key(t) is None))(x)
    assert keys.all() and call_key(x) is not None


def test_tiles_are_blocks_of_rows_and_channels():
    """(TILE_H, TILE_W, BLOCK_C, warps): whole short rows, 64-column blocks of long ones, 4096 elements."""
    assert DW._tiles(14, 14, 384) == (4, 16, 64, 4)  # Agent-DeiT: a power-of-two block of rows
    assert DW._tiles(7, 7, 96) == (4, 8, 32, 4)  # Agent-Swin windows: 96 channels have no 64-channel blocks
    assert DW._tiles(56, 56, 64) == (2, 64, 32, 4)  # BiFormer / Agent-PVT stage 0: long rows take 32 channels
    assert DW._tiles(333, 200, 96) == (2, 64, 32, 4)  # rows wider than 64 columns split in column blocks
    assert DW._tiles(3, 5, 40) == (2, 8, 32, 4) and DW._tiles(1, 1, 8) == (1, 1, 32, 4)
    # the one-pass 3x3 backward: 56-row programs, 16 columns x 16 channels for maps of 28 columns or more, else 8 x 32
    assert DW._backward3_tiles(56) == DW._backward3_tiles(28) == (56, 16, 16, 4)
    assert DW._backward3_tiles(27) == DW._backward3_tiles(7) == DW._backward3_tiles(0) == (56, 8, 32, 2)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel in the CPU interpreter (the tests below run in the subprocess started by the last one)

INTERPRETING = interpreter_requested()


interpreter = interpreter_fixture(lambda: DW._kernel())


def _check_triton(inputs, size, compute, assert_close, tol):
    x, weight, bias, residual = inputs
    out = depthwise_conv(x, weight, bias, residual=residual, size=size, backend="triton")
    want = _oracle(x, weight, bias, residual, size, compute)
    assert out.shape == want.shape and out.is_contiguous()
    assert out.dtype == (compute if residual is None else torch.promote_types(residual.dtype, compute))
    assert_close(out, want, atol=tol * want.abs().max().item(), what=f"forward {compute}")
    return out


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_interpreter_fp32(case, interpreter, randn, assert_close):
    _check_triton(_inputs(*case, randn, seed=3), case[-1], torch.float32, assert_close, 1e-6)


@pytest.mark.parametrize("bias, residual", [(False, True), (True, False), (False, False)])
def test_triton_interpreter_fp32_optional_terms(bias, residual, interpreter, randn, assert_close):
    case = CASES[1]
    _check_triton(_inputs(*case, randn, bias=bias, residual=residual), case[-1], torch.float32, assert_close, 1e-6)


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=str)
def test_triton_interpreter_fp16_and_fp16_autocast(case, interpreter, randn, assert_close):
    inputs = _inputs(*case, randn, seed=4)
    _check_triton([t.half() for t in inputs], case[-1], torch.float16, assert_close, 1e-3)
    with torch.autocast("cpu", dtype=torch.float16):  # float32 everything, fp16 conv, float32 residual sum
        _check_triton(inputs, case[-1], torch.float16, assert_close, 1e-3)


def test_triton_interpreter_strided_residual_as_agent_deit_passes_it(interpreter, randn, assert_close):
    """Agent-DeiT adds the conv to the patch tokens of the attention output: the residual is a view that skips each
    item's class token (item stride 197 tokens for 196 pixels)."""
    b, grid, c = 2, 14, 24
    tokens = randn(b, 1 + grid * grid, c, seed=10)
    x, weight, bias, _ = _inputs(b, grid, grid, c, 3, None, randn, seed=11)
    residual = tokens[:, 1:].view(b, grid, grid, c)
    out = depthwise_conv(x, weight, bias, residual=residual, backend="triton")
    want = _oracle(x, weight, bias, residual, None, torch.float32)
    assert_close(out, want, atol=1e-6 * want.abs().max().item(), what="strided residual")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_interpreter_inplace_into_a_strided_residual(dtype, interpreter, randn):
    """inplace=True stores through the residual's strides (the patch rows of Agent-DeiT's attention output): the
    bits of the out-of-place kernel, the class-token rows untouched."""
    b, grid, c = 2, 14, 24
    tokens = randn(b, 1 + grid * grid, c, seed=13, dtype=dtype)
    x, weight, bias = (t.to(dtype) for t in _inputs(b, grid, grid, c, 3, None, randn, seed=14)[:3])
    want = depthwise_conv(x, weight, bias, residual=tokens[:, 1:].view(b, grid, grid, c), backend="triton")
    class_rows = tokens[:, :1].clone()
    got = depthwise_conv(x, weight, bias, residual=tokens[:, 1:].view(b, grid, grid, c), inplace=True,
                         backend="triton")
    assert got.data_ptr() == tokens[:, 1:].data_ptr() and torch.equal(got, want)
    assert torch.equal(tokens[:, 1:].view(b, grid, grid, c), want) and torch.equal(tokens[:, :1], class_rows)


@pytest.mark.parametrize("layout", ["channels_innermost", "taps_transposed"])
def test_triton_interpreter_reads_the_weight_in_any_layout(layout, interpreter, randn):
    """A (C, 1, K, K) weight with the channels innermost (the models' cached copies on CUDA) is read through its
    strides, one whose taps the kernel cannot stride through is made contiguous: the same bits as contiguous."""
    x, weight, bias, residual = _inputs(*CASES[2], randn, seed=12)
    if layout == "channels_innermost":
        other = torch.empty_permuted(weight.shape, (1, 2, 3, 0)).copy_(weight)
        c = weight.shape[0]
        assert (other.stride(0), other.stride(2), other.stride(3)) == (1, 5 * c, c)
    else:
        other = weight.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(other, weight)
    want = depthwise_conv(x, weight, bias, residual=residual, backend="triton")
    assert torch.equal(depthwise_conv(x, other, bias, residual=residual, backend="triton"), want)


def _grads_both(inputs, size, grads, dtype=None, autocast=None, backends=("triton", "reference")):
    """Every gradient (the projection x is a slice of, weight, bias, residual) of the op on each backend."""
    x, weight, bias, residual = inputs
    proj = x._base if x._base is not None else x
    results = []
    for backend in backends:
        leaves = [t.detach().to(dtype or t.dtype, copy=True).requires_grad_() if t is not None else None
                  for t in (proj, weight, bias, residual)]
        x_view = leaves[0].as_strided(x.shape, x.stride(), x.storage_offset())
        context = torch.autocast(x.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        with context:
            out = depthwise_conv(x_view, *leaves[1:3], residual=leaves[3], size=size, backend=backend)
        present = [t for t in leaves if t is not None]
        results.append([out, *grads(out, present, seed=77)])
    return results


@pytest.mark.parametrize("case", [(2, 7, 7, 40, 3, None), CASES[2], CASES[3], CASES[7]], ids=str)
def test_triton_interpreter_fp32_gradients(case, interpreter, randn, grads, assert_close):
    """Training calls: the input's gradient by the forward kernel with reversed taps, the weight's and bias's by
    the two reduction kernels, the residual's the output's; every one the reference's in float32."""
    got, want = _grads_both(_inputs(*case, randn, seed=21), case[-1], grads)
    for name, a, e in zip(("out", "d proj", "d weight", "d bias", "d residual"), got, want):
        assert a.dtype == e.dtype
        assert_close(a, e, atol=1e-5 * e.abs().max().item(), what=name)


@pytest.mark.parametrize("bias, residual", [(True, False), (False, False)])
def test_triton_interpreter_gradients_without_optional_terms(bias, residual, interpreter, randn, grads,
                                                            assert_close):
    inputs = _inputs(1, 5, 6, 20, 3, None, randn, seed=22, bias=bias, residual=residual)
    got, want = _grads_both(inputs, None, grads)
    assert len(got) == 3 + bias + residual
    for a, e in zip(got, want):
        assert_close(a, e, atol=1e-5 * e.abs().max().item())


def test_triton_interpreter_fp16_gradients_round_as_the_layers(interpreter, randn, grads, assert_close):
    """fp16 tensors, and float32 ones under fp16 autocast (the weight's and bias's gradients then come back
    float32, rounded to fp16 first as the conv's backward writes them), against a float64 reference."""
    inputs = _inputs(1, 7, 7, 40, 3, None, randn, seed=23)
    (want,) = _grads_both(inputs, None, grads, dtype=torch.float64, backends=("reference",))
    (low,) = _grads_both(inputs, None, grads, dtype=torch.float16, backends=("triton",))
    (auto,) = _grads_both(inputs, None, grads, autocast=torch.float16, backends=("triton",))
    for a, b_, e in zip(low, auto, want):
        assert_close(a, e, atol=2e-3 * e.abs().max().item())
        assert_close(b_, e, atol=2e-3 * e.abs().max().item())
    assert [t.dtype for t in auto] == [torch.float32] * 5
    assert all(torch.equal(t, t.half().float()) for t in auto[2:4])  # weight and bias grads: fp16 values


def test_triton_interpreter_weight_grads_one_pass_and_tiled_agree_and_repeat(interpreter, randn, monkeypatch):
    """A 3x3 conv's weight and bias gradients from the one-pass backward kernel equal the tiled kernel's (partial
    sums over 1, 2 or 3 programs) to float32 rounding; a call repeats its bits; an empty map gives zeros."""
    from zoo.ops.triton import direct

    monkeypatch.setattr(DW, "_BACKWARD3_TILES", {0: (8, 16, 16, 4)})  # two row blocks of the one-pass kernel, two steps
    x, weight, *_ = _inputs(2, 11, 7, 20, 3, None, randn, seed=24)  # and a second step past the map's last row
    g = randn(*x.shape, seed=25)
    dw, db = DW.conv_backward(g, x, None, 3, (torch.float32, torch.float32))[1:]
    assert torch.equal(dw, DW.conv_backward(g, x, None, 3, (torch.float32, torch.float32))[1])
    for splits in (1, 2, 3):
        monkeypatch.setattr(DW, "_weight_grad_splits", lambda tiles, c_blocks, device, n=splits: n)
        tiled = DW._tiled_weight_grads(g, x, 3, torch.empty_like(dw), torch.empty_like(db), direct)
        for a, e in zip(tiled, (dw, db)):
            torch.testing.assert_close(a, e, rtol=0, atol=1e-6 * e.abs().max().item())
    empty_dw, empty_db = DW.conv_backward(g[:0], x[:0], None, 3, (torch.float32, torch.float32))[1:]
    assert empty_dw.shape == (20, 1, 3, 3) and not empty_dw.any() and not empty_db.any()


@pytest.mark.parametrize("tiles", [None, (4, 8, 16, 2)], ids=["default", "row-blocks-of-4"])
def test_triton_interpreter_one_pass_backward_input_grad_is_the_reversed_conv(tiles, interpreter, randn,
                                                                              monkeypatch):
    """The one-pass 3x3 backward's input gradient has the bits of the forward kernel with its taps reversed (fp16:
    the same roundings), written fresh or added into a strided tensor (the values' slice of a qkv gradient), with
    any channel stride; one row block of three four-row steps, or three blocks of one; two or three column blocks
    and three channel blocks."""
    # the kernel steps four rows: a block of other rows would overlap the next
    assert all(rows % 4 == 0 for rows, *_ in DW._BACKWARD3_TILES.values())
    if tiles is not None:
        monkeypatch.setattr(DW, "_BACKWARD3_TILES", {0: tiles})
    dtype = torch.float16
    x, weight, *_ = _inputs(1, 10, 18, 40, 3, None, randn, dtype=dtype, seed=26)
    g = randn(*x.shape, dtype=dtype, seed=27)
    w = DW.channels_innermost(weight)
    fresh, _, _ = DW.conv_backward(g, x, w, 3, (dtype, None))
    assert torch.equal(fresh, DW.input_grad(g, w))
    into = randn(1, 10, 18, 120, dtype=dtype, seed=28)[..., 80:]
    want = DW.input_grad(g, w, into=into.clone())
    got, _, _ = DW.conv_backward(g, x, w, 3, (dtype, dtype), into=into)
    assert got is into and torch.equal(into, want)
    g_nchw = g.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # channel stride H * W
    assert torch.equal(DW.conv_backward(g_nchw, x, w, 3, (dtype, None))[0], fresh)


def test_triton_interpreter_empty_and_repeatable(interpreter, randn):
    x, weight, bias, residual = _inputs(*CASES[3], randn)
    first = depthwise_conv(x, weight, bias, residual=residual, size=(14, 14), backend="triton")
    assert torch.equal(first, depthwise_conv(x, weight, bias, residual=residual, size=(14, 14), backend="triton"))
    empty = depthwise_conv(x[:0], weight, bias, size=(3, 3), backend="triton")
    assert empty.shape == (0, 3, 3, 20)


def test_triton_interpreter_custom_op_and_compile(interpreter, randn, assert_close):
    x, weight, bias, residual = _inputs(*CASES[1], randn, seed=5)
    for args in ((x, weight, bias, x * 3, torch.float32), (x.half(), weight.half(), None, None, torch.float16)):
        torch.library.opcheck(torch.ops.zoo.depthwise_conv_fwd.default, args,
                              test_utils=("test_schema", "test_faketensor"))

    def f(x):
        return depthwise_conv(x * 2.0, weight, bias, residual=residual, size=(28, 28), backend="triton").square()

    torch._dynamo.reset()
    want = f(x)  # (the traced resize is decomposed: equal up to float32 rounding)
    assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(x), want, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("case, optional", [(CASES[0], True), (CASES[3], True), (CASES[2], False)], ids=str)
def test_triton_interpreter_traced_training_takes_no_convolution_node(case, optional, interpreter, randn, grads,
                                                                      assert_close):
    """A training call in a traced graph runs the kernel's op forward and, backward, the 3x3 backward kernel's op
    (other sizes ATen's convolution_backward); no ``aten.convolution`` in the joint graph, which would turn on
    inductor's layout optimization. The output and every gradient (resized input, weight, bias, residual) are the
    reference's in float32."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.compilers import nop

    inputs = _inputs(*case, randn, seed=31, bias=optional, residual=optional)
    size = case[-1]
    ops = set()

    def record(gm, example_inputs):
        ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return nop(gm, example_inputs)

    def call(backend, x, weight, bias=None, residual=None):
        return depthwise_conv(x * 2.0, weight, bias, residual=residual, size=size, backend=backend)

    leaves = [t.detach().clone().requires_grad_() for t in inputs if t is not None]
    want_out = call("reference", *leaves)
    want = [want_out, *grads(want_out, leaves, seed=32)]
    traced_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: call("triton", *a), fullgraph=True,
                             backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    out = compiled(*traced_leaves)
    got = [out, *grads(out, traced_leaves, seed=32)]
    backward = "zoo.depthwise_conv3_bwd.default" if case[4] == 3 else "aten.convolution_backward.default"
    assert "zoo.depthwise_conv_fwd.default" in ops and backward in ops, sorted(ops)
    assert "aten.convolution.default" not in ops
    for name, a, e in zip(("out", "d proj", "d weight", "d bias", "d residual"), got, want):
        assert a.dtype == e.dtype
        assert_close(a, e, atol=1e-5 * e.abs().max().item(), what=name)


def test_triton_interpreter_model_routes_its_value_convs(interpreter, assert_close, monkeypatch):
    import timm

    import zoo  # noqa: F401  (registers the models)

    monkeypatch.setenv("ZOO_OPS_BACKEND", "depthwise_conv:triton")
    calls, resized = [], []
    launch, resize = DW._launch, DW._resized_channels_last
    monkeypatch.setattr(DW, "_launch", lambda *a, **k: calls.append(a[0].shape[1:]) or launch(*a, **k))
    monkeypatch.setattr(DW, "_resized_channels_last", lambda x, size: resized.append((x.shape[1], size)) or
                        resize(x, size))
    torch.manual_seed(0)
    # keys/values reduced 8x, 4x, 2x (not in the releases): stages 0-2 upsample the values to the token grid first;
    # one block a stage (each interpreted conv costs seconds)
    model = timm.create_model("agent_pvt_tiny", img_size=112, agent_sr_ratios="8421", depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        got = model(x)
        want = _with_backend(monkeypatch, "depthwise_conv:reference", model, x)
    assert calls == [(h, h, c) for h, c in ((28, 64), (14, 128), (7, 320), (3, 512))]
    assert resized == [(h, (h_out, h_out)) for h, h_out in ((3, 28), (3, 14), (3, 7))]
    assert_close(got, want, atol=1e-5 * want.abs().max().item(), what="logits")


def _with_backend(monkeypatch, setting: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setenv("ZOO_OPS_BACKEND", setting)
        return model(x)


def test_triton_kernels_under_interpreter():
    """Runs the interpreter tests above in a fresh process with TRITON_INTERPRET=1."""
    if INTERPRETING:
        pytest.skip("already interpreting: the tests above ran in this process")
    run_pytest_in_interpreter(__file__, "interpreter and not under_interpreter", passed=34)


# ----------------------------------------------------------------------------------------------------------------
# GPU: shapes at batch 8: Agent-Swin-T stage-0 windows, values reduced 8x / 2x and resized back (Agent-PVT-T stages 0
# and 2 with agent_sr_ratios 8 and 2), BiFormer-T's stage-0 LePE, an odd resize, Agent-DeiT-S's patch grid, rows
# wider than a tile

GPU_CASES = [(8 * 64, 7, 7, 96, 3, None), (8, 7, 7, 64, 3, (56, 56)), (8, 7, 7, 320, 3, (14, 14)),
             (8, 56, 56, 64, 5, None), (3, 9, 11, 24, 3, (20, 17)), (8, 14, 14, 384, 3, None),
             (2, 5, 150, 40, 3, None)]


@pytest.mark.gpu
def test_gpu_auto_choice_is_the_kernel_for_inference_and_training(randn):
    x, weight, bias, residual = _inputs(*GPU_CASES[0], randn, device="cuda", dtype=torch.bfloat16)
    args = (x, weight, bias, residual, (7, 7), torch.bfloat16)
    with torch.no_grad():
        assert select_backend("depthwise_conv", None, *args).name == "triton"
    assert select_backend("depthwise_conv", None, x, weight.requires_grad_(), *args[2:]).name == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_triton_gpu_gradients(case, dtype, tol, randn, grads, assert_close, assert_no_fallback):
    """Every gradient of a training call against float64 ones, in ``dtype`` and (fp16/bf16) under autocast with
    float32 tensors: within ``tol`` of the largest, or twice the reference backend's own error in the same call
    (the upsampled cases' input gradient goes through ATen's resize backward, which sums its 64 terms in the low
    precision)."""
    inputs = _inputs(*case, randn, device="cuda", seed=9)
    (want,) = _grads_both(inputs, case[-1], grads, dtype=torch.float64, backends=("reference",))
    settings = [dict(dtype=dtype)] + ([dict(autocast=dtype)] if dtype != torch.float32 else [])
    for setting in settings:
        with assert_no_fallback():
            got, ref = _grads_both(inputs, case[-1], grads, **setting)
        for name, a, r, e in zip(("out", "d proj", "d weight", "d bias", "d residual"), got, ref, want):
            assert a.dtype == r.dtype
            ref_error = (r.double() - e).abs().max().item()
            assert_close(a, e, atol=max(tol * e.abs().max().item(), 2 * ref_error), what=f"{name} {setting}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-6)])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_triton_gpu_matches_the_rounding_oracle(case, dtype, tol, randn, assert_close, assert_no_fallback):
    inputs = _inputs(*case, randn, device="cuda", seed=6)
    with assert_no_fallback():
        _check_triton([t.to(dtype) for t in inputs], case[-1], dtype, assert_close, tol)
        if dtype != torch.float32:
            with torch.autocast("cuda", dtype=dtype):  # float32 inputs and weights: conv in dtype, float32 sum
                _check_triton(inputs, case[-1], dtype, assert_close, tol)


@pytest.mark.gpu
def test_gpu_channels_innermost_weights_give_the_same_bits(randn):
    """The models' cached weight copies (channels innermost) and the op's own cast under autocast, which makes the
    same layout, compute what the parameter's layout does."""
    from zoo.ops.depthwise_conv import channels_innermost

    x, weight, bias, residual = _inputs(*GPU_CASES[5], randn, device="cuda", seed=8)
    low = [t.to(torch.bfloat16) for t in (x, weight, bias, residual)]
    inner = channels_innermost(low[1])
    assert inner.stride(0) == 1 and torch.equal(inner, low[1])
    with torch.no_grad():
        want = depthwise_conv(*low[:3], residual=low[3])
        assert torch.equal(depthwise_conv(low[0], inner, low[2], residual=low[3]), want)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # float32 weight and bias cast by the op
            assert torch.equal(depthwise_conv(low[0], weight, bias, residual=low[3]), want)
            torch._dynamo.reset()  # the same cast traced into a compiled graph (inductor makes the layout)
            compiled = torch.compile(lambda v: depthwise_conv(v, weight, bias, residual=low[3]), fullgraph=True)
            assert torch.equal(compiled(low[0]), want)


@pytest.mark.gpu
def test_triton_gpu_compiles_without_graph_breaks(randn, assert_close):
    from triton_checks import assert_inductor_launches, compiled_inference

    x, weight, bias, residual = _inputs(*GPU_CASES[1], randn, device="cuda", seed=7)
    eager, got, code = compiled_inference(
        lambda x: depthwise_conv(x * 2, weight, bias, residual=residual, size=(56, 56)), x)
    assert_inductor_launches(code, "forward_kernel")
    assert got.dtype == torch.float32
    assert_close(got, eager, atol=1e-2 * eager.abs().max().item(), what="compiled")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["biformer_tiny", "agent_pvt_tiny", "agent_swin_t"])
def test_gpu_models_train_through_the_kernels(name, monkeypatch, no_tf32):
    """A float32 training step whose depthwise convs (BiFormer's LePE and position conv, Agent-PVT's and the large
    Agent-Swin stages' value convs) run on the kernels gives every parameter the gradient the reference's step does."""
    import timm

    import zoo  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).cuda().train()
    x = torch.randn(2, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    grads, calls = [], []
    backward = DW._DepthwiseConv.backward
    monkeypatch.setattr(DW._DepthwiseConv, "backward", staticmethod(lambda ctx, g: calls.append(1) or
                                                                    backward(ctx, g)))
    for setting in (None, "depthwise_conv:reference"):
        if setting is None:
            monkeypatch.delenv("ZOO_OPS_BACKEND", raising=False)
        else:
            monkeypatch.setenv("ZOO_OPS_BACKEND", setting)
        grads.append(_step_grads(model, model, x))
    assert calls
    _assert_same_grads(grads[0], grads[1])


def _step_grads(model: nn.Module, run, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after one step of ``run`` (``model`` or a compiled form of it) on ``x``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same stochastic-depth draws in every step
    run(x).logsumexp(-1).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for n, w in want.items():
        assert (got[n] - w).abs().max() <= 1e-4 * w.abs().max() + 1e-7, n


@pytest.mark.gpu
def test_gpu_compiled_training_step_matches_eager(no_tf32):
    """A compiled float32 training step of a two-stage Agent-Swin, whose value convs run the kernel's op forward and
    ATen's convolution_backward in the traced graph, gives every parameter the eager step's gradient."""
    from zoo.backbones.agent_swin import AgentSwinTransformer

    torch.manual_seed(0)
    model = AgentSwinTransformer(img_size=64, embed_dim=32, depths=(1, 1), num_heads=(1, 2), window_size=16,
                                 agent_num=(4, 4), attn_type="AA", num_classes=10, drop_path_rate=0.0).cuda()
    x = torch.randn(2, 3, 64, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    torch._dynamo.reset()
    want = _step_grads(model, model, x)
    _assert_same_grads(_step_grads(model, torch.compile(model, fullgraph=True), x), want)
