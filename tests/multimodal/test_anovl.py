"""AnoVL on stock open_clip: parity with the official code, prompts, augmentations, TTA, pipeline, CLI, harness."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from zoo.multimodal import anovl as A  # noqa: E402
from zoo.multimodal import anovl_cli  # noqa: E402

from pathlib import Path  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity"
CASE = FIXTURES / "anovl" / "tiny_vit_tfa_tta"
TINY_CLIP_NAME = "zoo-test-tiny-anovl"  # registered by conftest.tiny_clip_config


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def case():
    from safetensors.torch import load_file

    meta = json.loads(CASE.with_suffix(".json").read_text())
    tensors = load_file(str(CASE.with_suffix(".safetensors")))
    kw = meta["kwargs"]
    model = open_clip.model.CLIP(kw["embed_dim"], kw["vision_cfg"], kw["text_cfg"])
    # the official checkpoint keys are the stock open_clip ones: they load strictly into the stock model
    model.load_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}, strict=True)
    return meta, tensors, model.eval()


# --- parity with the official dual path, map and TTA ------------------------------------------------------------------

def test_parity_layer_tokens_image_features_and_score(case):
    meta, t, model = case
    tol = meta["suggested_tolerance"]["feat.*"]
    with torch.no_grad():
        out = A.dual_path_forward(model.visual, t["input"], meta["features_list"])
    assert len(out.layer_tokens) == 8
    for i, tokens in enumerate(out.layer_tokens):
        _close(tokens, t[f"feat.{i}"], tol["rtol"], tol["atol"])
    _close(out.image_features, t["image_features"], tol["rtol"], tol["atol"])
    score = A.cls_anomaly_score(out.image_features[:, 0], t["text_features"])
    _close(score, t["image_score"], 1e-5, 1e-6)


def test_parity_training_free_map(case):
    meta, t, model = case
    tol = meta["suggested_tolerance"]["output"]
    with torch.no_grad():
        out = A.dual_path_forward(model.visual, t["input"], meta["features_list"])
        tokens = A.patch_tokens_for_map(model.visual, out.vv_tokens)
        amap = A.anomaly_map_from_tokens(tokens, t["text_features"], meta["input_shape"][-1])
    _close(tokens.flatten(1, 2), t["patch_tokens_proj_layer12_vv"], tol["rtol"], tol["atol"])
    _close(amap, t["output"], tol["rtol"], tol["atol"])
    # the official map index 6 (features_list 3 6 9 12) is the V-V path of the last listed block
    assert torch.equal(out.layer_tokens[meta["map_layer_index"]], out.vv_tokens)


def test_parity_test_time_adaptation(case):
    meta, t, model = case
    tol = meta["suggested_tolerance"]["output_tta"]
    with torch.no_grad():
        out = A.dual_path_forward(model.visual, t["input"], meta["features_list"])
        tokens = A.patch_tokens_for_map(model.visual, out.vv_tokens)
    adapter = A.TextAdapter(t["text_features_list"])
    adapter.load_state_dict({"ad.weight": t["tta.adapter_init.ad.weight"], "ad.bias": t["tta.adapter_init.ad.bias"]})
    noises = [t[f"tta.noise.{i}"] for i in range(5)]
    adapted = A.test_time_adapt(tokens, t["text_features"], adapter, steps=5, lr=1e-3, noises=noises)
    amap = A.anomaly_map_from_tokens(adapted, t["text_features"], meta["input_shape"][-1])
    _close(amap, t["output_tta"], tol["rtol"], tol["atol"])
    assert (amap - t["output"]).abs().max() > 1e-3  # adaptation changed the map


def test_per_layer_mode_original_path_is_the_stock_model(case):
    meta, t, model = case
    hooked = {}
    handles = [blk.register_forward_hook(lambda m, i, o, k=k: hooked.__setitem__(k, o))
               for k, blk in enumerate(model.visual.transformer.resblocks, start=1)]
    try:
        with torch.no_grad():
            model.visual(t["input"])
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        out = A.dual_path_forward(model.visual, t["input"], meta["features_list"], layer_tokens="per_layer")
    for k, layer in enumerate(meta["features_list"]):
        _close(out.layer_tokens[2 * k + 1], hooked[layer], 1e-5, 1e-6)
    # the maps and image features do not depend on the per-layer mode
    _close(out.image_features, t["image_features"], 1e-4, 1e-5)
    # the V-V tokens of the last block are the final ones, only the CLS differs (official: the original CLS)
    _close(out.layer_tokens[6][:, 1:], t["feat.6"][:, 1:], 1e-4, 1e-5)


def test_stock_keys_match_the_official_checkpoints():
    keys = json.loads((FIXTURES / "anovl" / "keys.json").read_text())
    for name, entry in keys.items():
        with torch.device("meta"):
            model = open_clip.create_model(name, pretrained=None, device="meta")
        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert shapes == entry["state_dict"], name
        assert sum(p.numel() for p in model.parameters()) == entry["num_params"]


def test_dual_path_rejects_bad_arguments(case):
    _, t, model = case
    with pytest.raises(ValueError, match="features_list"):
        A.dual_path_forward(model.visual, t["input"], (3, 13))
    with pytest.raises(ValueError, match="layer_tokens"):
        A.dual_path_forward(model.visual, t["input"], layer_tokens="paper")
    with pytest.raises(TypeError, match="VisionTransformer"):
        A.dual_path_forward(torch.nn.Linear(2, 2), t["input"])


def test_fewer_vv_blocks_start_the_dual_path_later(case):
    _, t, model = case
    with torch.no_grad():
        full = A.dual_path_forward(model.visual, t["input"], (12,), num_vv_blocks=12)
        late = A.dual_path_forward(model.visual, t["input"], (12,), num_vv_blocks=1)
    # original path identical, V-V path = final tokens of block 11 + one V-V residual
    _close(late.original_tokens, full.original_tokens, 1e-5, 1e-6)
    assert (late.vv_tokens[:, 1:] - full.vv_tokens[:, 1:]).abs().max() > 1e-3


# --- prompts ----------------------------------------------------------------------------------------------------------

def test_state_prompts_follow_the_official_lists():
    normal, anomalous = A.state_prompts("bottle")
    assert len(normal) == len(anomalous) == 66 * 7
    # template-major order: every state of one template, then the next template
    assert normal[:3] == ["a cropped industrial photo of the normal bottle",
                          "a cropped industrial photo of the flawless bottle",
                          "a cropped industrial photo of the perfect bottle"]
    assert normal[6] == "a cropped industrial photo of the bottle without damage"
    assert anomalous[0] == "a cropped industrial photo of the damaged bottle"
    assert anomalous[-1] == "a manufacturing image of a bottle with damage for anomaly detection"
    assert "an industrial image of the small abnormal bottle" in anomalous
    assert len(set(A.prompt_templates(texture=False))) == 66


def test_texture_classes_and_renames():
    normal, _ = A.state_prompts("carpet")
    assert "a surface picture of a normal carpet" in normal
    assert "a textural photo of the large flawless carpet" in normal
    assert not any("manufacturing" in s for s in normal)
    normal_m, _ = A.state_prompts("macaroni2")
    assert normal_m[0] == "a cropped industrial photo of the normal macaroni"
    forced, _ = A.state_prompts("brick", texture=True)
    assert "a surface picture of a normal brick" in forced
    with pytest.raises(ValueError, match="object_name"):
        A.state_prompts("  ")


# --- maps, scores, augmentations, adaptation --------------------------------------------------------------------------

def test_anomaly_probabilities_have_no_logit_scale():
    tf = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tokens = torch.tensor([[3.0, 4.0]])  # normalised (0.6, 0.8)
    p = A.anomaly_probabilities(tokens, tf)
    expected = torch.softmax(torch.tensor([0.6, 0.8]), dim=0)
    _close(p[0], expected, 1e-6, 1e-7)


def test_smoothing_is_replicate_padded_mean_and_corner_aligned_upsampling():
    grid = torch.zeros(1, 1, 3, 3)
    grid[0, 0, 0, 0] = 9.0
    out = A.smooth_and_upsample(grid, 5)
    # corner after replicate pad: its 3x3 window holds four 9s -> 4; align_corners keeps the corner value
    assert out[0, 0, 0, 0].item() == pytest.approx(4.0)
    assert out[0, 0, -1, -1].item() == pytest.approx(0.0)
    assert out.shape == (1, 1, 5, 5)


def test_augmentations_are_the_22_official_copies():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    copies = A.augment_for_image_score(x)
    assert copies.shape == (22, 2, 3, 8, 8)
    assert torch.equal(copies[0], x)
    assert torch.equal(copies[17], x.flip(-1))
    grey = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    _close(copies[18], grey[:, None].expand_as(x), 1e-6, 1e-6)
    for k in (1, 2, 3):
        assert torch.equal(copies[18 + k], torch.rot90(x, k, dims=(-2, -1)))
    # a translation by 2/7 of the half-width (align_corners grid on 8 px) shifts by exactly one pixel
    shifted = A._affine(x, [[1.0, 0.0, 2.0 / 7.0], [0.0, 1.0, 0.0]])
    _close(shifted[..., :-1], x[..., 1:], 1e-5, 1e-5)


def test_tta_loss_by_hand():
    clean = torch.tensor([0.8, 0.2]).expand(1, 1, 1, 2)
    noisy = torch.tensor([0.4, 0.6]).expand(1, 1, 1, 2)
    loss = A.tta_loss(torch.cat([clean, noisy]))
    entropy = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert loss.item() == pytest.approx(entropy + 0.5 * (-math.log(0.6) - math.log(0.8)), rel=1e-6)


def test_adapter_reset_draws_like_linear_reset_parameters():
    adapter = A.TextAdapter(torch.nn.functional.normalize(torch.randn(5, 16, 2), dim=1))
    assert adapter.ad.weight.shape == (10, 16)
    A.reset_adapter(adapter, torch.Generator().manual_seed(3))
    w1 = adapter.ad.weight.clone()
    A.reset_adapter(adapter, torch.Generator().manual_seed(3))
    assert torch.equal(adapter.ad.weight, w1)
    assert adapter.ad.weight.abs().max() <= 0.25 and adapter.ad.bias.abs().max() <= 0.25  # 1/sqrt(16)
    x = torch.randn(3, 16)
    expected = 0.5 * x + 0.5 * torch.tanh(adapter.ad(x / x.norm(dim=-1, keepdim=True))) @ adapter.prompt_embeddings
    _close(adapter(x), expected, 1e-6, 1e-6)


# --- pipeline, CLI, harness -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tiny_clip_config, tiny_clip_checkpoint):
    p = A.AnoVLPipeline.from_pretrained(TINY_CLIP_NAME, str(tiny_clip_checkpoint))
    p.set_progress_bar_config(disable=True)
    return p


def test_text_features_are_normalised_means(pipe):
    tf, tf_list = pipe.state_text_features("bottle")
    assert tf.shape == (16, 2) and tf_list.shape == (462, 16, 2)
    normal, _ = A.state_prompts("bottle")
    with torch.no_grad():
        emb = pipe.model.encode_text(pipe.tokenizer(normal[:4]))
    _close(tf_list[:4, :, 0], emb / emb.norm(dim=-1, keepdim=True), 1e-5, 1e-6)
    _close(tf.norm(dim=0), torch.ones(2), 1e-6, 1e-6)


def test_pipeline_matches_the_functional_path(pipe):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 40, 48)
    out = pipe(list(images), "bottle", augment_score=False)
    assert out.anomaly_maps.shape == (2, 1, 32, 32) and out.image_scores.shape == (2,)
    x = pipe.preprocess(list(images))
    tf, _ = pipe.state_text_features("bottle")
    with torch.no_grad():
        ref = A.dual_path_forward(pipe.model.visual, x)
        amap = A.anomaly_map_from_tokens(A.patch_tokens_for_map(pipe.model.visual, ref.vv_tokens), tf, 32)
    _close(out.anomaly_maps, amap, 1e-5, 1e-6)
    _close(out.image_scores, A.cls_anomaly_score(ref.image_features[:, 0], tf), 1e-5, 1e-6)
    # the augmented score averages the 22 copies
    aug = pipe(pixel_values=x[:1], object_name="bottle")
    with torch.no_grad():
        copies = A.augment_for_image_score(x[:1])[:, 0]
        manual = A.cls_anomaly_score(A.dual_path_forward(pipe.model.visual, copies).image_features[:, 0], tf).mean()
    assert aug.image_scores[0].item() == pytest.approx(manual.item(), rel=1e-5)


def test_pipeline_tta_state_follows_the_official_loop(pipe):
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((36, 30, 3)) * 255).astype(np.uint8))
    kw = dict(augment_score=False, tta=True)
    pipe.reset_tta()
    fresh = [pipe(image, "screw", generator=torch.Generator().manual_seed(0), tta_fresh_optimizer=True, **kw)
             for _ in range(2)]
    assert torch.equal(fresh[0].anomaly_maps, fresh[1].anomaly_maps)
    plain = pipe(image, "screw", augment_score=False)
    assert (fresh[0].anomaly_maps - plain.anomaly_maps).abs().max() > 1e-4
    # official: one AdamW per object whose moments carry over between images (weights are reset)
    pipe.reset_tta()
    first = pipe(image, "screw", generator=torch.Generator().manual_seed(0), **kw)
    second = pipe(image, "screw", generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(first.anomaly_maps, fresh[0].anomaly_maps)
    assert (second.anomaly_maps - first.anomaly_maps).abs().max() > 1e-7
    with pytest.raises(ValueError, match="object_name"):
        pipe(image, ["a", "b"])


def test_from_pretrained_names_unknown_models():
    with pytest.raises(ValueError, match="not an open_clip model"):
        A.AnoVLPipeline.from_pretrained("no-such-model-xyz")


def test_cli_writes_overlay_and_prints_score(tiny_clip_config, tiny_clip_checkpoint, tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "part.png"
    Image.fromarray((np.random.default_rng(1).random((30, 44, 3)) * 255).astype(np.uint8)).save(src)
    out = tmp_path / "map.png"
    rc = anovl_cli.main([str(src), "--object", "bottle", "--out", str(out), "--model", TINY_CLIP_NAME,
                         "--pretrained", str(tiny_clip_checkpoint), "--no-augment-score"])
    assert rc == 0
    printed = capsys.readouterr().out
    score = float(printed.split("image score:")[1].split()[0])
    assert 0.0 < score < 1.0
    with Image.open(out) as im:
        assert im.size == (44, 30) and im.mode == "RGB"
    with pytest.raises(ValueError, match="--object"):
        anovl_cli.main([str(src), "--out", str(out), "--model", TINY_CLIP_NAME, "--pretrained", "none"])


def test_synthetic_set_is_deterministic_with_pasted_defects():
    pytest.importorskip("skimage")
    data = A.make_synthetic_defect_set(num_per_texture=2, size=48, seed=3)
    again = A.make_synthetic_defect_set(num_per_texture=2, size=48, seed=3)
    assert torch.equal(data.images, again.images) and torch.equal(data.masks, again.masks)
    assert data.images.shape == (6, 3, 48, 48) and data.names == ["brick"] * 2 + ["grass"] * 2 + ["gravel"] * 2
    assert data.labels.tolist() == [0, 1] * 3
    frac = data.masks.float().mean(dim=(1, 2))
    assert torch.all(frac[data.labels == 0] == 0)
    assert torch.all((frac[data.labels == 1] > 0.005) & (frac[data.labels == 1] < 0.15))
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0


def test_cli_synthetic_eval_reports_metrics(tiny_clip_config, tiny_clip_checkpoint, tmp_path, capsys):
    pytest.importorskip("skimage")
    report = tmp_path / "eval.json"
    rc = anovl_cli.main(["--synthetic-eval", "--per-texture", "2", "--model", TINY_CLIP_NAME, "--pretrained",
                         str(tiny_clip_checkpoint), "--no-augment-score", "--json", str(report)])
    assert rc == 0
    result = json.loads(report.read_text())
    assert result["num_images"] == 6
    for key in ("pixel_auroc", "aupro", "image_auroc"):
        assert 0.0 <= result[key] <= 1.0
    assert "pixel_auroc" in capsys.readouterr().out
