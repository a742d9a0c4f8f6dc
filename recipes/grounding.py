"""PET/CT visual grounding with ConTEXTual Net 3D, as a LightningModule and two data modules.

``GroundingModule`` segments the lesion a report sentence describes: a frozen ``transformers`` text encoder gives
token embeddings of the sentence (stated slice and SUV scrubbed), :class:`~zoo.multimodal.grounding.ContextualNet3D`
gates its U-Net with them. Training uses the Dice-CE loss and AdamW with warmup + cosine (the Auto3DSeg defaults
the official segmenter runs on); validation logs ``val_loss``, ``val_dice`` (mean voxel Dice of the argmax
prediction) and ``val_f1`` (the paper's lesion-level F1 from the official TP/FP/FN rule, summed over the epoch).

Data:
    ``PhantomGroundingDataModule``: synthetic PET/CT phantoms with reports, trained on weak labels made by the
        report -> label pipeline (``zoo.multimodal.grounding.weak_labels``), validated on the planted lesions.
    ``NiftiGroundingDataModule``: NIfTI volumes listed in JSON indexes (see
        :func:`zoo.multimodal.grounding.data.read_index`), random ``roi_size`` crops for training.

Run: ``zoo train fit --config recipes/configs/grounding.yaml``.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from zoo.multimodal.grounding.contextual_net import ContextualNet3D
from zoo.multimodal.grounding.data import GroundingDataset, cases_from_phantom, load_nifti_case, read_index
from zoo.multimodal.grounding.inference import sliding_window_logits
from zoo.multimodal.grounding.metrics import dice_ce_loss, dice_score, f1_from_counts, lesion_detection_counts
from zoo.multimodal.grounding.phantoms import REPORT_WORDS, make_petct_phantom
from zoo.multimodal.grounding.text_encoder import OFFICIAL_MAX_TOKENS, ReportTokenEncoder, build_tiny_text_encoder
from zoo.recipes.classification import warmup_cosine_factor

__all__ = ["GroundingModule", "NiftiGroundingDataModule", "PhantomGroundingDataModule", "build_text_encoder"]

TINY_TEXT_ENCODER = "tiny"


def build_text_encoder(name: str, max_length: int, tiny_hidden_size: int = 32,
                       dtype: str = "float32") -> ReportTokenEncoder:
    """``"tiny"``: a random small BERT over the phantom vocabulary (offline); otherwise a ``transformers`` hub
    name or local folder loaded with ``AutoModel``/``AutoTokenizer`` in ``dtype``. Frozen either way."""
    if name == TINY_TEXT_ENCODER:
        return build_tiny_text_encoder(REPORT_WORDS, hidden_size=tiny_hidden_size, max_length=max_length)
    return ReportTokenEncoder.from_pretrained(name, dtype=dtype, max_length=max_length)


class GroundingModule(L.LightningModule):
    """Text-guided lesion segmentation (ConTEXTual Net 3D + frozen text encoder).

    Args:
        feature_size: U-Net width F (official 48).
        in_channels: image channels (2: CT, PET; 1: PET only).
        out_channels: classes (2: background, lesion).
        text_encoder: ``"tiny"`` or a ``transformers`` model name/folder (official: a Llama-2-7B folder).
        text_max_length: tokens per sentence (official 200).
        tiny_text_hidden_size: width of the ``"tiny"`` encoder.
        text_encoder_dtype: dtype the pretrained text encoder is loaded in (``"bfloat16"`` halves a LLaMA's memory).
        norm: ``"instance"`` (official) or ``"batch"``.
        mask_padding_tokens: hide padding tokens from the cross-attention (official: attended).
        lr: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warmup length in epochs.
        min_lr_ratio: cosine floor as a fraction of ``lr``.
        val_roi_size: validate by sliding windows of this size (official: the training roi, 25 % overlap) instead of
            whole volumes; None runs whole volumes.
        val_overlap: overlap of the validation windows.
        f1_match: lesion matching of ``val_f1``: ``"overlap"`` (official code) or ``"suvmax"`` (the paper: SUVmax
            within 0.1; the data module must keep the SUV volumes, ``keep_suv=True``).
    """

    report_metric = "val_dice"  # what an end-of-fit report should show for this recipe

    def __init__(self, feature_size: int = 48, in_channels: int = 2, out_channels: int = 2,
                 text_encoder: str = TINY_TEXT_ENCODER, text_max_length: int = OFFICIAL_MAX_TOKENS,
                 tiny_text_hidden_size: int = 32, text_encoder_dtype: str = "float32",
                 norm: Literal["instance", "batch"] = "instance", mask_padding_tokens: bool = False,
                 lr: float = 2e-4, weight_decay: float = 1e-5,
                 warmup_epochs: float = 0.0, min_lr_ratio: float = 0.0,
                 val_roi_size: tuple[int, int, int] | None = None, val_overlap: float = 0.25,
                 f1_match: Literal["overlap", "suvmax"] = "overlap") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.text_encoder = build_text_encoder(text_encoder, text_max_length, tiny_text_hidden_size,
                                               text_encoder_dtype)
        self.net = ContextualNet3D(in_channels, out_channels, feature_size, self.text_encoder.hidden_size, norm,
                                   mask_padding_tokens)
        self._counts = torch.zeros(3, dtype=torch.long)

    def forward(self, image: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(B, C, D, H, W) images and B sentences -> (B, out_channels, D, H, W) logits."""
        tokens, mask = self.text_encoder(texts)
        return self.net(image, tokens, mask)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = dice_ce_loss(self(batch["image"], batch["text"]), batch["label"])
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["text"]))
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen text encoder is rebuilt from its name (or, for "tiny", its seed): keeping its weights out of
        # every checkpoint saves 13 GB per file with a Llama-2-7B.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("text_encoder.")}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key, value in self.text_encoder.state_dict(prefix="text_encoder.").items():
            state.setdefault(key, value)  # strict loading still checks every network weight

    def on_validation_epoch_start(self) -> None:
        self._counts = torch.zeros(3, dtype=torch.long, device=self.device)

    def predict_logits(self, image: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Inference logits: whole volume, or sliding windows when ``val_roi_size`` is set."""
        if self.hparams.val_roi_size is None:
            return self(image, texts)
        tokens, mask = self.text_encoder(texts)
        return sliding_window_logits(lambda window: self.net(window, tokens, mask), image,
                                     self.hparams.val_roi_size, self.hparams.val_overlap)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.predict_logits(batch["image"], batch["text"])
        pred, target = logits.argmax(1), batch["label"]
        n = len(batch["text"])
        self.log("val_loss", dice_ce_loss(logits, target), on_epoch=True, batch_size=n, sync_dist=True)
        self.log("val_dice", dice_score(pred, target).mean(), on_epoch=True, prog_bar=True, batch_size=n,
                 sync_dist=True)
        match = self.hparams.f1_match
        if match == "suvmax" and "suv" not in batch:
            raise ValueError("f1_match='suvmax' needs the SUV volumes in the batch; set the data module's "
                             "keep_suv=True")
        suvs = batch["suv"].cpu().numpy() if match == "suvmax" else [None] * n
        for p, t, suv in zip(pred.cpu().numpy(), target.cpu().numpy(), suvs):
            counts = lesion_detection_counts(p, t, match=match, suv=suv)
            self._counts += torch.tensor(counts, device=self.device)

    def on_validation_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self._counts.float(), reduce_op="sum")  # lesion counts of all ranks
        tp, fp, fn = (round(c) for c in counts.tolist())
        self.log("val_f1", f1_from_counts(tp, fp, fn), prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]  # the frozen text encoder is not optimised
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(round(hp.warmup_epochs * total / max(1, self.trainer.max_epochs or 1)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine_factor(step, warmup, total, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _loader(dataset: GroundingDataset, batch_size: int, shuffle: bool, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


class PhantomGroundingDataModule(L.LightningDataModule):
    """Synthetic PET/CT phantoms and their reports (no download), one sample per lesion sentence.

    Args:
        n_train, n_val: phantom scans per split (validation scans use other seeds).
        shape: (I, J, K) volume shape, multiples of 32, ``k`` axial.
        lesions_per_scan: lesions (and sentences) per phantom, 1-4; with 2+ the sentence decides which to segment.
        radius: (min, max) lesion radius in voxels.
        train_labels: ``"weak"`` (report -> weak-label pipeline) or ``"planted"``.
        weak_rule: weak-label growth rule, ``"itm"`` (official) or ``"fraction"``.
        use_ct: 2 input channels (CT, PET) or PET only.
        scrub: ``"official"`` or ``"all_numbers"`` (see ``scrub_stated_values``).
        batch_size, num_workers: loaders.
        seed: phantom seeds start here.
        keep_suv: give validation samples their SUV volume (for ``f1_match="suvmax"``).
    """

    def __init__(self, n_train: int = 16, n_val: int = 4, shape: tuple[int, int, int] = (32, 32, 64),
                 lesions_per_scan: int = 2, radius: tuple[float, float] = (2.5, 3.5),
                 train_labels: Literal["weak", "planted"] = "weak", weak_rule: Literal["itm", "fraction"] = "itm",
                 use_ct: bool = True, scrub: Literal["official", "all_numbers"] = "official", batch_size: int = 2,
                 num_workers: int = 0, seed: int = 0, keep_suv: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: GroundingDataset | None = None
        self.val_set: GroundingDataset | None = None

    def _cases(self, seeds: range, labels: str) -> list:
        hp = self.hparams
        cases = []
        for seed in seeds:
            phantom = make_petct_phantom(tuple(hp.shape), hp.lesions_per_scan, radius=tuple(hp.radius), seed=seed)
            cases += cases_from_phantom(phantom, labels=labels, rule=hp.weak_rule, use_ct=hp.use_ct, scrub=hp.scrub)
        return cases

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.train_set is None:
            self.train_set = GroundingDataset(self._cases(range(hp.seed, hp.seed + hp.n_train), hp.train_labels))
            val_seeds = range(hp.seed + 100_000, hp.seed + 100_000 + hp.n_val)
            self.val_set = GroundingDataset(self._cases(val_seeds, "planted"), keep_suv=hp.keep_suv)

    def train_dataloader(self) -> DataLoader:
        return _loader(self.train_set, self.hparams.batch_size, True, self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return _loader(self.val_set, self.hparams.batch_size, False, self.hparams.num_workers)


class NiftiGroundingDataModule(L.LightningDataModule):
    """Cases from NIfTI files listed in JSON indexes (``pet``, ``ct``, ``label``, ``sentence``, ``slice_number``,
    ``suv_max``; paths relative to the index), e.g. the output of the weak-label pipeline.

    Args:
        root: folder of the indexes.
        train_index, val_index: index file names.
        roi_size: training crop (multiples of 32; official 128^3); validation runs on whole volumes padded to 32.
        positive_fraction: share of training crops centred on the lesion.
        use_ct: 2 input channels (CT, PET) or PET only.
        scrub: how stated numbers are removed from the sentence.
        batch_size, num_workers: training loader (validation uses batch size 1: volumes differ in size).
        seed: crop randomness.
        keep_suv: give validation samples their SUV volume (for ``f1_match="suvmax"``).
    """

    def __init__(self, root: str, train_index: str = "train.json", val_index: str = "val.json",
                 roi_size: tuple[int, int, int] = (128, 128, 128), positive_fraction: float = 0.5,
                 use_ct: bool = True, scrub: Literal["official", "all_numbers"] = "official", batch_size: int = 1,
                 num_workers: int = 0, seed: int = 0, keep_suv: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: GroundingDataset | None = None
        self.val_set: GroundingDataset | None = None

    def _cases(self, index: str) -> list:
        root = Path(self.hparams.root)  # volumes are read when a sample is drawn, not held in memory
        return [partial(load_nifti_case, entry, root, self.hparams.use_ct, self.hparams.scrub)
                for entry in read_index(root / index)]

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self.train_set is None:
            self.train_set = GroundingDataset(self._cases(hp.train_index), hp.roi_size, hp.positive_fraction, hp.seed)
            self.val_set = GroundingDataset(self._cases(hp.val_index), keep_suv=hp.keep_suv)

    def train_dataloader(self) -> DataLoader:
        return _loader(self.train_set, self.hparams.batch_size, True, self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return _loader(self.val_set, 1, False, self.hparams.num_workers)
