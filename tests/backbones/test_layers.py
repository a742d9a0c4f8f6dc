"""Shared backbone layers: the official transformer init and the channels-last stem."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
from zoo.backbones._layers import ChannelsLastSequential, init_linears


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
