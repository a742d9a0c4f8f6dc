"""Grounding samples: a PET/CT image, one scrubbed report sentence, and the lesion label it describes.

Intensity normalisation follows the official segmenter: PET SUV clipped to [0, 10] and CT HU to [-150, 250], each
scaled to [0, 1]; the channels are stacked CT first, PET second (the official loader's order). A sample is built
from a synthetic phantom (:func:`cases_from_phantom`, labels planted or produced by the weak labeller) or from
NIfTI files listed in a JSON index (:func:`load_nifti_case`).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from .phantoms import PetCtPhantom
from .text_encoder import scrub_stated_values
from .weak_labels import GrowRule, load_nifti, weak_labels

__all__ = [
    "CT_RANGE",
    "PET_RANGE",
    "GroundingCase",
    "GroundingDataset",
    "cases_from_phantom",
    "crop_around",
    "load_nifti_case",
    "pad_to_multiple",
    "petct_input",
    "read_index",
    "scale_intensity",
]

PET_RANGE = (0.0, 10.0)
CT_RANGE = (-150.0, 250.0)
ScrubMode = Literal["official", "all_numbers"]


@dataclass
class GroundingCase:
    """``image`` (C, I, J, K) float32 in [0, 1], ``text`` (scrubbed sentence), ``label`` (I, J, K) uint8 0/1, and
    the raw ``suv`` volume (I, J, K) float32 for SUVmax-matched metrics (None when not kept)."""

    image: np.ndarray
    text: str
    label: np.ndarray
    suv: np.ndarray | None = None


def scale_intensity(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to ``[low, high]`` and map linearly to ``[0, 1]`` (float32)."""
    if not high > low:
        raise ValueError(f"intensity range ({low}, {high}) must have high > low")
    return ((np.clip(volume, low, high) - low) / (high - low)).astype(np.float32)


def petct_input(pet_suv: np.ndarray, ct_hu: np.ndarray | None = None) -> np.ndarray:
    """Network input (C, I, J, K): ``[CT, PET]`` normalised, or ``[PET]`` alone when ``ct_hu`` is None."""
    pet = scale_intensity(pet_suv, *PET_RANGE)
    if ct_hu is None:
        return pet[None]
    if ct_hu.shape != pet_suv.shape:
        raise ValueError(f"CT shape {ct_hu.shape} differs from PET shape {pet_suv.shape}; resample first")
    return np.stack([scale_intensity(ct_hu, *CT_RANGE), pet])


def cases_from_phantom(phantom: PetCtPhantom, *, labels: Literal["weak", "planted"] = "weak",
                       rule: GrowRule = "itm", voxel_ml: float | None = None, use_ct: bool = True,
                       scrub: ScrubMode = "official") -> list[GroundingCase]:
    """One case per lesion sentence of a phantom.

    Args:
        phantom: from :func:`~zoo.multimodal.grounding.phantoms.make_petct_phantom`.
        labels: ``"weak"`` labels each sentence with the weak labeller (its findings; sentences it cannot label
            are left out, as in the real pipeline); ``"planted"`` uses the planted spheres.
        rule: weak-label growth rule.
        voxel_ml: voxel volume; None reads the phantom's voxel size.
        use_ct: stack the CT channel (2 input channels) or give PET only.
        scrub: how the stated numbers are removed (:func:`~zoo.multimodal.grounding.text_encoder.scrub_stated_values`).
    """
    image = petct_input(phantom.suv, phantom.ct if use_ct else None)
    if labels == "planted":
        pairs = [(f, m) for f, m in zip(phantom.findings, phantom.masks)]
    elif labels == "weak":
        ml = voxel_ml if voxel_ml is not None else float(np.prod(phantom.voxel_mm)) / 1000.0
        pairs = [(w.finding, w.mask) for w in weak_labels(phantom.suv, phantom.findings, ml, rule=rule)]
    else:
        raise ValueError(f"labels={labels!r}; accepted: 'weak', 'planted'")
    return [GroundingCase(image, scrub_stated_values(f.sentence, f.slice_number, f.suv_max, scrub),
                          mask.astype(np.uint8), phantom.suv) for f, mask in pairs]


def read_index(path: str | Path) -> list[dict]:
    """A JSON list of cases: ``{"pet", "label", "sentence", "slice_number", "suv_max"}`` and optional ``"ct"``;
    file paths relative to the index's folder."""
    entries = json.loads(Path(path).read_text())
    required = {"pet", "label", "sentence", "slice_number", "suv_max"}
    for n, entry in enumerate(entries):
        missing = required - set(entry)
        if missing:
            raise ValueError(f"{path}: case {n} lacks {sorted(missing)}; every case needs {sorted(required)}")
    return entries


def load_nifti_case(entry: dict, root: str | Path, use_ct: bool = True,
                    scrub: ScrubMode = "official") -> GroundingCase:
    """A case from NIfTI files (PET in SUV, optional CT in HU on the PET grid, binary label) and its sentence."""
    root = Path(root)
    pet, _ = load_nifti(root / entry["pet"])
    ct = load_nifti(root / entry["ct"])[0] if use_ct and entry.get("ct") else None
    if use_ct and ct is None:
        raise ValueError(f"case {entry['pet']!r} has no 'ct' entry; set use_ct=False for PET-only input")
    label, _ = load_nifti(root / entry["label"])
    text = scrub_stated_values(entry["sentence"], entry["slice_number"], entry["suv_max"], scrub)
    return GroundingCase(petct_input(pet, ct), text, (label > 0).astype(np.uint8), pet.astype(np.float32))


def pad_to_multiple(volume: np.ndarray, multiple: int = 32, value: float = 0.0) -> np.ndarray:
    """Pad the last three axes at their end up to multiples of ``multiple``."""
    pads = [(0, 0)] * (volume.ndim - 3) + [(0, (-s) % multiple) for s in volume.shape[-3:]]
    return np.pad(volume, pads, constant_values=value)


def crop_around(volume: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The ``size`` window of the last three axes starting at ``start``."""
    window = tuple(slice(int(a), int(a) + int(s)) for a, s in zip(start, size))
    return volume[(Ellipsis, *window)]


def _crop_start(rng: np.random.Generator, label: np.ndarray, size: Sequence[int], positive: bool) -> list[int]:
    shape = label.shape
    if positive and label.any():
        center = np.argwhere(label)[rng.integers(int(label.sum()))]
        return [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(center, size, shape)]
    return [int(rng.integers(0, n - s + 1)) for s, n in zip(size, shape)]


class GroundingDataset(Dataset):
    """Samples ``{"image": (C, I, J, K) float32, "label": (I, J, K) long, "text": str}``, plus ``"suv"``
    (I, J, K) float32 when the cases keep it (``keep_suv``).

    Args:
        cases: the cases, or callables returning one (loaded on access, e.g. ``functools.partial(load_nifti_case,
            entry, root)``); images are padded at their end to multiples of 32.
        roi_size: random training crops of this size (each a multiple of 32); None gives whole volumes.
        positive_fraction: share of crops centred on a label voxel (the rest are uniform).
        seed: crop randomness (per item and epoch-independent draws come from one generator).
        keep_suv: return the raw SUV volume with each sample (for ``match="suvmax"`` lesion counts).
    """

    def __init__(self, cases: Sequence[GroundingCase | Callable[[], GroundingCase]],
                 roi_size: Sequence[int] | None = None, positive_fraction: float = 0.5, seed: int = 0, keep_suv: bool = False) -> None:
        if roi_size is not None and any(int(s) % 32 for s in roi_size):
            raise ValueError(f"roi_size={list(roi_size)} must be multiples of 32 (five stride-2 encoders)")
        self.cases = list(cases)
        self.roi_size = None if roi_size is None else [int(s) for s in roi_size]
        self.positive_fraction = positive_fraction
        self.rng = np.random.default_rng(seed)
        self.keep_suv = keep_suv

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        if callable(case):
            case = case()
        volumes = {"image": case.image, "label": case.label}
        if self.keep_suv:
            if case.suv is None:
                raise ValueError(f"case {index} has no suv volume; keep_suv=True needs cases built with one")
            volumes["suv"] = case.suv
        volumes = {k: pad_to_multiple(v) for k, v in volumes.items()}
        if self.roi_size is not None:
            shape = volumes["label"].shape
            size = [min(s, n) for s, n in zip(self.roi_size, shape)]
            start = _crop_start(self.rng, volumes["label"], size, self.rng.random() < self.positive_fraction)
            volumes = {k: crop_around(v, start, size) for k, v in volumes.items()}
        sample = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in volumes.items()}
        sample["label"] = sample["label"].long()
        sample["text"] = case.text
        return sample
