"""Shared Agent Attention pieces: the separable bilinear resize, the no-grad bias cache, the 4-D bias layout
(channels_last) and the official 5-D layout on load."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.backbones import _agent_common as common
from zoo.convert import get_converter

TINY = {
    "agent_deit_tiny": dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2, agent_num=(4, 4, 4, 4),
                            agent_layer=2, num_classes=10),
    "agent_pvt_tiny": dict(img_size=64, embed_dims=(8, 16, 16, 16), num_heads=(1, 2, 2, 2), mlp_ratios=(2, 2, 2, 2),
                           depths=(1, 1, 1, 1), agent_num=(4, 4, 4, 4), num_classes=10),
    "agent_swin_t": dict(img_size=64, embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=16,
                         attn_type="AAMB1", agent_num=(4, 4, 4, 4), num_classes=10),
    "agent_cswin_t": dict(img_size=64, embed_dim=8, depth=(1, 1, 1, 1), split_size=(1, 2, 2, 2),
                          la_split_size=(4, 8, 4, 2), num_heads=(2, 2, 4, 4), agent_num=(4, 4, 4, 4), attn_type="AABB",
                          num_classes=10),
}
ROWCOL = ("ah_bias", "aw_bias", "ha_bias", "wa_bias")


def _model(name: str) -> torch.nn.Module:
    """A tiny eval model with biases far from their small init, so that a stale or wrong bias shows."""
    torch.manual_seed(0)
    model = zoo.create_model(name, **TINY[name]).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("_bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _image(name: str, seed: int = 2) -> torch.Tensor:
    size = TINY[name]["img_size"]
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _agent_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "an_bias")]


# --- bilinear resize of bias maps ---------------------------------------------------------------------------------

RESIZES = [((7, 7), (14, 14)), ((7, 7), (56, 56)), ((14, 14), (7, 7)), ((7, 7), (7, 7)), ((5, 9), (13, 4)),
           ((13, 17), (29, 3)), ((7, 7), (7, 20)), ((1, 1), (5, 5)), ((3, 3), (1, 1)), ((7, 7), (12, 12))]


@pytest.mark.parametrize("size_in,size_out", RESIZES)
def test_resize_bilinear_matches_interpolate(size_in, size_out):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, *size_in, generator=gen, requires_grad=True)
    ref = F.interpolate(x, size=size_out, mode="bilinear", align_corners=False, antialias=False)
    got = common.resize_bilinear(x, size_out)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert (got - ref).abs().max().item() <= 1e-6
    grad = torch.randn(ref.shape, generator=gen)
    (ref_grad,), (got_grad,) = torch.autograd.grad(ref, x, grad), torch.autograd.grad(got, x, grad)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_resize_bilinear_other_dims_and_dtypes():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 3, generator=gen, dtype=torch.float64)  # resized dims in the middle
    ref = F.interpolate(x.permute(0, 3, 1, 2), size=(9, 4), mode="bilinear").permute(0, 2, 3, 1)
    torch.testing.assert_close(common.resize_bilinear(x, (9, 4), dims=(1, 2)), ref, rtol=0, atol=1e-12)
    half = x.to(torch.bfloat16)
    got = common.resize_bilinear(half, (9, 4), dims=(1, 2))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=3e-2)


# --- agent tokens ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,grid", [((56, 56), (7, 7)), ((14, 14), (7, 7)), ((28, 4), (7, 2)), ((9, 9), (3, 3)),
                                       ((10, 9), (7, 7)), ((72, 72), (7, 7))])
def test_pool_agent_tokens_matches_adaptive_pooling(size, grid):
    """Equal windows take the mean-over-a-view path, the rest adaptive pooling; both must be adaptive average
    pooling of the token grid, forward and backward, on a strided slice of a qkv projection as the models pass."""
    gen = torch.Generator().manual_seed(0)
    (h, w), c = size, 8
    qkv = torch.randn(2, h * w, 3 * c, generator=gen, dtype=torch.float64, requires_grad=True)
    q = qkv[:, :, :c]
    ref = F.adaptive_avg_pool2d(q.transpose(1, 2).reshape(2, c, h, w), grid).flatten(2).transpose(1, 2)
    got = common.pool_agent_tokens(q, size, grid)
    assert got.shape == (2, grid[0] * grid[1], c)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (ref_grad,), (got_grad,) = torch.autograd.grad(ref, qkv, grad), torch.autograd.grad(got, qkv, grad)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="do not form a"):
        common.pool_agent_tokens(q[:, 1:], size, grid)


@pytest.mark.parametrize("size,grid", [((56, 56), (3, 3)), ((56, 56), (7, 7)), ((14, 14), (5, 5))])
def test_pool_agent_tokens_16_bit_and_without_adaptive_pooling(size, grid, monkeypatch):
    """bf16 stays within a rounding of the float32 pooling; ATen's adaptive pooling is never called (its NHWC kernel
    is what the mean and mask paths replace)."""
    (h, w), c = size, 16
    qkv = torch.randn(2, h * w, 3 * c, generator=torch.Generator().manual_seed(0))
    ref = F.adaptive_avg_pool2d(qkv[:, :, :c].transpose(1, 2).reshape(2, c, h, w), grid).flatten(2).transpose(1, 2)

    def refuse(*args, **kwargs):
        raise AssertionError("adaptive_avg_pool2d called")

    monkeypatch.setattr(F, "adaptive_avg_pool2d", refuse)
    got = common.pool_agent_tokens(qkv.bfloat16()[:, :, :c], size, grid)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=2 ** -7, atol=2 ** -8)


def test_resize_tables_built_in_inference_mode_train_later():
    # A cached table that were an inference tensor could not be saved for a later backward.
    with torch.inference_mode():
        common.resize_bilinear(torch.randn(1, 1, 3, 3), (11, 10))
    x = torch.randn(1, 1, 3, 3, requires_grad=True)
    common.resize_bilinear(x, (11, 10)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_no_grad_autocast_caches_the_biases_in_the_compute_dtype(build_calls):
    # the attention would cast float32 biases to the autocast dtype on every call: the cache holds that cast
    model, x = _model("agent_deit_tiny"), _image("agent_deit_tiny")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = model(x)
        second = model(x)
    assert torch.equal(first, second) and len(build_calls) == len(_agent_modules(model))
    for module in _agent_modules(model):
        for (key_size, query_size, agents, compute), cached in module._zoo_derived_cache[2].items():
            assert compute == torch.bfloat16
            fresh = common._build_biases(module, key_size, query_size, agents)
            for c, f in zip(cached, fresh):
                assert c.dtype == torch.bfloat16 and torch.equal(c, f.to(torch.bfloat16))


def test_biases_stay_float32_under_autocast():
    module = torch.nn.Module()
    common.init_agent_biases(module, 2, 4, (5, 6), (5, 6), cls_token=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        key, query = common.agent_biases(module, (8, 3), (3, 9), agents=(3, 3))
    assert key.dtype == query.dtype == torch.float32
    assert key.shape == (1, 2, 9, 1 + 24) and query.shape == (1, 2, 1 + 27, 9)


@pytest.mark.skipif(torch.__version__ < "2.7", reason="torch 2.5 and 2.6's dynamo reuse a graph compiled outside "
                    "CPU autocast inside it (no recompile for the autocast state these biases read)")
def test_compiled_inference_casts_the_biases_as_the_eager_cache_does():
    """Compiled without autograd under autocast, the biases come out in the compute dtype (the eager inference cache's
    values); with autograd on they stay float32, as in eager training."""
    module = torch.nn.Module()
    common.init_agent_biases(module, 2, 4, (5, 6), (5, 6), cls_token=True)
    fresh = common._build_biases(module, (8, 3), (3, 9), (3, 3))
    biases = torch.compile(lambda: common.agent_biases(module, (8, 3), (3, 9), agents=(3, 3)), backend="aot_eager",
                           fullgraph=True)
    with torch.no_grad():
        plain = biases()  # (the compiled graph's bilinear resize may round differently from eager's)
    for c, f in zip(plain, fresh):
        assert c.dtype == torch.float32
        torch.testing.assert_close(c, f, rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            cast = biases()
        assert all(c.dtype == torch.bfloat16 and torch.equal(c, p.to(torch.bfloat16)) for c, p in zip(cast, plain))
        assert all(c.dtype == torch.float32 for c in biases())


def test_resize_under_torch_compile():
    fn = torch.compile(lambda t: common.resize_bilinear(t, (14, 12)), backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    out = fn(x)
    torch.testing.assert_close(out, F.interpolate(x, size=(14, 12), mode="bilinear"), rtol=0, atol=1e-6)
    out.sum().backward()
    assert x.grad is not None


# --- inference bias cache ----------------------------------------------------------------------------------------

@pytest.fixture
def build_calls(monkeypatch):
    calls = []
    build = common._build_biases

    def counting(*args, **kwargs):
        calls.append(args[1:])
        return build(*args, **kwargs)

    monkeypatch.setattr(common, "_build_biases", counting)
    return calls


@pytest.mark.parametrize("name", list(TINY))
def test_no_grad_forwards_reuse_the_biases(name, build_calls):
    model, x = _model(name), _image(name)
    with torch.no_grad():
        first = model(x)
        built = len(build_calls)
        second = model(x)
    assert built >= len(_agent_modules(model)) and len(build_calls) == built  # nothing rebuilt
    assert torch.equal(first, second)
    with torch.enable_grad():
        ref = model(x)
    assert len(build_calls) == 2 * built  # with autograd on the cache is bypassed
    torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-6)  # autograd may pick other attention kernels


def test_in_place_update_invalidates_the_cache():
    model, x = _model("agent_deit_tiny"), _image("agent_deit_tiny")
    with torch.inference_mode():
        before = model.forward_features(x)  # all tokens: ha_bias reaches the logits only through later blocks
    attn = _agent_modules(model)[0]
    gen = torch.Generator().manual_seed(5)
    for name in ("an_bias", "ha_bias", "ca_bias"):
        with torch.no_grad():
            param = getattr(attn, name)
            param.add_(torch.randn(param.shape, generator=gen))  # not a constant: softmax would ignore it
            cached = model.forward_features(x)
            fresh = _model("agent_deit_tiny")
            fresh.load_state_dict(model.state_dict())
            assert torch.equal(cached, fresh.forward_features(x)), name
        assert (cached - before).abs().max().item() > 1e-3, name
        before = cached


def test_a_replaced_parameter_invalidates_the_cache():
    """A new Parameter object under a bias's name (a fine-tuning script's re-init) is seen by identity, whatever its
    version counter and storage address: the cache holds the parameters it was built from."""
    model, x = _model("agent_deit_tiny"), _image("agent_deit_tiny")
    attn = _agent_modules(model)[0]
    with torch.no_grad():
        before = model.forward_features(x)
        attn.na_bias = torch.nn.Parameter(attn.na_bias + torch.randn(attn.na_bias.shape,
                                                                     generator=torch.Generator().manual_seed(6)))
        cached = model.forward_features(x)
        fresh = _model("agent_deit_tiny")
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(cached, fresh.forward_features(x))
    assert (cached - before).abs().max().item() > 1e-3


def test_data_writes_need_an_explicit_cache_clear():
    """A write through ``.data`` leaves the version counter as it was: the cache cannot see it (documented), and
    zoo.ops.clear_parameter_caches drops every module's cache."""
    model, x = _model("agent_swin_t"), _image("agent_swin_t")
    with torch.no_grad():
        before = model(x)
        for attn in _agent_modules(model):
            attn.an_bias.data.add_(torch.randn(attn.an_bias.shape, generator=torch.Generator().manual_seed(7)))
        assert torch.equal(model(x), before)  # stale: the limitation the docstring states
        # every agent module's cache, and each Swin window block's gathered position bias
        holders = len(_agent_modules(model)) + sum(hasattr(m, "relative_position_bias_table") for m in model.modules())
        assert zoo.ops.clear_parameter_caches(model) == holders
        after = model(x)
        fresh = _model("agent_swin_t")
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(after, fresh(x)) and (after - before).abs().max().item() > 1e-3
        assert zoo.ops.clear_parameter_caches(model) == holders  # refilled by the forward


def test_an_optimizer_step_invalidates_the_cache():
    """The cache keys on the process's optimizer-step count too, whether or not an optimizer's kernels bump the
    parameters' version counters. A ``.data`` write stands in for an update they do not record; a step of any
    optimizer, even one that changes nothing, then refreshes the biases."""
    model, x = _model("agent_swin_t"), _image("agent_swin_t")
    with torch.no_grad():
        before = model(x)
        for attn in _agent_modules(model):
            attn.an_bias.data.add_(torch.randn(attn.an_bias.shape, generator=torch.Generator().manual_seed(8)))
        assert torch.equal(model(x), before)  # no version bump: still the cached biases
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # no gradients: changes no parameter
    with torch.no_grad():
        after = model(x)
    fresh = _model("agent_swin_t")
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(after, fresh(x)) and (after - before).abs().max().item() > 1e-3


def test_load_state_dict_deepcopy_and_dtype_change_invalidate_the_cache():
    model, other, x = _model("agent_pvt_tiny"), _model("agent_pvt_tiny"), _image("agent_pvt_tiny")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
        ref_other = other(x)
        model(x)  # fill the cache
        twin = copy.deepcopy(model)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(x), ref_other, rtol=0, atol=0)
        assert not any("cache" in k for k in model.state_dict())
        twin_out = twin(x)
        assert (twin_out - ref_other).abs().max().item() > 1e-3  # the copy kept its own weights
        wide = model.double()(x.double())
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide.float(), ref_other, rtol=1e-4, atol=1e-5)


def test_training_after_inference_mode_backpropagates():
    model, x = _model("agent_swin_t"), _image("agent_swin_t")
    with torch.inference_mode():
        model(x)
    model.train()
    model(x).sum().backward()
    assert all(m.an_bias.grad is not None and m.ah_bias.grad is not None for m in _agent_modules(model))


# --- 4-D bias layout: channels_last and the official 5-D checkpoints -------------------------------------------------

@pytest.mark.parametrize("name", list(TINY))
def test_channels_last_model_equals_contiguous(name):
    model, x = _model(name), _image(name)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert not _agent_modules(model)[0].an_bias.is_contiguous()  # the 4-D biases really were converted
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_official_5d_biases_are_squeezed_on_load():
    model = _model("agent_cswin_t")
    sd = model.state_dict()
    official = {k: v[None] if k.rsplit(".", 1)[-1] in ROWCOL else v for k, v in sd.items()}
    assert any(v.ndim == 5 for v in official.values())
    mapped = get_converter("agent_attention").key_map(official)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in sd.items()}
    assert common.squeeze_official_biases(mapped).keys() == mapped.keys()  # zoo layout passes unchanged
    fresh = zoo.create_model("agent_cswin_t", **TINY["agent_cswin_t"]).eval()
    fresh.load_state_dict(official)  # plain load_state_dict takes the official layout too
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())
    assert official["stage1.0.attns.0.ah_bias"].ndim == 5  # the caller's dict is left as it was


@pytest.mark.parametrize("agents", [None, (3, 3)])
def test_biases_have_a_contiguous_agent_and_key_dim(agents):
    # SDPA's memory-efficient backward rejects a float mask whose last dim is strided (without its alignment padding,
    # e.g. 16 agents).
    module = torch.nn.Module()
    common.init_agent_biases(module, 2, 16, (8, 8), (8, 8), cls_token=True)
    for sizes in [((8, 8), (8, 8)), ((4, 12), (6, 5))]:
        for m in (module, copy.deepcopy(module).to(memory_format=torch.channels_last)):
            key, query = common.agent_biases(m, *sizes, agents=agents)
            assert key.stride(-1) == 1 and query.stride(-1) == 1


def test_agent_model_compiles_without_graph_breaks_and_matches_eager_gradients():
    model = _model("agent_deit_tiny").train()
    x = _image("agent_deit_tiny")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    params = [model.blocks[0].attn.an_bias, model.blocks[0].attn.qkv.weight]
    got = torch.autograd.grad(out.square().sum(), params)
    want = torch.autograd.grad(model(x).square().sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_model_built_under_inference_mode_runs_and_sees_in_place_updates(build_calls):
    # parameters created under inference_mode have no version counter: no caching, never stale
    with torch.inference_mode():
        torch.manual_seed(0)
        model = zoo.create_model("agent_deit_tiny", **TINY["agent_deit_tiny"]).eval()
        x = _image("agent_deit_tiny")
        first = model(x)
        model.blocks[0].attn.an_bias.add_(torch.randn(model.blocks[0].attn.an_bias.shape))
        second = model(x)
    assert not torch.equal(first, second)
    assert len(build_calls) == 2 * len(_agent_modules(model))
