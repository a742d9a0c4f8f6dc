"""Norms that feed projections use zoo.ops.LayerNorm; norms whose output is the residual stream or a returned
feature stay nn.LayerNorm (their autocast output dtype is float32, as in the official code)."""
import functools
import importlib
import types

import pytest
import torch
from torch import nn

import zoo
from zoo.backbones._layers import projection_norm
from zoo.ops import LayerNorm
LN = importlib.import_module("zoo.ops.layer_norm")  # the module (``zoo.ops.layer_norm`` is the function)


def test_projection_norm_swaps_only_plain_layer_norms():
    norm = projection_norm(functools.partial(nn.LayerNorm, eps=1e-6), 12)
    assert type(norm) is LayerNorm and norm.eps == 1e-6 and norm.weight.shape == (12,)
    assert projection_norm(functools.partial(nn.LayerNorm, bias=False), 12).bias is None
    assert type(projection_norm(nn.BatchNorm1d, 12)) is nn.BatchNorm1d
    assert isinstance(projection_norm(nn.LayerNorm, 12), nn.LayerNorm)  # timm's no-weight-decay rules see it


@pytest.mark.parametrize("name,fast,plain", [
    ("agent_swin_t", {"layers.0.blocks.0.norm1", "layers.0.blocks.1.norm2", "layers.0.downsample.norm"},
     {"patch_embed.norm", "norm"}),
    ("agent_deit_tiny", {"blocks.0.norm1", "blocks.11.norm2"}, {"norm"}),
    ("agent_pvt_tiny", {"block1.0.norm1", "block4.1.norm2"}, {"patch_embed1.norm", "patch_embed4.norm"}),
    ("agent_cswin_t", {"stage1.0.norm1", "stage4.0.norm2"}, {"norm", "merge1.norm", "stage1_conv_embed.2"}),
    ("zoo_volo_d1_224", {"network.0.0.norm1", "post_network.0.norm2"}, {"norm"}),
    ("biformer_tiny", {"stages.0.0.norm1", "stages.3.1.norm2"}, set()),
])
def test_block_norms_are_zoo_layer_norms(name, fast, plain):
    modules = dict(zoo.create_model(name).named_modules())
    missing = (fast | plain) - modules.keys()
    assert not missing, f"{name}: no module {sorted(missing)}; has e.g. {[k for k in modules if 'norm' in k][:8]}"
    assert all(type(modules[k]) is LayerNorm for k in fast), {k: type(modules[k]) for k in fast}
    assert all(type(modules[k]) is nn.LayerNorm for k in plain), {k: type(modules[k]) for k in plain}


def test_compiled_graphs_leave_the_norm_to_inductor(monkeypatch):
    x = types.SimpleNamespace(device=torch.device("cuda"), shape=(128, 56, 56, 96))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "inductor" in LN._triton_prefer(x, None, None, 1e-5, torch.bfloat16)
