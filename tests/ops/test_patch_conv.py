"""zoo.ops.patch_conv: a non-overlapping patch convolution as one GEMM over the patches equals the convolution."""
import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.ops import PatchConv2d
from zoo.ops.patch_conv import patch_conv_gemm

from conv_checks import assert_cuda_layer_matches, assert_equals_the_convolution, conv_inputs


@pytest.mark.parametrize("shape, out_channels, patch, bias", [
    ((2, 3, 32, 48), 8, (16, 16), True),   # DeiT-like 16x16 patches, a non-square image
    ((2, 3, 18, 13), 5, (4, 4), True),     # sizes that are not multiples of the patch: the remainder is dropped
    ((1, 4, 9, 10), 6, (3, 2), False),     # non-square patches, no bias
])
def test_gemm_equals_the_convolution_with_gradients(shape, out_channels, patch, bias):
    x, weight, b = conv_inputs(shape, out_channels, patch, bias=bias)
    assert_equals_the_convolution(patch_conv_gemm, x, weight, b, stride=patch)


def test_gemm_in_float32_and_channels_last_input():
    x, weight, b = conv_inputs((2, 3, 32, 32), 16, (8, 8), dtype=torch.float32)
    ref = F.conv2d(x, weight, b, stride=8)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        ours = patch_conv_gemm(inp, weight, b)
        assert ((ours - ref).norm() / ref.norm()).item() < 1e-6


def test_output_is_channels_last_so_tokens_need_no_copy():
    x, weight, b = conv_inputs((2, 3, 16, 16), 8, (4, 4), dtype=torch.float32)
    y = patch_conv_gemm(x, weight, b)
    assert y.is_contiguous(memory_format=torch.channels_last)
    tokens = y.flatten(2).transpose(1, 2)
    assert tokens.is_contiguous() and tokens.data_ptr() == y.data_ptr()
    assert y.permute(0, 2, 3, 1).is_contiguous()


def test_gemm_under_cpu_autocast_computes_in_bfloat16():
    x, weight, b = conv_inputs((2, 3, 32, 32), 16, (16, 16), dtype=torch.float32)
    with torch.autocast("cpu", torch.bfloat16):
        ours = patch_conv_gemm(x, weight, b)
        ref = F.conv2d(x, weight, b, stride=16)
    assert ours.dtype == ref.dtype == torch.bfloat16
    assert ((ours.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def test_gemm_branch_checks_its_input_as_the_convolution_does(monkeypatch):
    monkeypatch.setattr(PatchConv2d, "rewrites", lambda self, inp: True)  # the CUDA branch, run on CPU
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
        monkeypatch.setattr(PatchConv2d, "rewrites", lambda self, inp: True)
        ours = model.forward_features(x)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.gpu
def test_gpu_layer_matches_the_convolution():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x, weight, b = conv_inputs((4, 3, 64, 64), 32, (16, 16), dtype=torch.float64)
    layer = PatchConv2d(3, 32, 16, stride=16).cuda()
    with torch.no_grad():
        layer.weight.copy_(weight), layer.bias.copy_(b)
    ref = F.conv2d(x, weight, b, stride=16).cuda()
    xc = x.float().cuda()
    assert_cuda_layer_matches(layer, xc, ref)  # cuBLAS float32 (no TF32 by default for matmuls)
