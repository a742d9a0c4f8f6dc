"""Data modules: digits shapes and deterministic stratified split; ImageFolder with timm transforms."""
import numpy as np
import pytest
import torch
from PIL import Image
from zoo.recipes.data import DigitsDataModule, ImageFolderDataModule, stratified_split


def test_stratified_split_is_deterministic_disjoint_and_balanced():
    labels = np.repeat(np.arange(5), [10, 20, 30, 40, 50])
    train, val = stratified_split(labels, 0.2, seed=3)
    train2, val2 = stratified_split(labels, 0.2, seed=3)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    assert not set(train) & set(val) and len(train) + len(val) == len(labels)
    np.testing.assert_array_equal(np.bincount(labels[val]), [2, 4, 6, 8, 10])
    _, val3 = stratified_split(labels, 0.2, seed=4)
    assert not np.array_equal(val, val3)
    with pytest.raises(ValueError, match="val_fraction=1.0"):
        stratified_split(labels, 1.0, seed=0)


def test_digits_datamodule_shapes_split_and_normalization():
    dm = DigitsDataModule(img_size=24, in_chans=3, batch_size=16, max_shift=0)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1797
    assert len(dm.val_set) == 359  # per-class round(0.2 * n): 36+36+35+37+36+36+36+36+35+36
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 24, 24) and x.dtype == torch.float32 and y.shape == (16,)
    torch.testing.assert_close(x[:, 0], x[:, 2])  # gray repeated over the channels
    # training images are standardized with their own statistics
    all_train = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert abs(float(all_train.mean())) < 1e-4 and abs(float(all_train.std()) - 1.0) < 1e-3
    assert len(dm.train_dataloader()) == len(dm.train_set) // 16  # drop_last on training only
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 359

    repeated = DigitsDataModule(img_size=24, batch_size=16, max_shift=0, train_repeats=3)
    repeated.setup()
    assert len(repeated.train_set) == 3 * len(dm.train_set) and len(repeated.val_set) == 359
    torch.testing.assert_close(repeated.train_set[len(dm.train_set) + 7][0], dm.train_set[7][0])

    other = DigitsDataModule(img_size=24, batch_size=16, max_shift=0)
    other.setup("fit")
    torch.testing.assert_close(other.val_set.labels, dm.val_set.labels)
    torch.testing.assert_close(other.val_set.images, dm.val_set.images)


def _translate(img, dy, dx):
    """Reference translation with zero fill: out[y, x] = img[y - dy, x - dx]."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_digits_shift_augmentation_is_a_zero_filled_translation():
    dm = DigitsDataModule(img_size=32, max_shift=3)
    dm.setup()
    raw = dm.train_set.images[5]
    torch.manual_seed(1)
    seen = set()
    for _ in range(12):
        img = dm.train_set[5][0][:1] * dm.train_set.std + dm.train_set.mean  # undo normalization
        match = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                 if torch.allclose(img, _translate(raw, dy, dx), atol=1e-5)]
        assert match, "augmented image is not a translation of the original by <= 3 pixels"
        seen.add(match[0])
    assert len(seen) > 3  # the shift is random
    assert torch.equal(dm.val_set[5][0], dm.val_set[5][0])  # no augmentation on validation


def _write_folder(root, classes, per_class, size=(40, 30)):
    rng = np.random.default_rng(0)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_imagefolder_datamodule_uses_model_config_and_overrides(tmp_path):
    _write_folder(tmp_path / "train", ["cat", "ant", "bee"], 4)
    _write_folder(tmp_path / "val", ["cat", "ant", "bee"], 2)
    dm = ImageFolderDataModule(str(tmp_path), model_name="biformer_tiny", input_size=48, batch_size=4,
                               num_workers=0, auto_augment=None, re_prob=0.0)
    assert dm.classes == ["ant", "bee", "cat"] and dm.num_classes == 3
    cfg = dm.data_config()
    assert cfg["input_size"] == (3, 48, 48)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875  # biformer_tiny's pretrained cfg
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 48, 48) and set(y.tolist()) <= {0, 1, 2}
    xv, yv = next(iter(dm.val_dataloader()))
    xv2, _ = next(iter(dm.val_dataloader()))
    assert xv.shape == (4, 3, 48, 48)
    torch.testing.assert_close(xv, xv2)  # eval transform is deterministic
    assert yv.tolist() == [0, 0, 1, 1]
    # ImageNet normalization from the cfg: a mid-gray image maps near (0.5 - mean) / std
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    gray = Image.fromarray(np.full((30, 40, 3), 128, np.uint8))
    out = dm.transform(train=False)(gray)
    torch.testing.assert_close(out, ((128 / 255 - mean) / std).expand(3, 48, 48), atol=1e-5, rtol=0)


def test_imagefolder_datamodule_errors_name_the_problem(tmp_path):
    _write_folder(tmp_path / "train", ["a", "b"], 1)
    _write_folder(tmp_path / "val", ["a", "c"], 1)
    dm = ImageFolderDataModule(str(tmp_path), input_size=32, num_workers=0)
    with pytest.raises(ValueError, match="differ from the training"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="split='test'"):
        ImageFolderDataModule(str(tmp_path), val_split="test", input_size=32).setup("validate")
