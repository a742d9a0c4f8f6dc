"""The convolution layers computed another way on CUDA (PatchConv2d, SpaceToDepthConv2d): convolutions with the same
keys that run the convolution off CUDA, their construction checks and their in-place converters."""
import re

import pytest
import torch
from torch import nn

from zoo.ops import (AutocastCachedConv2d, PatchConv2d, SpaceToDepthConv2d, as_patch_conv,
                     as_space_to_depth_conv)

LAYERS = {  # layer, converter, a qualifying convolution's arguments, the converter's error for others
    "patch": (PatchConv2d, as_patch_conv, dict(kernel_size=4, stride=4),
              "only non-overlapping patch convolutions can become PatchConv2d"),
    "space_to_depth": (SpaceToDepthConv2d, as_space_to_depth_conv, dict(kernel_size=7, stride=2, padding=3),
                       "only strided, zero-padded, undilated, ungrouped convolutions fold"),
}
REJECTED = [  # layer, convolution arguments, the reason named
    ("patch", dict(kernel_size=4, stride=2), "kernel_size=(4, 4) differs from stride=(2, 2)"),
    ("patch", dict(kernel_size=4, stride=4, padding=1), "padding=(1, 1)"),
    ("patch", dict(kernel_size=4, stride=4, dilation=2), "dilation=(2, 2)"),
    ("patch", dict(kernel_size=4, stride=4, groups=3), "groups=3"),
    ("space_to_depth", dict(kernel_size=3, stride=1), "stride=(1, 1)"),
    ("space_to_depth", dict(kernel_size=3, stride=2, padding="valid"), "padding='valid'"),
    ("space_to_depth", dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    ("space_to_depth", dict(kernel_size=3, stride=2, dilation=2), "dilation=(2, 2)"),
    ("space_to_depth", dict(kernel_size=3, stride=2, groups=3), "groups=3"),
]


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_is_a_conv_with_the_same_keys_and_runs_the_convolution_on_cpu(name):
    cls, _, kwargs, _ = LAYERS[name]
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, **kwargs)
    layer = cls(3, 6, **kwargs)
    layer.load_state_dict(conv.state_dict())
    assert isinstance(layer, nn.Conv2d) and isinstance(layer, AutocastCachedConv2d)
    x = torch.randn(2, 3, 16, 20)
    assert torch.equal(layer(x), conv(x))


@pytest.mark.parametrize("name, kwargs, reason", REJECTED)
def test_constructor_and_converter_reject_other_convolutions(name, kwargs, reason):
    cls, convert, _, only = LAYERS[name]
    named = lambda prefix, tail: re.escape(f"{prefix}: {reason}") + r"[^;]*" + re.escape(f"; {tail}")
    with pytest.raises(ValueError, match=named(cls.__name__, f"{cls.requirement} (use nn.Conv2d for others)")):
        cls(3, 6, **kwargs)
    with pytest.raises(ValueError, match=named(convert.__name__, only)):
        convert(nn.Conv2d(3, 6, **kwargs))


@pytest.mark.parametrize("name", list(LAYERS))
def test_converter_keeps_parameters_and_rejects_other_layers(name):
    cls, convert, kwargs, _ = LAYERS[name]
    conv = nn.Conv2d(3, 8, **kwargs)
    weight = conv.weight
    assert convert(conv) is conv and type(conv) is cls and conv.weight is weight
    assert convert(conv) is conv  # converting again is a no-op
    with pytest.raises(TypeError, match=f"{convert.__name__}: conv must be an nn.Conv2d, got Linear"):
        convert(nn.Linear(3, 3))
    other = next(c for c in (PatchConv2d, SpaceToDepthConv2d) if c is not cls)
    with pytest.raises(TypeError, match=f"got {other.__name__}"):
        convert(other(3, 8, **LAYERS["patch" if other is PatchConv2d else "space_to_depth"][2]))
