"""Shared backbone layers: the official transformer init, the channels-last stem, the input check and the runner of
a stage's blocks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
import zoo.backbones._layers as layers
from zoo.backbones._layers import (BlockSequence, ChannelsLastSequential, DeferredSumBlock, add_norm, check_images,
                                   init_linears, norm_of_sum, run_blocks)
from zoo.ops import LayerNorm
from test_launch_census import THIN  # (the tuned models' thin widths)


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


class _ToyBlock(DeferredSumBlock):
    """x + f(norm1(x)), then + g(norm2(.)): the pre-norm block the backbones build, with linears for branches."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.f = LayerNorm(dim), nn.Linear(dim, dim)
        self.norm2, self.g = LayerNorm(dim), nn.Linear(dim, dim)

    def forward_deferred(self, x, branch, scale=1.0):
        x, h = norm_of_sum(self.norm1, x, branch)
        x, h = add_norm(self.norm2, x, scale * self.f(h))
        return x, self.g(h)


def _toy_stack(depth: int = 3, dim: int = 8) -> BlockSequence:
    torch.manual_seed(0)
    return BlockSequence(*[_ToyBlock(dim) for _ in range(depth)])


def _by_module_calls(blocks, x, *args):
    for blk in blocks:
        x = blk(x, *args)
    return x


def test_run_blocks_leaves_each_sum_to_the_next_norm(monkeypatch):
    blocks = _toy_stack()
    x = torch.randn(2, 5, 8)
    expected = _by_module_calls(blocks, x, 0.5)
    calls = []
    monkeypatch.setattr(layers, "add_norm", lambda norm, a, b: calls.append(norm) or add_norm(norm, a, b))
    torch.testing.assert_close(run_blocks(blocks, x, 0.5), expected, rtol=0, atol=0)
    # blocks 2 and 3 make their predecessor's last sum with their first norm; block 1's norm1 sees x itself
    assert calls == [blocks[1].norm1, blocks[2].norm1]
    torch.testing.assert_close(blocks(x), _by_module_calls(blocks, x), rtol=0, atol=0)
    torch.testing.assert_close(blocks[0](x, scale=0.5), blocks[0](x, 0.5), rtol=0, atol=0)  # the block's own arguments


def test_run_blocks_calls_hooked_blocks_as_modules():
    blocks = _toy_stack()
    x = torch.randn(2, 5, 8)
    seen = []
    handle = blocks[1].register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    out = blocks(x)
    handle.remove()
    first = blocks[0](x)
    torch.testing.assert_close(out, _by_module_calls(blocks, x), rtol=0, atol=0)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][0], first, rtol=0, atol=0)  # the hook sees whole inputs and outputs
    torch.testing.assert_close(seen[0][1], blocks[1](first), rtol=0, atol=0)
    pre = nn.modules.module.register_module_forward_pre_hook(lambda module, args: seen.append(module))
    try:
        blocks(x)
    finally:
        pre.remove()
    assert [m for m in seen[1:] if isinstance(m, _ToyBlock)] == list(blocks)  # global hooks see every block


def test_run_blocks_calls_blocks_with_backward_hooks_as_modules():
    blocks = _toy_stack()
    x = torch.randn(2, 5, 8, requires_grad=True)
    seen = []
    blocks[1].register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_out[0].shape))
    blocks(x).sum().backward()
    assert seen == [(2, 5, 8)]  # the block's output gradient: the hook ran, on its whole output


def test_run_blocks_with_checkpointing_matches_gradients():
    blocks = _toy_stack()
    x = torch.randn(2, 5, 8, requires_grad=True)
    grads = []
    for checkpointing in (False, True):
        blocks.zero_grad()
        out = run_blocks(blocks, x, checkpointing=checkpointing)
        (out.square().sum()).backward()
        grads.append((out.detach(), x.grad.clone(), blocks[0].f.weight.grad.clone()))
        x.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["agent_pvt_tiny", "agent_swin_t", "zoo_volo_d1_224"])
def test_block_hooks_fire_in_deferred_backbones(name):
    model = zoo.create_model(name, num_classes=0).eval()
    block = next(m for m in model.modules() if isinstance(m, DeferredSumBlock))
    seen = []
    block.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert len(seen) == 1 and seen[0][0] == 1


class _Counted(nn.Module):
    """Wraps a layer and counts its calls."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("name", list(THIN))
def test_forwards_call_the_submodules_set_after_construction(name):
    """Blocks read their submodules from the module dict at each call (not references kept at construction): layers
    assigned later (a wrapper, as adapters and quantizers install) are the ones called, with the same outputs."""
    torch.manual_seed(0)
    model = zoo.create_model(name, num_classes=0, **THIN[name]).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
    block = next(m for m in model.modules() if hasattr(m, "mlp") and (hasattr(m, "attn") or hasattr(m, "attns")))
    attention = block.attn if hasattr(block, "attn") else block
    output_layer = "wo" if hasattr(attention, "wo") else "proj"
    wrapped = {"mlp": _Counted(block.mlp), "norm1": _Counted(block.norm1),
               output_layer: _Counted(getattr(attention, output_layer))}
    block.mlp, block.norm1 = wrapped["mlp"], wrapped["norm1"]
    setattr(attention, output_layer, wrapped[output_layer])
    with torch.no_grad():
        got = model(x)
    assert {key: layer.calls for key, layer in wrapped.items()} == {key: 1 for key in wrapped}
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
