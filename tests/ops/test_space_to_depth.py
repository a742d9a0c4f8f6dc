"""zoo.ops.space_to_depth: a strided convolution as a stride-1 convolution over the space-to-depth input equals it."""
import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.ops import SpaceToDepthConv2d
from zoo.ops.space_to_depth import space_to_depth_conv

from conv_checks import assert_cuda_layer_matches, assert_equals_the_convolution, conv_inputs


@pytest.mark.parametrize("shape, out_channels, kernel, stride, padding, bias", [
    ((2, 3, 28, 30), 8, (7, 7), (2, 2), (3, 3), False),  # VOLO's stem conv, a non-square image
    ((2, 3, 27, 25), 6, (7, 7), (2, 2), (3, 3), True),   # odd sizes: the convolution drops the last row and column
    ((1, 3, 20, 21), 5, (3, 3), (2, 2), (1, 1), True),   # BiFormer's stem conv
    ((2, 2, 17, 19), 4, (4, 4), (2, 2), (1, 1), True),   # even kernel
    ((1, 3, 23, 26), 4, (5, 3), (3, 2), (2, 0), True),   # non-square kernel, stride and padding; stride 3
    ((1, 1, 9, 11), 3, (2, 2), (3, 3), (0, 0), False),   # stride larger than the kernel: zero taps fill the block
])
def test_folded_convolution_equals_the_convolution_with_gradients(shape, out_channels, kernel, stride, padding, bias):
    x, weight, b = conv_inputs(shape, out_channels, kernel, bias=bias)
    assert_equals_the_convolution(lambda x, w, b: space_to_depth_conv(x, w, b, stride, padding), x, weight, b,
                                  stride=stride, padding=padding)


def test_folded_convolution_in_float32_from_any_layout_writes_channels_last():
    x, weight, _ = conv_inputs((2, 3, 32, 32), 16, (7, 7), dtype=torch.float32)
    ref = F.conv2d(x, weight, None, stride=2, padding=3)
    for inp in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        ours = space_to_depth_conv(inp, weight, None, (2, 2), (3, 3))
        assert ours.is_contiguous(memory_format=torch.channels_last)
        assert ((ours - ref).norm() / ref.norm()).item() < 1e-6


def test_folded_convolution_under_cpu_autocast_computes_in_bfloat16():
    x, weight, b = conv_inputs((2, 3, 32, 32), 16, (7, 7), dtype=torch.float32)
    with torch.autocast("cpu", torch.bfloat16):
        ours = space_to_depth_conv(x, weight, b, (2, 2), (3, 3))
        ref = F.conv2d(x, weight, b, stride=2, padding=3)
    assert ours.dtype == ref.dtype == torch.bfloat16
    assert ((ours.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def test_folded_branch_checks_its_input_as_the_convolution_does(monkeypatch):
    monkeypatch.setattr(SpaceToDepthConv2d, "rewrites", lambda self, inp: True)  # the CUDA branch, run on CPU
    torch.manual_seed(0)
    layer = SpaceToDepthConv2d(3, 8, 7, stride=2, padding=3)
    x = torch.randn(2, 3, 30, 34)
    assert ((layer(x) - F.conv2d(x, layer.weight, layer.bias, stride=2, padding=3)).abs().max()).item() < 1e-5
    with pytest.raises(ValueError, match=r"in_channels=3 channels \(dim 1\), got shape \(2, 4, 32, 32\)"):
        layer(torch.zeros(2, 4, 32, 32))
    with pytest.raises(ValueError, match=r"padded by \(3, 3\) is smaller than the kernel \(7, 7\)"):
        layer(torch.zeros(2, 3, 8, 0))


@pytest.mark.parametrize("name, stem, first_key", [
    ("zoo_volo_d1_224", "patch_embed", "patch_embed.conv.0.weight"),
    ("zoo_volo_d5_224", "patch_embed", "patch_embed.conv.0.weight"),
    ("agent_cswin_t", "stage1_conv_embed", "stage1_conv_embed.0.weight"),
])
def test_stem_folds_its_first_conv_with_the_official_keys_and_features(name, stem, first_key, monkeypatch):
    """VOLO's 7x7/2 and Agent-CSwin's 7x7/4 stem convs are the layer; its CUDA path (any input layout, channels-last
    output into the stem's next layer) run on CPU gives the convolution's features."""
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=0).eval()
    module = getattr(model, stem)
    first = module.conv[0] if hasattr(module, "conv") else module[0]
    assert type(first) is SpaceToDepthConv2d
    assert first_key in model.state_dict()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = module(x)
        monkeypatch.setattr(SpaceToDepthConv2d, "rewrites", lambda self, inp: True)
        ours = module(x)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.gpu
def test_gpu_layer_matches_the_convolution(no_tf32):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x, weight, _ = conv_inputs((4, 3, 64, 66), 32, (7, 7), dtype=torch.float64)
    layer = SpaceToDepthConv2d(3, 32, 7, stride=2, padding=3, bias=False).cuda()
    with torch.no_grad():
        layer.weight.copy_(weight)
    ref = F.conv2d(x, weight, None, stride=2, padding=3).cuda()
    xc = x.float().cuda()
    assert assert_cuda_layer_matches(layer, xc, ref).is_contiguous(memory_format=torch.channels_last)
    xg = xc.clone().requires_grad_()
    layer(xg).double().mul(ref).sum().backward()  # the weight and input gradients through the fold
    conv_x = xc.clone().requires_grad_()
    conv_w = layer.weight.detach().clone().requires_grad_()
    F.conv2d(conv_x, conv_w, None, stride=2, padding=3).double().mul(ref).sum().backward()
    for ours, want in ((xg.grad, conv_x.grad), (layer.weight.grad, conv_w.grad)):
        assert ((ours - want).norm() / want.norm()).item() < 1e-5
    with pytest.raises(ValueError, match=r"in_channels=3 channels"):
        layer(torch.zeros(1, 4, 32, 32, device="cuda"))
