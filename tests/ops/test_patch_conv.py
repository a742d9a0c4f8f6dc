"""zoo.ops.patch_conv: a non-overlapping patch convolution as one GEMM over the patches equals the convolution."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from zoo.ops import AutocastCachedConv2d, PatchConv2d, as_patch_conv
from zoo.ops.patch_conv import patch_conv_gemm


def _inputs(shape, out_channels, patch, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    weight = torch.randn(out_channels, shape[1], *patch, generator=g, dtype=dtype)
    b = torch.randn(out_channels, generator=g, dtype=dtype) if bias else None
    return x, weight, b


@pytest.mark.parametrize("shape, out_channels, patch, bias", [
    ((2, 3, 32, 48), 8, (16, 16), True),   # DeiT-like 16x16 patches, a non-square image
    ((2, 3, 18, 13), 5, (4, 4), True),     # sizes that are not multiples of the patch: the remainder is dropped
    ((1, 4, 9, 10), 6, (3, 2), False),     # non-square patches, no bias
])
def test_gemm_equals_the_convolution_with_gradients(shape, out_channels, patch, bias):
    x, weight, b = _inputs(shape, out_channels, patch, bias=bias)
    leaves = [t.requires_grad_() for t in (x, weight, b) if t is not None]
    ours = patch_conv_gemm(x, weight, b)
    ref = F.conv2d(x, weight, b, stride=patch)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(1))
    for g_ours, g_ref in zip(torch.autograd.grad(ours, leaves, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


def test_gemm_in_float32_and_channels_last_input():
    x, weight, b = _inputs((2, 3, 32, 32), 16, (8, 8), dtype=torch.float32)
    ref = F.conv2d(x, weight, b, stride=8)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        ours = patch_conv_gemm(inp, weight, b)
        assert ((ours - ref).norm() / ref.norm()).item() < 1e-6


def test_output_is_channels_last_so_tokens_need_no_copy():
    x, weight, b = _inputs((2, 3, 16, 16), 8, (4, 4), dtype=torch.float32)
    y = patch_conv_gemm(x, weight, b)
    assert y.is_contiguous(memory_format=torch.channels_last)
    tokens = y.flatten(2).transpose(1, 2)
    assert tokens.is_contiguous() and tokens.data_ptr() == y.data_ptr()
    assert y.permute(0, 2, 3, 1).is_contiguous()


def test_gemm_under_cpu_autocast_computes_in_bfloat16():
    x, weight, b = _inputs((2, 3, 32, 32), 16, (16, 16), dtype=torch.float32)
    with torch.autocast("cpu", torch.bfloat16):
        ours = patch_conv_gemm(x, weight, b)
        ref = F.conv2d(x, weight, b, stride=16)
    assert ours.dtype == ref.dtype == torch.bfloat16
    assert ((ours.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def test_layer_is_a_conv_with_the_same_keys_and_runs_the_convolution_on_cpu():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 4, stride=4)
    layer = PatchConv2d(3, 8, 4, stride=4)
    layer.load_state_dict(conv.state_dict())
    assert isinstance(layer, nn.Conv2d) and isinstance(layer, AutocastCachedConv2d)
    x = torch.randn(2, 3, 16, 20)
    assert torch.equal(layer(x), conv(x))


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel_size=4, stride=2), "kernel_size=(4, 4) differs from stride=(2, 2)"),
    (dict(kernel_size=4, stride=4, padding=1), "padding=(1, 1)"),
    (dict(kernel_size=4, stride=4, dilation=2), "dilation=(2, 2)"),
    (dict(kernel_size=4, stride=4, groups=3), "groups=3"),
])
def test_constructor_and_converter_reject_other_convolutions(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PatchConv2d(3, 6, **kwargs)
    with pytest.raises(ValueError, match="only non-overlapping patch convolutions"):
        as_patch_conv(nn.Conv2d(3, 6, **kwargs))


def test_converter_keeps_parameters_and_rejects_other_layers():
    conv = nn.Conv2d(3, 8, 2, stride=2)
    weight = conv.weight
    assert as_patch_conv(conv) is conv and type(conv) is PatchConv2d and conv.weight is weight
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d, got Linear"):
        as_patch_conv(nn.Linear(3, 3))


def test_gemm_branch_checks_its_input_as_the_convolution_does(monkeypatch):
    monkeypatch.setattr(PatchConv2d, "_gemm_applies", lambda self, inp: True)  # the CUDA branch, run on CPU
    torch.manual_seed(0)
    layer = PatchConv2d(3, 8, 16, stride=16)
    x = torch.randn(2, 3, 32, 48)
    assert ((layer(x) - F.conv2d(x, layer.weight, layer.bias, stride=16)).abs().max()).item() < 1e-5
    with pytest.raises(ValueError, match=r"in_channels=3 channels \(dim 1\), got shape \(2, 4, 32, 32\)"):
        layer(torch.zeros(2, 4, 32, 32))
    with pytest.raises(ValueError, match=r"smaller than one patch \(16, 16\)"):
        layer(torch.zeros(2, 3, 8, 64))


@pytest.mark.parametrize("name, path", [("agent_deit_tiny", "patch_embed.proj"),
                                        ("agent_swin_t", "patch_embed.proj"),
                                        ("agent_pvt_tiny", "patch_embed1.proj")])
def test_agent_models_embed_image_patches_with_the_layer(name, path):
    model = zoo.create_model(name, num_classes=0)
    assert type(model.get_submodule(path)) is PatchConv2d
    assert f"{path}.weight" in model.state_dict()


@pytest.mark.parametrize("name", ["agent_deit_tiny", "agent_swin_t", "agent_pvt_tiny"])
def test_agent_models_give_the_same_features_through_the_gemm(name, monkeypatch):
    """The CUDA path inside the models (channels-last strided output into their token layouts), run on CPU."""
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=0).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.forward_features(x)
        monkeypatch.setattr(PatchConv2d, "_gemm_applies", lambda self, inp: True)
        ours = model.forward_features(x)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.gpu
def test_gpu_layer_matches_the_convolution():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x, weight, b = _inputs((4, 3, 64, 64), 32, (16, 16), dtype=torch.float64)
    layer = PatchConv2d(3, 32, 16, stride=16).cuda()
    with torch.no_grad():
        layer.weight.copy_(weight), layer.bias.copy_(b)
    ref = F.conv2d(x, weight, b, stride=16).cuda()
    xc = x.float().cuda()
    with torch.no_grad():
        out = layer(xc)  # cuBLAS float32 (no TF32 by default for matmuls)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6
        with torch.autocast("cuda", torch.bfloat16):
            out16 = layer(xc)
        assert out16.dtype == torch.bfloat16 and ((out16.double() - ref).norm() / ref.norm()).item() < 1e-2
        compiled = torch.compile(layer, fullgraph=True)
        assert ((compiled(xc).double() - ref).norm() / ref.norm()).item() < 1e-6
