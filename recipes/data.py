"""Image classification data modules: an ImageFolder tree, and scikit-learn's digits (shipped offline).

``ImageFolderDataModule`` resolves its transforms the timm way: the model's ``pretrained_cfg`` (input size, mean,
std, crop, interpolation) through ``timm.data.resolve_data_config`` and ``timm.data.create_transform``. When the
module runs under a Trainer it reads the config from the LightningModule's ``model`` attribute, so the data always
matches the backbone being trained; outside a Trainer, ``model_name`` names the model whose config to use.

``DigitsDataModule`` needs no download: scikit-learn ships the 1,797 8x8 handwritten digits. They are upsampled to
``img_size`` once, split per class with a fixed seed (the same split on every machine and every rank), and
augmented with small random shifts.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

__all__ = ["DigitsDataModule", "ImageFolderDataModule", "digits_tensors", "resolve_data_config", "stratified_split"]


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: (train indices, val indices), both sorted.

    Each class gives ``round(n_class * val_fraction)`` samples to validation, so class balance is kept.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = round(len(idx) * val_fraction)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def digits_tensors(img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (images ``[N, 1, img_size, img_size]`` in [0, 1], labels ``[N]``)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
    if img_size != 8:
        # bilinear keeps the strokes smooth; align_corners=False preserves the digit's position in the frame
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return x.contiguous(), torch.from_numpy(digits.target).long()


class _TensorImages(Dataset):
    """Normalized image tensors with an optional random-shift augmentation (zero-padded translation).

    Images are stored with one channel and repeated to ``in_chans`` per sample (a 224-pixel copy of the digits in
    three channels would take a gigabyte); ``repeats`` makes one epoch several passes over the images.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float, in_chans: int = 3,
                 max_shift: int = 0, repeats: int = 1):
        self.images, self.labels = images, labels
        self.mean, self.std, self.in_chans = mean, std, in_chans
        self.max_shift, self.repeats = max_shift, repeats

    def __len__(self) -> int:
        return len(self.labels) * self.repeats

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = i % len(self.labels)
        x = self.images[i]
        if self.max_shift > 0:
            x = _random_shift(x, self.max_shift)
        x = (x - self.mean) / self.std
        return x.expand(self.in_chans, -1, -1), self.labels[i]


def _random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate a CHW image by up to ``max_shift`` pixels in each direction, filling with zeros (background)."""
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,)).tolist()
    h, w = x.shape[-2:]
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    top, left = max_shift - dy, max_shift - dx
    return padded[..., top:top + h, left:left + w]


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's 8x8 digits (10 classes, 1,797 images) upsampled to ``img_size``; no download needed.

    Args:
        img_size: side of the (square) images the model sees.
        in_chans: channels (the gray image is repeated), 3 for models built for RGB.
        val_fraction: share of each class held out for validation (and test).
        split_seed: seed of the split; the split does not depend on ``seed_everything``.
        batch_size: per-device batch size.
        num_workers: DataLoader workers (0 is fastest for this in-memory data).
        max_shift: training augmentation, random translation in pixels at ``img_size`` (0 disables it).
        train_repeats: passes over the training split per epoch (longer epochs for throughput measurements).
    """

    num_classes = 10

    def __init__(self, img_size: int = 32, in_chans: int = 3, val_fraction: float = 0.2, split_seed: int = 0,
                 batch_size: int = 64, num_workers: int = 0, max_shift: int = 2,
                 train_repeats: int = 1) -> None:
        super().__init__()
        if img_size < 8:
            raise ValueError(f"img_size={img_size} must be >= 8 (the digits are 8x8)")
        if in_chans < 1:
            raise ValueError(f"in_chans={in_chans} must be >= 1")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if train_repeats < 1:
            raise ValueError(f"train_repeats={train_repeats} must be >= 1")
        self.save_hyperparameters()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        images, labels = digits_tensors(hp.img_size)
        train_idx, val_idx = stratified_split(labels.numpy(), hp.val_fraction, hp.split_seed)
        train_images = images[train_idx]
        # normalize with the training split's statistics only (nothing about validation leaks into training)
        mean, std = float(train_images.mean()), float(train_images.std())
        self.train_set = _TensorImages(train_images, labels[train_idx], mean, std, hp.in_chans, hp.max_shift,
                                       hp.train_repeats)
        self.val_set = _TensorImages(images[val_idx], labels[val_idx], mean, std, hp.in_chans)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            self.setup()
            dataset = self.train_set if train else self.val_set
        # batch_size by keyword: Lightning re-creates loaders (to add a DistributedSampler) from keyword arguments
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=train, drop_last=train,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)


def resolve_data_config(model: torch.nn.Module | None = None, model_name: str | None = None,
                        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode) of a model or model name.

    ``overrides`` (non-None values only) win over the model's ``pretrained_cfg``.
    """
    import timm.data

    args = {k: v for k, v in (overrides or {}).items() if v is not None}
    if model is not None:
        return timm.data.resolve_data_config(args, model=model)
    if model_name is not None:
        from timm.models import get_pretrained_cfg, split_model_name_tag

        import zoo  # noqa: F401  (registers the zoo models, so their pretrained cfgs resolve)
        from zoo import registry

        arch, tag = split_model_name_tag(registry.resolve_model_name(model_name))
        cfg = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch, allow_unregistered=True)
        return timm.data.resolve_data_config(args, pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    return timm.data.resolve_data_config(args, pretrained_cfg={})


def _input_size_arg(input_size: int | list[int] | tuple[int, ...] | None, in_chans: int = 3) -> tuple | None:
    if input_size is None:
        return None
    if isinstance(input_size, int):
        return (in_chans, input_size, input_size)
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        return (in_chans, *size)
    if len(size) == 3:
        return size
    raise ValueError(f"input_size={input_size!r}; accepted: an int, (H, W) or (C, H, W)")


class ImageFolderDataModule(L.LightningDataModule):
    """An ImageFolder tree (``root/<split>/<class>/<image>``) with timm transforms from the model's config.

    Args:
        root: dataset folder holding the split folders.
        train_split: training folder under ``root``.
        val_split: validation folder under ``root`` (also used for test/predict unless ``test_split`` is set).
        test_split: test folder under ``root``; ``None`` reuses ``val_split``.
        model_name: model whose ``pretrained_cfg`` gives the data config when no Trainer is attached.
        input_size: override the model's input size (int, (H, W) or (C, H, W)).
        crop_pct: override the eval center-crop ratio.
        mean: override the normalization mean.
        std: override the normalization std.
        interpolation: override the resize interpolation (``bicubic``, ``bilinear``).
        batch_size: per-device batch size.
        num_workers: DataLoader worker processes.
        auto_augment: timm auto-augment policy (``rand-m9-mstd0.5-inc1``); ``None`` disables it.
        scale: RandomResizedCrop area range.
        hflip: horizontal flip probability.
        color_jitter: color jitter strength (ignored when auto_augment is set, as in timm).
        re_prob: random-erasing probability.
        pin_memory: pin host memory for faster GPU transfer.
    """

    def __init__(self, root: str, train_split: str = "train", val_split: str = "val", test_split: str | None = None,
                 model_name: str | None = None, input_size: int | list[int] | None = None,
                 crop_pct: float | None = None, mean: list[float] | None = None, std: list[float] | None = None,
                 interpolation: str | None = None, batch_size: int = 64, num_workers: int = 4,
                 auto_augment: str | None = "rand-m9-mstd0.5-inc1", scale: tuple[float, float] = (0.08, 1.0),
                 hflip: float = 0.5, color_jitter: float = 0.4, re_prob: float = 0.25,
                 pin_memory: bool = True) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.save_hyperparameters()
        self.datasets: dict[str, Dataset] = {}
        self._data_config: dict[str, Any] | None = None

    def split_dir(self, split: str) -> Path:
        """Folder of a split; raises FileNotFoundError naming the argument and path when it is missing."""
        path = Path(self.hparams.root).expanduser() / split
        if not path.is_dir():
            raise FileNotFoundError(f"ImageFolderDataModule: {str(path)!r} (root={self.hparams.root!r}, "
                                    f"split={split!r}) is not a folder; expected root/<split>/<class>/<image>")
        return path

    @property
    def classes(self) -> list[str]:
        """Class names: the sorted sub-folders of the training split (ImageFolder's order)."""
        path = self.split_dir(self.hparams.train_split)
        return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))

    @property
    def num_classes(self) -> int:
        """Number of classes in the training split."""
        return len(self.classes)

    def data_config(self) -> dict[str, Any]:
        """The resolved timm data config (from the trained model when attached to a Trainer)."""
        if self._data_config is None:
            hp = self.hparams
            model = None
            if self.trainer is not None and getattr(self.trainer, "lightning_module", None) is not None:
                model = getattr(self.trainer.lightning_module, "model", None)
            if model is None and hp.model_name is None and hp.input_size is None:
                raise ValueError("ImageFolderDataModule needs model_name or input_size when not run by a Trainer "
                                 "whose LightningModule has a `model` attribute")
            overrides = dict(input_size=_input_size_arg(hp.input_size), crop_pct=hp.crop_pct,
                             mean=tuple(hp.mean) if hp.mean else None, std=tuple(hp.std) if hp.std else None,
                             interpolation=hp.interpolation)
            self._data_config = resolve_data_config(model, hp.model_name, overrides)
        return self._data_config

    def transform(self, train: bool) -> Callable:
        """timm's train (random-resized crop + augmentation) or eval (resize + center crop) transform."""
        from timm.data import create_transform

        hp = self.hparams
        cfg = self.data_config()
        if not train:
            return create_transform(**cfg, is_training=False)
        return create_transform(
            input_size=cfg["input_size"], is_training=True, scale=tuple(hp.scale), hflip=hp.hflip,
            color_jitter=hp.color_jitter, auto_augment=hp.auto_augment, re_prob=hp.re_prob,
            interpolation=cfg["interpolation"], mean=cfg["mean"], std=cfg["std"])

    def setup(self, stage: str | None = None) -> None:
        from torchvision.datasets import ImageFolder

        hp = self.hparams
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for name in wanted.get(stage or "fit", ("train", "val", "test")):
            if name in self.datasets:
                continue
            split = {"train": hp.train_split, "val": hp.val_split, "test": hp.test_split or hp.val_split}[name]
            ds = ImageFolder(str(self.split_dir(split)), transform=self.transform(train=name == "train"))
            if name != "train" and ds.classes != self.classes:
                raise ValueError(f"split {split!r} has classes {ds.classes[:5]}... which differ from the training "
                                 f"split's {self.classes[:5]}...; every split needs the same class folders")
            self.datasets[name] = ds

    def _loader(self, name: str) -> DataLoader:
        if name not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[name])
        train = name == "train"
        hp = self.hparams
        return DataLoader(self.datasets[name], batch_size=hp.batch_size, shuffle=train, drop_last=train,
                          num_workers=hp.num_workers, pin_memory=hp.pin_memory and torch.cuda.is_available(),
                          persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
