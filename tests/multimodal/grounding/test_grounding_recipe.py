"""Grounding recipe: loss and metrics by hand, the NIfTI data module, and `zoo train` on the shipped configs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from zoo.multimodal.grounding.data import CT_RANGE, PET_RANGE, petct_input
from zoo.multimodal.grounding.inference import sliding_window_logits
from zoo.multimodal.grounding.metrics import dice_ce_loss, dice_score, f1_from_counts, lesion_detection_counts
from zoo.multimodal.grounding.phantoms import make_petct_phantom

CONFIGS = Path(__file__).resolve().parents[3] / "recipes" / "configs"


def test_dice_ce_loss_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 4, 4, 4, dtype=torch.float64)
    target = (torch.rand(2, 4, 4, 4) > 0.7).long()
    p = logits.softmax(1)
    g = torch.stack([1 - target, target], 1).double()
    dice = 1 - 2 * (p * g).sum((2, 3, 4)) / ((p * p).sum((2, 3, 4)) + (g * g).sum((2, 3, 4)) + 1e-5)
    want = F.cross_entropy(logits, target) + dice.mean()
    torch.testing.assert_close(dice_ce_loss(logits, target), want, rtol=1e-12, atol=1e-12)
    perfect = 40.0 * (2 * g - 1)
    assert dice_ce_loss(perfect, target).item() < 1e-5
    with pytest.raises(ValueError, match="target must be"):
        dice_ce_loss(logits, target[:, :2])


def test_dice_score_and_lesion_f1():
    a = torch.zeros(2, 8, 8, 8, dtype=torch.bool)
    b = torch.zeros_like(a)
    a[0, :4], b[0, 2:6] = True, True  # 256 voxels each, 128 shared
    assert dice_score(a, b).tolist() == [0.5, 1.0]  # second pair: both empty
    gt = np.zeros((20, 20, 20), bool)
    gt[2:5, 2:5, 2:5] = True  # found
    gt[10:12, 10:12, 10:12] = True  # missed
    pred = np.zeros_like(gt)
    pred[4:7, 4:7, 4:7] = True  # overlaps the first lesion
    pred[15:18, 15:18, 15:18] = True  # 27 voxels, no lesion: false positive
    pred[0, 19, 0] = True  # 1 voxel: too small to count
    assert lesion_detection_counts(pred, gt) == (1, 1, 1)
    diagonal = np.zeros_like(gt)
    diagonal[5, 5, 5] = diagonal[6, 6, 6] = True
    assert lesion_detection_counts(diagonal, diagonal) == (1, 0, 0)  # 26-connected: one lesion
    assert f1_from_counts(1, 1, 1) == 0.5 and f1_from_counts(0, 0, 0) == 1.0


def test_lesion_counts_by_suvmax_match():
    """The paper's rule: a predicted component is the lesion when its SUVmax agrees within 0.1, overlap or not."""
    suv = np.ones((20, 20, 20))
    gt = np.zeros(suv.shape, bool)
    gt[2:5, 2:5, 2:5] = True
    suv[3, 3, 3] = 6.0
    pred = np.zeros_like(gt)
    pred[3:6, 3:6, 3:6] = True  # overlaps and holds the 6.0 voxel: found
    pred[12:15, 12:15, 12:15] = True  # SUVmax 1.0: a false positive under both rules
    assert lesion_detection_counts(pred, gt, match="suvmax", suv=suv) == (1, 1, 0)
    shifted = np.zeros_like(gt)
    shifted[4:7, 4:7, 4:7] = True  # overlaps the lesion but misses its hottest voxel
    assert lesion_detection_counts(shifted, gt) == (1, 0, 0)
    assert lesion_detection_counts(shifted, gt, match="suvmax", suv=suv) == (0, 1, 1)
    with pytest.raises(ValueError, match="needs suv"):
        lesion_detection_counts(pred, gt, match="suvmax")


def test_input_normalisation():
    suv = np.array([[[-1.0, 0.0, 5.0, 12.0]]])
    hu = np.array([[[-1000.0, -150.0, 50.0, 400.0]]])
    image = petct_input(suv, hu)
    assert PET_RANGE == (0.0, 10.0) and CT_RANGE == (-150.0, 250.0)
    np.testing.assert_allclose(image[0].ravel(), [0.0, 0.0, 0.5, 1.0])  # CT first
    np.testing.assert_allclose(image[1].ravel(), [0.0, 0.0, 0.5, 1.0])
    assert petct_input(suv).shape == (1, 1, 1, 4)


def test_sliding_window_average_matches_a_whole_volume_pass():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 3, 1)  # pointwise: every window agrees with the whole-volume result
    image = torch.randn(2, 2, 32, 64, 96)
    with torch.no_grad():
        want = conv(image)
        got = sliding_window_logits(conv, image, (32, 32, 64), overlap=0.25)
        clipped = sliding_window_logits(conv, image, (64, 128, 128))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(clipped, want, rtol=1e-6, atol=1e-6)
    windows = []
    sliding_window_logits(lambda w: windows.append(w.shape[2:]) or torch.zeros(2, 1, *w.shape[2:]), image, (32, 32, 64))
    assert len(windows) == 1 * 3 * 2  # starts: D [0], H [0, 24, 32], W [0, 32]


def _write_nifti_cases(root: Path) -> None:
    import nibabel as nib

    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    entries = []
    for seed in range(2):
        phantom = make_petct_phantom(shape=(32, 32, 40), n_lesions=1, seed=seed)
        names = {kind: f"case{seed}_{kind}.nii.gz" for kind in ("pet", "ct", "label")}
        for kind, volume in (("pet", phantom.suv), ("ct", phantom.ct), ("label", phantom.masks[0].astype(np.uint8))):
            nib.save(nib.Nifti1Image(volume, affine), str(root / names[kind]))
        finding = phantom.findings[0]
        entries.append({**names, "sentence": finding.sentence, "slice_number": finding.slice_number,
                        "suv_max": finding.suv_max})
    (root / "train.json").write_text(json.dumps(entries))
    (root / "val.json").write_text(json.dumps(entries[:1]))


def test_nifti_data_module(tmp_path):
    pytest.importorskip("nibabel")
    from zoo.recipes.grounding import NiftiGroundingDataModule

    _write_nifti_cases(tmp_path)
    dm = NiftiGroundingDataModule(str(tmp_path), roi_size=(32, 32, 32), positive_fraction=1.0, keep_suv=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (1, 2, 32, 32, 32) and batch["label"].shape == (1, 32, 32, 32)
    assert batch["label"].sum() > 0  # positive crops hold the lesion
    assert "slice" in batch["text"][0] and not any(ch.isdigit() for ch in batch["text"][0])
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (1, 2, 32, 32, 64)  # depth 40 padded to 64
    torch.testing.assert_close(val["suv"][..., :40].clamp(0, 10) / 10, val["image"][:, 1, ..., :40])
    (tmp_path / "bad.json").write_text(json.dumps([{"pet": "x.nii.gz"}]))
    with pytest.raises(ValueError, match="lacks"):
        NiftiGroundingDataModule(str(tmp_path), train_index="bad.json").setup("fit")


def test_zoo_train_fit_on_the_phantom_config(tmp_path):
    from zoo.recipes.grounding import GroundingModule, PhantomGroundingDataModule

    from zoo.train import build_cli

    cli = build_cli(["fit", "--config", str(CONFIGS / "grounding.yaml"), "--trainer.accelerator=cpu",
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=1",
                     "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                     "--trainer.enable_progress_bar=false", "--data.init_args.n_train=2", "--data.init_args.n_val=1",
                     "--data.init_args.batch_size=1", "--model.init_args.f1_match=suvmax",
                     "--data.init_args.keep_suv=true", "--model.init_args.val_roi_size=[32, 32, 64]"])
    assert isinstance(cli.model, GroundingModule) and isinstance(cli.datamodule, PhantomGroundingDataModule)
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert {"train_loss_epoch", "val_loss", "val_dice", "val_f1"} <= set(metrics)
    assert 0.0 <= float(metrics["val_dice"]) <= 1.0 and float(metrics["val_loss"]) > 0.0
    assert not any(p.requires_grad for p in cli.model.text_encoder.parameters())
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert saved and not any(k.startswith("text_encoder.") for k in saved)  # the frozen encoder is rebuilt
    restored = GroundingModule.load_from_checkpoint(last)
    for key, value in cli.model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, rtol=0, atol=0)


def test_real_data_config_instantiates(tmp_path):
    from zoo.recipes.grounding import GroundingModule, NiftiGroundingDataModule

    from zoo.train import build_cli

    cli = build_cli(["--config", str(CONFIGS / "grounding_nifti.yaml"), "--trainer.accelerator=cpu",
                     "--trainer.precision=32-true", f"--trainer.default_root_dir={tmp_path}",
                     "--model.init_args.text_encoder=tiny", "--model.init_args.text_max_length=16",
                     "--model.init_args.feature_size=4"], run=False)
    assert list(cli.model.hparams.val_roi_size) == [128, 128, 128]
    config = yaml.safe_load((CONFIGS / "grounding_nifti.yaml").read_text())
    assert isinstance(cli.model, GroundingModule) and isinstance(cli.datamodule, NiftiGroundingDataModule)
    assert list(cli.datamodule.hparams.roi_size) == config["data"]["init_args"]["roi_size"] == [128, 128, 128]
    assert config["model"]["init_args"]["feature_size"] == 48 and config["model"]["init_args"]["text_max_length"] == 200
