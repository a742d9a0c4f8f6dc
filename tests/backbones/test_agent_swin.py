"""Agent-Swin: parity with the official implementation, official checkpoints, timm interface, other input sizes."""
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import zoo
from backbone_checks import randomize, resize_1d
from zoo.backbones.agent_swin import AgentSwinTransformer, parse_attn_types
from zoo.convert import from_official, load_official_state_dict

FIXTURES = Path(__file__).parents[1] / "fixtures" / "parity" / "agent_attention"
CASE = "agent_swin_tiny_224"
VARIANT_KEYS = {  # zoo name -> keys.json entry
    "agent_swin_t": "agent_swin_tiny_224",
    "agent_swin_s": "agent_swin_small_224",
    "agent_swin_s_288": "agent_swin_small_288",
    "agent_swin_b": "agent_swin_base_224",
    "agent_swin_b_384": "agent_swin_base_384",
}
# A small model for interface tests: global agent stages (window 16 = stage 0 size), window stages after.
TINY = dict(img_size=64, embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=16,
            attn_type="AAMB1", agent_num=(4, 4, 4, 4), num_classes=10, drop_path_rate=0.0)


def _fixture():
    meta = json.loads((FIXTURES / f"{CASE}.json").read_text())
    tensors = load_file(str(FIXTURES / f"{CASE}.safetensors"))
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    return meta, tensors, sd


def _keys():
    return json.loads((FIXTURES / "agent_swin_keys.json").read_text())


def _assert_close(out, ref, rel=1e-5):
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert scale > 0.1, "degenerate reference"
    assert err <= rel * scale, f"max|diff| {err:.3g} > {rel} * {scale:.3g}"


def _fixture_model_kwargs(meta):
    kw = dict(meta["kwargs"])
    kw.pop("use_checkpoint")
    return kw


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_parity_with_official(backend, monkeypatch):
    monkeypatch.setenv("ZOO_OPS_BACKEND", f"window_attention:{backend},agent_attention:{backend}")
    meta, t, sd = _fixture()
    model = from_official(meta["family"], meta["class"], meta["kwargs"], sd).eval()
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"]
    with torch.no_grad():
        final, feats = model.forward_intermediates(t["input"], output_fmt="NHWC")
        logits = model.forward_head(final)
    _assert_close(logits, t["output"])
    for i, feat in enumerate(feats):  # official features are (B, H*W, C) before each patch merging
        _assert_close(feat.flatten(1, 2), t[f"feat.{i}"])


def test_checkpoint_path_with_official_wrapping(tmp_path):
    meta, t, sd = _fixture()
    path = tmp_path / "agent_swin_release.pth"
    torch.save({"model": sd, "max_accuracy": 82.6, "epoch": 300}, path)
    model = zoo.create_model("agent_swin_t", checkpoint_path=path, **_fixture_model_kwargs(meta)).eval()
    assert model.num_classes == 100  # head size taken from the checkpoint
    with torch.no_grad():
        _assert_close(model(t["input"]), t["output"])


@pytest.mark.parametrize("name", list(VARIANT_KEYS))
def test_variant_loads_official_keys_strictly(name):
    entry = _keys()[VARIANT_KEYS[name]]
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = zoo.create_model(name)
        sd = {k: torch.empty(shape) for k, shape in entry["state_dict"].items()}
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]
    assert set(model.state_dict()) == set(sd)
    load_official_state_dict("agent_attention", model, {"model": sd})  # strict: raises on any mismatch


def test_from_official_full_size_kwargs():
    entry = _keys()["agent_swin_base_384"]
    with torch.device("meta"):
        model = from_official("agent_attention", entry["official_class"], entry["official_kwargs"],
                              {k: torch.empty(s) for k, s in entry["state_dict"].items()})
    assert isinstance(model, AgentSwinTransformer)
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]


def test_pretrained_cfgs_and_names():
    for name in VARIANT_KEYS:
        cfg = timm.models.get_pretrained_cfg(f"{name}.in1k")
        assert cfg.url.startswith("https://cloud.tsinghua.edu.cn/f/")
        assert cfg.first_conv == "patch_embed.proj" and cfg.classifier == "head"
    assert timm.models.get_pretrained_cfg("agent_swin_b_384").input_size == (3, 384, 384)
    assert zoo.list_models("agent_swin*") == sorted(VARIANT_KEYS)


def test_forward_features_head_and_classifier():
    torch.manual_seed(0)
    model = zoo.create_model("agent_swin_t", **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 2, 2, 64)  # channels-last, stride 32
        pooled = model.forward_head(feats, pre_logits=True)
        assert torch.allclose(pooled, feats.mean((1, 2)))
        logits = model(x)
        assert logits.shape == (2, 10)
        assert torch.allclose(logits, model.head(pooled), atol=1e-6)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
        model.reset_classifier(0, global_pool="")
        assert model(x).shape == (2, 2, 2, 64)
    assert model.num_features == 64


def test_features_only():
    model = zoo.create_model("agent_swin_t", features_only=True, out_indices=(0, 2, 3), **TINY).eval()
    assert model.feature_info.channels() == [8, 32, 64]
    assert model.feature_info.reduction() == [4, 16, 32]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 8, 16, 16), (1, 32, 4, 4), (1, 64, 2, 2)]
    # Pruned after stage 3: no unused merging left behind.
    assert model.model.layers[-1].downsample is None


def test_intermediates_match_forward_features():
    torch.manual_seed(0)
    model = zoo.create_model("agent_swin_t", **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x, indices=[1, 3])
        assert torch.allclose(final, model.forward_features(x))
        assert [f.shape[1] for f in feats] == [16, 64]
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], feats[0])


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = zoo.create_model("agent_swin_t", **TINY).train()
    x = torch.randn(2, 3, 64, 64)

    def grads():
        model.zero_grad()
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.set_grad_checkpointing(True)
    assert all(layer.grad_checkpointing for layer in model.layers)
    ckpt = grads()
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], rtol=1e-5, atol=1e-7), n


def test_no_weight_decay_and_group_matcher():
    model = zoo.create_model("agent_swin_t", **TINY)
    leaf = ("relative_position_bias_table", "an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias")
    expected = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in leaf}
    nwd = model.no_weight_decay()
    assert nwd == expected
    # agent blocks: stages 0, 1 and the first of stage 2 (6 biases each); window blocks: 2 tables
    assert len(nwd) == 3 * 6 + 2 and "layers.3.blocks.0.attn.relative_position_bias_table" in nwd
    groups = timm.models.group_parameters(model, model.group_matcher())
    order = list(groups.values())
    assert all(n.startswith("patch_embed") for n in order[0])
    # timm's (99999,) joins the final norm to the last block's group; the head gets a group of its own
    assert order[-2][0].startswith("layers.3.blocks.0.") and order[-2][-2:] == ["norm.weight", "norm.bias"]
    assert order[-1] == ["head.weight", "head.bias"]
    assert len(order) == 1 + 5 + 3 + 1  # stem, 5 blocks, 3 mergings, head
    assert all(n.startswith("layers.0.downsample") for n in order[2])  # merging follows stage 0's block
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 1 + 4 + 1


def test_other_input_size_equals_model_built_for_it():
    """Run at 256, a model built for 128 equals the (official classification) model built for 256 whose row/column
    agent biases are the 224 ones resized: bilinear resizing of (row + column) biases is the sum of their 1-D
    resizes. Agent-only stages, so that both models have the same windows."""
    kw = dict(img_size=128, embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=32,
              attn_type="AAAA", agent_num=(4, 9, 16, 16), num_classes=10)
    small = randomize(AgentSwinTransformer(**kw), vector_std=0.5)
    big = AgentSwinTransformer(**dict(kw, img_size=256, window_size=64)).eval()
    big_sd = big.state_dict()
    for k, v in small.state_dict().items():
        leaf = k.rsplit(".", 1)[-1]
        if leaf in ("ah_bias", "aw_bias", "ha_bias", "wa_bias"):
            dim = {"ah_bias": 2, "aw_bias": 3, "ha_bias": 1, "wa_bias": 2}[leaf]
            v = resize_1d(v, big_sd[k].shape[dim], dim)
        assert v.shape == big_sd[k].shape, k
        big_sd[k] = v
    big.load_state_dict(big_sd)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = big(x)
        out = small(x)
        native = small(x[:, :, ::2, ::2])
    _assert_close(out, ref)
    assert (out - native).abs().max().item() > 1e-3  # the input size really changed the computation


def test_non_multiple_input_sizes_run():
    meta, _, sd = _fixture()
    model = AgentSwinTransformer(**_fixture_model_kwargs(meta)).eval()
    model.load_state_dict(sd)
    with torch.no_grad():
        for size in ((200, 232), (97, 130)):  # windows padded, odd maps padded before merging
            out, feats = model.forward_intermediates(torch.randn(1, 3, *size))
            assert torch.isfinite(out).all()
            assert feats[0].shape[-2:] == (-(-size[0] // 4), -(-size[1] // 4))
        with pytest.raises(ValueError, match="too small"):
            model(torch.randn(1, 3, 16, 64))


@pytest.mark.parametrize("attn_type,message", [
    ("AAB", "one of 'A', 'B', 'M' per stage"),
    ("AACB", "one of 'A', 'B', 'M' per stage"),
    ("AAMB", "needs its agent block count"),
])
def test_attn_type_errors(attn_type, message):
    with pytest.raises(ValueError, match=message):
        parse_attn_types(attn_type, (2, 2, 6, 2))


def test_attn_type_parsing():
    assert parse_attn_types("AAMB2", (1, 1, 4, 1)) == [["A"], ["A"], ["A", "A", "B", "B"], ["B"]]


def test_bad_agent_num():
    with pytest.raises(ValueError, match="agent_num must be a positive perfect square"):
        AgentSwinTransformer(**dict(TINY, agent_num=(4, 4, 10, 4)))



def test_window_bias_is_gathered_once_without_autograd_and_follows_the_table():
    torch.manual_seed(0)
    model = AgentSwinTransformer(**TINY).eval()
    attn = model.layers[3].blocks[0].attn  # a window ('B') block
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first = attn.relative_position_bias()
        assert attn.relative_position_bias() is first  # kept, not gathered again
        assert torch.equal(first, attn._gathered_bias())
        out = model(x)
        attn.relative_position_bias_table.mul_(50.0)  # an in-place update: a new version
        updated = attn.relative_position_bias()
        assert updated is not first and torch.equal(updated, first * 50.0)
        changed = model(x)
    assert (changed - out).abs().max().item() > 1e-4
    traced = attn.relative_position_bias()  # with autograd: gathered in the graph, never the kept tensor
    assert traced.grad_fn is not None and torch.equal(traced.detach(), updated)
    assert torch.allclose(model(x), changed, rtol=1e-5, atol=1e-6)

# ---------------------------------------------------------------------------------------------------------------
# GPU (run by the lead: pytest -m gpu tests/backbones/test_agent_swin.py)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_parity_and_compile(no_tf32):  # (TF32 convolutions would dominate the float32 error)
    meta, t, sd = _fixture()
    model = from_official(meta["family"], meta["class"], meta["kwargs"], sd).cuda().eval()
    x = t["input"].cuda()
    with torch.no_grad():
        _assert_close(model(x).cpu(), t["output"])
        _assert_close(torch.compile(model)(x).cpu(), t["output"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["agent_swin_t", "agent_swin_b_384"])
def test_gpu_full_size_bf16_train_step(name):
    torch.manual_seed(0)
    model = zoo.create_model(name).cuda().train()
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(2, 3, size, size, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                        if p.grad is not None)
