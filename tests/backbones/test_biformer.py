"""BiFormer: parity with the official implementation, official checkpoints, the timm interface."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import zoo
from zoo.backbones.biformer import BiFormer, BiLevelRoutingAttention, NCHWRoutingAttention
from zoo.convert import from_official, load_official_state_dict

FIXTURES = Path(__file__).parents[1] / "fixtures" / "parity" / "biformer"
CASES = ["biformer_tiny_cls_224", "biformer_stl_tiny_224", "biformer_stl_nchw_tiny_224"]
NAMES = ["biformer_tiny", "biformer_small", "biformer_base", "biformer_stl", "biformer_stl_nchw"]
RTOL = 1e-5  # relative to the largest reference magnitude, float32

# Small configs of the three layouts for interface tests (64x64 input: maps 16/8/4/2, 2x2 regions).
TINY = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128), head_dim=8, n_win=2, mlp_ratios=2)
TINY_MODELS = {
    "biformer_tiny": dict(TINY, topks=(1, 2, 2, -2)),
    "biformer_stl": dict(TINY, topks=(1, 2, 2, -2)),
    "biformer_stl_nchw": dict(TINY, topks=(1, 2, 2, -1)),
}


def _case(name: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    tensors = load_file(str(FIXTURES / f"{name}.safetensors"))
    sd = {k[len("sd."):]: v for k, v in tensors.items() if k.startswith("sd.")}
    return meta, tensors, sd


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    assert actual.shape == expected.shape, what
    scale = expected.abs().max().item()
    assert scale > 0.1, f"{what}: reference is degenerate"
    err = (actual - expected).abs().max().item()
    assert err <= RTOL * scale, f"{what}: max|diff| {err:.3g} > {RTOL} * {scale:.3g}"
    return err


def _tiny(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.create_model(name, **dict(TINY_MODELS[name], **kwargs)).eval()


def _images(size: int = 64, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# Parity with the official code

@pytest.mark.parametrize("case", CASES)
def test_parity_with_official(case):
    meta, t, sd = _case(case)
    model = from_official("biformer", meta["class"], meta["kwargs"], sd).eval()
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"]
    with torch.no_grad():
        final, feats = model.forward_intermediates(t["input"])
        logits = model.forward_head(final)
        _assert_close(model(t["input"]), t["output"], f"{case} forward")
    _assert_close(logits, t["output"], f"{case} logits")
    for i, feat in enumerate(feats):
        _assert_close(feat, t[f"feat.{i}"], f"{case} feat.{i}")


def test_official_variants_load_official_keys_with_official_param_counts():
    variants = json.loads((FIXTURES / "keys.json").read_text())
    assert sorted(variants) == sorted(NAMES)
    for name, spec in variants.items():
        model = zoo.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == spec["num_params"], name
        # a distinct constant per tensor (cheap at 57M parameters) shows each lands under its own name
        sd = {k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.full(shape, i / 7.0)
              for i, (k, shape) in enumerate(spec["state_dict"].items())}
        load_official_state_dict("biformer", model, {"model": sd})  # strict
        own = model.state_dict()
        assert all(torch.equal(own[k], sd[k]) for k in sd if k.endswith(("lepe.weight", "head.bias")))
        with torch.device("meta"):  # the official constructor call builds the same model
            official = from_official("biformer", spec["official_class"], spec["official_kwargs"])
        assert {k: list(v.shape) for k, v in official.state_dict().items()} == spec["state_dict"], name


def test_checkpoint_path_accepts_official_release_wrapping(tmp_path):
    meta, t, sd = _case("biformer_stl_nchw_tiny_224")
    path = tmp_path / "biformer_stl_nchw_in1k.pth"
    torch.save({"model": sd, "epoch": 299}, path)
    kw = meta["kwargs"]
    model = zoo.create_model("biformer_stl_nchw", checkpoint_path=path, depths=kw["depth"],
                             embed_dims=kw["embed_dim"], head_dim=kw["head_dim"], topks=kw["topks"]).eval()
    assert model.num_classes == 100  # taken from the checkpoint's head
    with torch.no_grad():
        _assert_close(model(t["input"]), t["output"], "checkpoint_path logits")


def test_from_official_rejects_what_it_cannot_build():
    with pytest.raises(ValueError, match="accepted"):
        from_official("biformer", "MaxViTSTL", {})
    with pytest.raises(ValueError, match="unknown BiFormer kwargs \\['qkv_bias'\\]"):
        from_official("biformer", "BiFormer", {"qkv_bias": True})
    with pytest.raises(ValueError, match="kv_downsample_mode='ada_avgpool' is not supported"):
        from_official("biformer", "BiFormer", {"qk_dims": [64, 128, 320, 512]})  # official default kv mode
    with pytest.raises(ValueError, match="topks\\[3\\]=-2 is not supported for layout='stl_nchw'"):
        from_official("biformer", "nchwBiFormerSTL", {"topks": (1, 4, 16, -2)})


# ----------------------------------------------------------------------------------------------------------------
# Quirks and dense-prediction options

def test_legacy_auto_pad_pads_normed_tokens_before_projection():
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention(dim=8, num_heads=2, n_win=3, topk=2, side_dwconv=3, auto_pad=True).eval()
    x = torch.randn(2, 7, 8, 8)  # NHWC, pads to 9x9
    with torch.no_grad():
        out = attn(x)
        attn.auto_pad = False
        manual = attn(torch.nn.functional.pad(x, (0, 0, 0, 1, 0, 2)))[:, :7, :8]
    assert out.shape == (2, 7, 8, 8)
    assert out.abs().max() > 0.1
    assert (out - manual).abs().max().item() == 0.0


def test_legacy_without_auto_pad_names_the_fix():
    model = BiFormer(**dict(TINY, topks=(1, 2, 2, -2), n_win=7)).eval()
    with pytest.raises(ValueError, match="auto_pad=True"):
        model(_images(64))


def test_auto_pad_and_nchw_accept_any_input_size():
    x = _images(72)  # stage maps 18/9/5/3 (biformer) and 18/9/4/2 (STL): not multiples of n_win=7
    for name in ("biformer_tiny", "biformer_stl"):
        model = _tiny(name, auto_pad=True, n_win=7, topks=(1, 4, 4, -2))
        with torch.no_grad():
            assert model(x).shape == (2, 1000)
    nchw = _tiny("biformer_stl_nchw", n_win=2)
    with torch.no_grad():
        feats = nchw.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[-1] for f in feats] == [18, 9, 4, 2]


def test_nchw_region_size_follows_the_map():
    torch.manual_seed(0)
    attn = NCHWRoutingAttention(dim=8, num_heads=2, n_win=2, topk=3, side_dwconv=3).eval()
    with torch.no_grad():
        out = attn(torch.randn(1, 8, 9, 9))  # region 4x4 -> 3x3 = 9 regions (more than n_win^2)
    assert out.shape == (1, 8, 9, 9)
    with pytest.raises(ValueError, match="at least n_win=2"):
        attn(torch.randn(1, 8, 1, 4))


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="layout must be one of"):
        BiFormer(layout="swin")
    with pytest.raises(ValueError, match="topks\\[1\\]=0 is not supported"):
        BiFormer(**dict(TINY, topks=(1, 0, 2, -2)))
    with pytest.raises(ValueError, match="depths must be"):
        BiFormer(depths=(1, 1, 1))
    with pytest.raises(ValueError, match="does not support before_attn_dwconv=3"):
        BiFormer(**dict(TINY, layout="stl_nchw", topks=(1, 2, 2, -1)))


# ----------------------------------------------------------------------------------------------------------------
# timm interface

def test_timm_create_model_and_pretrained_cfg():
    model = timm.create_model("biformer_tiny", **TINY_MODELS["biformer_tiny"])
    assert isinstance(model, BiFormer)
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.tag == "in1k"
        assert cfg.input_size == (3, 224, 224) and cfg.interpolation == "bicubic"
        assert cfg.crop_pct == 0.875 and cfg.classifier == "head" and cfg.first_conv == "downsample_layers.0.0"
        assert cfg.url.startswith("https://api.onedrive.com/")
    assert sorted(zoo.list_models("biformer*")) == sorted(NAMES)
    modules = dict(model.named_modules())
    assert isinstance(modules[model.pretrained_cfg["first_conv"]], torch.nn.Conv2d)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_forward_head_pre_logits_and_reset_classifier(name):
    model = _tiny(name)
    x = _images()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 128, 2, 2)
        pooled = model.forward_head(feats, pre_logits=True)
        assert torch.allclose(pooled, feats.mean((2, 3)))
        assert torch.allclose(model.forward_head(feats), model.head(pooled))
        model.reset_classifier(10)
        assert model(x).shape == (2, 10) and model.num_classes == 10
        model.reset_classifier(0)
        assert torch.allclose(model(x), pooled)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_features_only(name):
    torch.manual_seed(0)
    model = zoo.create_model(name, features_only=True, **TINY_MODELS[name]).eval()
    assert model.feature_info.channels() == [16, 32, 64, 128]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    x = _images()
    with torch.no_grad():
        feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4), (2, 128, 2, 2)]

    torch.manual_seed(0)
    partial = zoo.create_model(name, features_only=True, out_indices=(1, 2), **TINY_MODELS[name]).eval()
    assert partial.feature_info.channels() == [32, 64]
    assert len(partial.model.stages) == 3  # stage 3 pruned
    with torch.no_grad():
        two = partial(x)
    assert torch.allclose(two[0], feats[1]) and torch.allclose(two[1], feats[2])


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_extra_norms_normalise_every_returned_stage_output(name):
    # the official dense-prediction backbone (BiFormer_mm): LayerNorm2d(eps 1e-6) on each stage output
    plain = _tiny(name)
    model = _tiny(name, extra_norms=True)
    assert [k for k in model.state_dict() if k.startswith("extra_norms.")] == \
        [f"extra_norms.{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(k for k in model.state_dict() if k.startswith("extra_norms."))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.extra_norms.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = _images()
    with torch.no_grad():
        raw = plain.forward_intermediates(x, intermediates_only=True)
        normed = model.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(model(x), plain(x))  # the classification path is unchanged
    for i, (r, n) in enumerate(zip(raw, normed)):
        mean, var = r.mean(1, keepdim=True), r.var(1, keepdim=True, unbiased=False)
        weight, bias = model.extra_norms[i].weight, model.extra_norms[i].bias
        expected = (r - mean) / torch.sqrt(var + 1e-6) * weight[:, None, None] + bias[:, None, None]
        torch.testing.assert_close(n, expected, rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    feats = zoo.create_model(name, features_only=True, out_indices=(1, 2), extra_norms=True,
                             **TINY_MODELS[name]).eval()
    dropped = ("extra_norms.3", "head", "norm", "stages.3", "downsample_layers.3")  # pruned with out_indices (1, 2)
    feats.model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(dropped)})
    with torch.no_grad():
        two = feats(x)
    torch.testing.assert_close(two[0], normed[1])
    torch.testing.assert_close(two[1], normed[2])


def test_grad_checkpointing_keeps_outputs_and_grads():
    model = _tiny("biformer_tiny").train()
    x = _images()
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    grads_ckpt = torch.autograd.grad(out_ckpt.square().sum(), list(model.parameters()))
    assert torch.allclose(out, out_ckpt, rtol=0, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(grads, grads_ckpt)) < 1e-5


def test_no_weight_decay_and_group_matcher():
    model = _tiny("biformer_stl")
    assert model.no_weight_decay() == set()
    for coarse in (True, False):
        groups = timm.models.group_parameters(model, model.group_matcher(coarse=coarse))
        assert all(k.startswith("downsample_layers.0.") for k in groups[0])
        assert sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    fine = timm.models.group_parameters(model, model.group_matcher())
    assert len(fine) == 1 + 4 + 1  # stem, one block per stage (the final norm joins the last), head
    assert "norm.weight" in fine[4] and "stages.3.blocks.0.norm1.weight" in fine[4]
    assert fine[5] == ["head.weight", "head.bias"]


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    model = _tiny("biformer_tiny")
    x = _images(batch=1)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    assert (compiled - eager).abs().max().item() < 1e-4 * eager.abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# GPU (run by the lead on the GPU machine)

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES)
def test_gpu_parity_float32(case, no_tf32):
    meta, t, sd = _case(case)
    model = from_official("biformer", meta["class"], meta["kwargs"], sd).eval().cuda()
    with torch.no_grad():
        out = model(t["input"].cuda()).cpu()
    err = (out - t["output"]).abs().max().item()
    assert err <= 1e-4 * t["output"].abs().max().item(), err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_gpu_full_size_bf16_train_step(name):
    model = zoo.create_model(name).cuda().train()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    out.float().logsumexp(-1).mean().backward()
    assert out.shape == (8, 1000) and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
