"""VOLO: parity with the official code and with timm, official checkpoints of every release, the timm interface."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import zoo
from zoo.backbones.volo import VOLO, _swap_box, official_to_zoo_kwargs, window_means
from zoo.convert import CheckpointMismatchError, checkpoint_filter, from_official

FIXTURES = Path(__file__).parents[1] / "fixtures" / "parity" / "volo"
KEYS = json.loads((FIXTURES / "keys.json").read_text())
RTOL = 1e-5  # max|diff| relative to the largest reference magnitude, float32

# 64x64 input: stem 8x8 tokens (outlooker), 4x4 after the merge
TINY = dict(layers=(2, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(2, 4, 4, 4), stem_hidden_dim=8, img_size=64,
            num_classes=10)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL,
                  min_scale: float = 0.1) -> float:
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    assert scale > min_scale, f"{what}: reference is degenerate"
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= rtol * scale, f"{what}: max|diff| {err:.3g} > {rtol} * {scale:.3g}"
    return err


def _images(size: int = 64, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tiny(**kwargs) -> VOLO:
    torch.manual_seed(0)
    model = zoo.create_model("zoo_volo_d1_224", **dict(TINY, **kwargs))
    _randomize(model)
    return model.eval()


def _randomize(model: torch.nn.Module) -> None:
    """Non-degenerate weights (biases, norms and BN statistics away from their init values)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen) * (0.2 if t.ndim < 2 else t[0].numel() ** -0.5)
                t.copy_(noise.abs() + 0.5 if name.endswith("running_var") else t + noise)


def _fixture():
    meta = json.loads((FIXTURES / "volo_tiny_224.json").read_text())
    tensors = load_file(str(FIXTURES / "volo_tiny_224.safetensors"))
    sd = {k[len("sd."):]: v for k, v in tensors.items() if k.startswith("sd.")}
    return meta, tensors, sd


# ----------------------------------------------------------------------------------------------------------------
# parity


def test_parity_with_official_fixture():
    meta, tensors, sd = _fixture()
    model = from_official("volo", meta["class"], meta["kwargs"], sd).eval()
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"]
    stem_out = {}
    model.network[1].register_forward_hook(lambda m, i, o: stem_out.setdefault("feat.1", o))
    with torch.no_grad():
        final, maps = model.forward_intermediates(tensors["input"])
        logits = model.forward_head(final)
    _assert_close(logits, tensors["output"], "logits")
    for level, block in enumerate(model.stage_ends):  # network indices 0, 2, 3, 4 (NCHW maps)
        _assert_close(maps[level].permute(0, 2, 3, 1), tensors[f"feat.{block}"], f"feat.{block}")
    _assert_close(stem_out["feat.1"], tensors["feat.1"], "feat.1 (merge)")
    with torch.no_grad():
        _assert_close(model(tensors["input"]), tensors["output"], "forward")


def test_matches_timm_volo_on_the_same_weights():
    from timm.models.volo import VOLO as TimmVOLO

    ours = _tiny()
    theirs = TimmVOLO(**TINY).eval()
    assert set(theirs.state_dict()) == set(ours.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = _images()
    with torch.no_grad():
        _assert_close(ours(x), theirs(x), "logits")
        _assert_close(ours.forward_features(x), theirs.forward_features(x), "forward_features")
        _assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                      theirs.forward_head(theirs.forward_features(x), pre_logits=True), "pre_logits")
        for a, b in zip(ours.forward_intermediates(x, intermediates_only=True),
                        theirs.forward_intermediates(x, intermediates_only=True)):
            _assert_close(a, b, "intermediates")
        ours.train(), theirs.train()  # timm's forward is the same in train mode; no dropout configured
        _assert_close(ours(x), theirs(x), "train-mode logits")


def test_eval_logits_are_class_head_plus_half_max_aux():
    model = _tiny()
    x = _images()
    with torch.no_grad():
        tokens = model.forward_features(x)
        cls, aux, box = model.forward_train(x)
        expected = model.head(tokens[:, 0]) + 0.5 * model.aux_head(tokens[:, 1:]).max(1)[0]
        logits = model(x)
    assert box == (0, 0, 0, 0) and aux.shape == (2, 16, 10)
    _assert_close(logits, expected, "cls + 0.5 max aux")
    _assert_close(logits, cls + 0.5 * aux.max(1)[0], "forward_train parts")


def test_mix_token_swaps_a_box_and_swaps_it_back():
    x = torch.arange(2 * 4 * 6 * 1.0).reshape(2, 4, 6, 1)
    swapped = _swap_box(x, (1, 2, 3, 5))
    assert torch.equal(swapped[0, 1:3, 2:5], x[1, 1:3, 2:5]) and torch.equal(swapped[0, 0], x[0, 0])
    assert torch.equal(_swap_box(swapped, (1, 2, 3, 5)), x)
    model = _tiny(use_mix_token=True).train()
    torch.manual_seed(3)
    same = _images(batch=1).expand(2, -1, -1, -1)  # mixing identical images changes nothing
    cls, aux, box = model.forward_train(same)
    assert box != (0, 0, 0, 0) and all(0 <= c <= 4 for c in box)
    model.mix_token = False
    cls_ref, aux_ref, _ = model.forward_train(same)
    _assert_close(aux, aux_ref, "mixed aux of identical images")


@pytest.mark.parametrize("shape, stride", [((2, 8, 12, 5), 2), ((1, 7, 9, 3), 2), ((1, 9, 6, 2), 3),
                                           ((1, 5, 5, 2), 1)], ids=str)
def test_window_means_are_the_official_ceil_mode_pool(shape, stride):
    # tiling maps take the mean of a view, others (and stride 1) the pool itself: values and gradients agree
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    pooled = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), stride, stride, ceil_mode=True).permute(0, 2, 3, 1)
    ours = window_means(x, stride)
    assert ours.shape == pooled.shape
    torch.testing.assert_close(ours, pooled, rtol=1e-12, atol=1e-12)
    weights = torch.randn(pooled.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    expected, = torch.autograd.grad((pooled * weights).sum(), x)
    actual, = torch.autograd.grad((ours * weights).sum(), x)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_official_kwargs_mapping_and_errors():
    meta, _, _ = _fixture()
    kw = official_to_zoo_kwargs(dict(meta["kwargs"], drop_rate=0.1, return_dense=False, mix_token=False))
    assert kw["pos_drop_rate"] == 0.1 and kw["use_aux_head"] is False and kw["global_pool"] == "token"
    with pytest.raises(ValueError, match="unknown official VOLO kwargs \\['bogus'\\]"):
        from_official("volo", "VOLO", dict(meta["kwargs"], bogus=1))
    with pytest.raises(ValueError, match="not an official volo class"):
        from_official("volo", "Outlooker", meta["kwargs"])
    _, _, sd = _fixture()
    sd.pop("aux_head.bias")
    with pytest.raises(CheckpointMismatchError, match="aux_head.bias"):
        from_official("volo", "VOLO", meta["kwargs"], sd)


# ----------------------------------------------------------------------------------------------------------------
# official checkpoints of every release


def _shapes(entry: dict) -> dict[str, list[int]]:
    sd = entry["state_dict"]
    return sd if isinstance(sd, dict) else ast.literal_eval(sd)


@pytest.mark.parametrize("name", sorted(KEYS))
def test_every_release_takes_official_keys(name):
    entry = KEYS[name]
    shapes = _shapes(entry)
    with torch.device("meta"):
        model = zoo.create_model(f"zoo_{name}")
        official = from_official("volo", entry["official_class"], entry["official_kwargs"])
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == shapes
    assert {k: list(v.shape) for k, v in official.state_dict().items()} == shapes
    # the loading path of release files: unwrap + key map + strict check, then a strict load
    wrapped = {"state_dict": {f"module.{k}": torch.empty(s, device="meta") for k, s in shapes.items()}}
    sd = checkpoint_filter("volo", wrapped, model)
    model.load_state_dict(sd, strict=True, assign=True)
    cfg = timm.models.get_pretrained_cfg(f"zoo_{name}")
    timm_cfg = timm.models.get_pretrained_cfg(name)
    assert (cfg.input_size, cfg.crop_pct, cfg.url, cfg.mean, cfg.first_conv) == \
        (timm_cfg.input_size, timm_cfg.crop_pct, timm_cfg.url, timm_cfg.mean, timm_cfg.first_conv)
    assert cfg.tag == "sail_in1k"
    copy = timm.models.get_pretrained_cfg(f"zoo_{name}.sail_in1k_timm")
    assert copy.hf_hub_id == f"timm/{name}.sail_in1k" and copy.crop_pct == timm_cfg.crop_pct


@pytest.mark.parametrize("wrapping", ["raw", "state_dict_module"])
def test_create_model_from_official_release_file(tmp_path, wrapping):
    """Release files are raw state dicts; the official loader also reads {'state_dict': ...} with 'module.'."""
    reference = _tiny(num_classes=1000)
    sd = reference.state_dict()
    obj = sd if wrapping == "raw" else {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 300}
    path = tmp_path / "d1_tiny.pth.tar"
    torch.save(obj, path)
    model = zoo.create_model("zoo_volo_d1_224", checkpoint_path=path, **dict(TINY, num_classes=1000)).eval()
    x = _images()
    with torch.no_grad():
        _assert_close(model(x), reference(x), "logits after checkpoint_path load")


def test_create_model_keeps_a_fine_tuned_head(tmp_path):
    meta, tensors, sd = _fixture()  # 100 classes
    path = tmp_path / "finetuned.pth.tar"
    torch.save(sd, path)
    tiny = {k: meta["kwargs"][k] for k in ("layers", "embed_dims", "num_heads", "stem_hidden_dim")}
    model = zoo.create_model("zoo_volo_d1_224", checkpoint_path=path, **tiny).eval()
    with torch.no_grad():
        _assert_close(model(tensors["input"]), tensors["output"], "fine-tuned logits")


# ----------------------------------------------------------------------------------------------------------------
# timm interface


def test_names_do_not_replace_timm_models():
    names = zoo.list_models("zoo_volo*")
    assert names == sorted(f"zoo_{n}" for n in KEYS)
    for name in KEYS:
        assert timm.models.model_entrypoint(name).__module__ == "timm.models.volo"
        assert timm.models.model_entrypoint(f"zoo_{name}").__module__ == "zoo.backbones.volo"


def test_head_interface():
    model = _tiny()
    x = _images()
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 1 + 16, 32)
        assert model.forward_head(tokens, pre_logits=True).shape == (2, 32)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.aux_head.out_features == 5
        model.reset_classifier(0)
        _assert_close(model(x), model.forward_features(x)[:, 0], "no classifier returns the class token")
        model.reset_classifier(3, global_pool="avg")
        assert model(x).shape == (2, 3)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))
    assert len(groups) == 1 + 5 + 2 + 1 + 1  # stem, network.0..4, post_network.0..1, norm, heads


def test_features_only_levels_and_reductions():
    features = zoo.create_model("zoo_volo_d1_224", features_only=True, **TINY).eval()
    assert features.feature_info.reduction() == [8, 16, 16, 16]
    assert features.feature_info.channels() == [16, 32, 32, 32]
    with torch.no_grad():
        maps = features(_images())
    assert [tuple(m.shape) for m in maps] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 32, 4, 4), (2, 32, 4, 4)]
    first = zoo.create_model("zoo_volo_d1_224", features_only=True, out_indices=(0, 1), **TINY).eval()
    assert len(first.model.network) == 3 and first.model.post_network is None
    with torch.no_grad():
        assert [m.shape[1] for m in first(_images())] == [16, 32]


def test_grad_checkpointing_gives_the_same_gradients():
    model = _tiny()
    x = _images()
    model(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        if expected[n].abs().max() > 0.1:  # skip near-zero gradients (relative check)
            _assert_close(p.grad, expected[n], f"grad {n}", rtol=1e-4)


def test_input_size_must_match_unless_dynamic():
    model = _tiny()
    with pytest.raises(ValueError, match="img_size=\\(64, 64\\)"):
        model(_images(size=96))
    model.dynamic_img_size = True
    with torch.no_grad():
        assert model(_images(size=96)).shape == (2, 10)
        _assert_close(model(_images()), _tiny()(_images()), "dynamic size at the native size")


# ----------------------------------------------------------------------------------------------------------------
# GPU (the lead runs these on the H200)


@pytest.mark.gpu
def test_gpu_triton_backend_matches_reference_in_the_model(monkeypatch, no_tf32):
    meta, tensors, sd = _fixture()
    model = from_official("volo", meta["class"], meta["kwargs"], sd).cuda().eval()
    x = tensors["input"].cuda()
    monkeypatch.setenv("ZOO_OPS_BACKEND", "outlook_attention:reference")
    with torch.no_grad():
        reference = model(x)
    _assert_close(reference.cpu(), tensors["output"], "cuda reference logits", rtol=1e-4)
    monkeypatch.setenv("ZOO_OPS_BACKEND", "outlook_attention:triton")
    with torch.no_grad():
        _assert_close(model(x), reference, "cuda triton logits", rtol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _assert_close(model(x), reference, "cuda triton bf16 logits", rtol=5e-2)
    model.train()
    model(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    monkeypatch.setenv("ZOO_OPS_BACKEND", "outlook_attention:reference")
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        if n in grads and p.grad.abs().max() > 1e-3:  # gradients are small: compare relative to each one's scale
            _assert_close(grads[n], p.grad, f"grad {n}", rtol=1e-3, min_scale=1e-3)


@pytest.mark.gpu
def test_gpu_inductor_compile_matches_eager():
    model = zoo.create_model("zoo_volo_d1_224")
    _randomize(model)
    model = model.cuda().eval()
    x = _images(size=224, batch=4).cuda()
    compiled = torch.compile(model)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(x)
        _assert_close(compiled(x), expected, "inductor bf16 logits", rtol=5e-2)


def test_checkpoint_at_another_resolution_resizes_pos_embed(tmp_path):
    meta, tensors, sd = _fixture()  # a 224 checkpoint
    tiny = {k: meta["kwargs"][k] for k in ("layers", "embed_dims", "num_heads", "stem_hidden_dim")}
    torch.save(sd, tmp_path / "w.pth.tar")
    model = zoo.create_model("zoo_volo_d1_224", checkpoint_path=tmp_path / "w.pth.tar", img_size=288, **tiny)
    expected = torch.nn.functional.interpolate(sd["pos_embed"].permute(0, 3, 1, 2), size=(18, 18), mode="bicubic",
                                               align_corners=False).permute(0, 2, 3, 1)
    assert model.pos_embed.shape == (1, 18, 18, sd["pos_embed"].shape[-1])
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(model.head.weight.detach(), sd["head.weight"], rtol=0, atol=0)
