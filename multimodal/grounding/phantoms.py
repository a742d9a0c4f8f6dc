"""Synthetic PET/CT phantoms with reports: spheres of known uptake in a noisy body, and sentences that state each
lesion's side, level, SUVmax and axial slice the way radiologists write them.

Volumes are indexed ``(i, j, k)`` as the weak-label pipeline expects: ``k`` is axial with the head at high ``k``,
and the patient's left is at high ``i``. A lesion is a sphere of constant uptake, blurred by a Gaussian (the
scanner's point-spread function) and added to a body cylinder of SUV ``background``; Gaussian noise follows. Its
report sentence gives the region's maximum SUV rounded to 0.1 and the slice number of that voxel in the report
convention (``depth - k``, see :func:`~zoo.multimodal.grounding.weak_labels.slice_index`). The planted sphere is
the ground-truth mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .report_parser import Finding

__all__ = ["LEVELS", "REPORT_WORDS", "SIDES", "PetCtPhantom", "PhantomLesion", "make_petct_phantom"]

SIDES = ("left", "right")
LEVELS = ("upper", "lower")
_SITES = ("nodal", "osseous", "soft tissue")
_ADJECTIVES = ("hypermetabolic", "focal", "new")
_TEMPLATES = (
    "There is a {adj} {side} {level} {site} lesion with SUV max {suv} (axial slice {slice}).",
    "A {adj} {side} {level} {site} focus on slice {slice} demonstrates an SUV max of {suv}.",
    "{Adj} uptake in the {side} {level} {site} region, slice {slice}, with SUV max {suv}.",
)
_DISTRACTORS = (
    "Physiologic uptake is present in the brain, myocardium and urinary bladder.",
    "Background liver metabolic activity has SUV max 2.1 on slice 30.",
    "No suspicious pulmonary nodules are seen.",
)
# Every word a phantom report can contain (lower case): the vocabulary of the tiny test tokenizer.
_TEMPLATE_WORDS = {w.strip(".,()").lower() for text in _TEMPLATES + _DISTRACTORS for w in text.split()
                   if "{" not in w and not any(ch.isdigit() for ch in w)}
REPORT_WORDS = tuple(sorted(_TEMPLATE_WORDS | set(SIDES) | set(LEVELS) | set(_ADJECTIVES)
                            | {w for site in _SITES for w in site.split()}))

_BODY_SUV_OUTSIDE = 0.05
_CT_BODY_HU, _CT_AIR_HU, _CT_LESION_HU = 30.0, -1000.0, 60.0


@dataclass
class PhantomLesion:
    """A planted lesion: centre ``(i, j, k)`` in voxels, radius (voxels), uptake (SUV before blur), side, level."""

    center: tuple[float, float, float]
    radius: float
    uptake: float
    side: str
    level: str


@dataclass
class PetCtPhantom:
    """A phantom scan: ``suv`` and ``ct`` (HU) volumes (I, J, K) float32, per-lesion bool masks, one report
    sentence and :class:`~zoo.multimodal.grounding.report_parser.Finding` per lesion, and the whole report."""

    suv: np.ndarray
    ct: np.ndarray
    lesions: list[PhantomLesion]
    masks: list[np.ndarray]
    sentences: list[str]
    findings: list[Finding]
    report: str
    voxel_mm: tuple[float, float, float] = field(default=(4.0, 4.0, 4.0))


def _body_mask(shape: tuple[int, int, int]) -> np.ndarray:
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    ci, cj = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    ellipse = ((i - ci) / (0.46 * shape[0])) ** 2 + ((j - cj) / (0.40 * shape[1])) ** 2 <= 1.0
    return np.broadcast_to(ellipse[:, :, None], shape).copy()


def _sphere(shape: tuple[int, int, int], center, radius: float) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, center))
    return dist2 <= radius ** 2


def _lesion_center(rng, shape, side: str, level: str, radius: float) -> tuple[float, float, float]:
    margin = radius + 2.0
    half_i, half_k = shape[0] / 2, shape[2] / 2
    lo_i, hi_i = (half_i + 1, shape[0] - margin - 2) if side == "left" else (margin + 2, half_i - 2)
    lo_k, hi_k = (half_k + 1, shape[2] - margin - 1) if level == "upper" else (margin + 1, half_k - 2)
    lo_j, hi_j = shape[1] * 0.3, shape[1] * 0.7
    return tuple(float(rng.uniform(lo, hi)) for lo, hi in ((lo_i, hi_i), (lo_j, hi_j), (lo_k, hi_k)))


def _stated_values(suv: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """(SUVmax rounded to 0.1, report slice number) of the hottest voxel in and around the lesion."""
    near = ndimage.binary_dilation(mask, iterations=2)
    values = np.where(near, suv, -np.inf)
    peak = np.unravel_index(np.argmax(values), suv.shape)
    return round(float(suv[peak]), 1), suv.shape[2] - int(peak[2])


def _sentence(rng, lesion: PhantomLesion, suv_max: float, slice_number: int) -> str:
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    adjective = _ADJECTIVES[int(rng.integers(len(_ADJECTIVES)))]
    site = _SITES[int(rng.integers(len(_SITES)))]
    return template.format(adj=adjective, Adj=adjective.capitalize(), side=lesion.side, level=lesion.level,
                           site=site, suv=f"{suv_max:.1f}", slice=slice_number)


def make_petct_phantom(shape: tuple[int, int, int] = (32, 32, 64), n_lesions: int = 2, *,
                       radius: tuple[float, float] = (2.5, 3.5), uptake: tuple[float, float] = (5.0, 12.0),
                       background: float = 1.0, noise: float = 0.05, blur: float = 0.6,
                       voxel_mm: float = 4.0, seed: int = 0) -> PetCtPhantom:
    """A PET/CT phantom with ``n_lesions`` spheres, each in a different (side, level) quadrant, and its report.

    Args:
        shape: (I, J, K) volume shape, ``k`` axial (head at high ``k``), patient left at high ``i``.
        n_lesions: 1 to 4 (one per quadrant).
        radius: (min, max) sphere radius in voxels.
        uptake: (min, max) sphere SUV before blurring.
        background: SUV inside the body.
        noise: standard deviation of the additive Gaussian noise (SUV).
        blur: Gaussian point-spread sigma in voxels (0 for none).
        voxel_mm: isotropic voxel size (mm).
        seed: random seed (the phantom is a pure function of its arguments).

    Returns:
        A :class:`PetCtPhantom`; ``report`` interleaves the lesion sentences with templated and normal sentences.
    """
    if not 1 <= n_lesions <= 4:
        raise ValueError(f"n_lesions={n_lesions!r} must be in 1..4 (one lesion per side/level quadrant)")
    rng = np.random.default_rng(seed)
    quadrants = [(s, lv) for s in SIDES for lv in LEVELS]
    order = rng.permutation(len(quadrants))[:n_lesions]
    body = _body_mask(shape)
    activity = np.where(body, background, _BODY_SUV_OUTSIDE).astype(np.float32)
    lesions, masks = [], []
    for q in order:
        side, level = quadrants[q]
        r = float(rng.uniform(*radius))
        lesion = PhantomLesion(_lesion_center(rng, shape, side, level, r), r, float(rng.uniform(*uptake)), side, level)
        mask = _sphere(shape, lesion.center, r)
        activity[mask] = lesion.uptake
        lesions.append(lesion)
        masks.append(mask)
    if blur > 0:
        activity = ndimage.gaussian_filter(activity, blur)
    suv = np.clip(activity + rng.normal(0.0, noise, shape), 0.0, None).astype(np.float32)
    ct = np.where(body, _CT_BODY_HU, _CT_AIR_HU).astype(np.float32)
    for mask in masks:
        ct[mask] = _CT_LESION_HU
    ct += rng.normal(0.0, 10.0, shape).astype(np.float32)
    sentences, findings = [], []
    for lesion, mask in zip(lesions, masks):
        suv_max, slice_number = _stated_values(suv, mask)
        sentence = _sentence(rng, lesion, suv_max, slice_number)
        sentences.append(sentence)
        findings.append(Finding(sentence, slice_number, suv_max))
    report = " ".join([_DISTRACTORS[0], *sentences[:1], _DISTRACTORS[1], *sentences[1:], _DISTRACTORS[2]])
    return PetCtPhantom(suv, ct, lesions, masks, sentences, findings, report, (voxel_mm,) * 3)
