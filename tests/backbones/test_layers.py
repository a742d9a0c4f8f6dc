"""Shared backbone layers: the official transformer init, the channels-last stem and the input check."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
from zoo.backbones._layers import ChannelsLastSequential, check_images, init_linears


def test_init_linears_draws_truncated_normal_weights_and_zero_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.LayerNorm(512), nn.Linear(512, 128, bias=False), nn.Conv2d(3, 4, 3))
    conv_before = model[3].weight.clone()
    init_linears(model, std=0.02)
    assert torch.equal(model[0].bias, torch.zeros(512))
    for linear in (model[0], model[2]):
        assert 0.019 < linear.weight.std().item() < 0.021
    assert torch.equal(model[3].weight, conv_before)  # other layers keep their construction-time init


@pytest.mark.parametrize("name", ["biformer_tiny", "agent_deit_tiny", "agent_pvt_tiny", "zoo_volo_d1_224"])
def test_every_family_uses_the_official_linear_init(name):
    torch.manual_seed(0)
    linears = [m for m in zoo.create_model(name).modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert 0.019 < weights.std().item() < 0.021  # PyTorch's default would give 1/sqrt(3 fan_in) ~ 0.02-0.07 per layer
    assert all(m.bias is None or not m.bias.any() for m in linears)


def test_channels_last_stem_keeps_outputs():
    torch.manual_seed(0)
    stem = ChannelsLastSequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.GELU())
    x = torch.randn(2, 3, 16, 16)
    out = stem(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, nn.Sequential(*stem)(x), rtol=1e-5, atol=1e-6)


def test_check_images_names_the_model_and_the_fix():
    check_images(torch.zeros(2, 3, 32, 40), "M", 32)  # accepted
    with pytest.raises(ValueError, match=r"M expects images \(B, C, H, W\), got \(3, 32, 32\)"):
        check_images(torch.zeros(3, 32, 32), "M")
    with pytest.raises(ValueError, match="got list"):
        check_images([1, 2], "M")
    with pytest.raises(ValueError, match="M expects floating-point images .* got dtype torch.uint8"):
        check_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "M")
    with pytest.raises(ValueError, match=r"input size \(32, 16\) is too small: M needs at least 32x32 \(stride\)"):
        check_images(torch.zeros(1, 3, 32, 16), "M", 32, "stride")


@pytest.mark.parametrize("name", ["biformer_tiny", "zoo_volo_d1_224", "agent_deit_tiny", "agent_pvt_tiny",
                                  "agent_swin_t", "agent_cswin_t"])
def test_every_family_checks_its_input(name):
    model = zoo.create_model(name, num_classes=0).eval()
    with pytest.raises(ValueError, match="expects images"):
        model(torch.zeros(3, 224, 224))
    with pytest.raises(ValueError, match="floating-point images"):
        model.forward_intermediates(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
