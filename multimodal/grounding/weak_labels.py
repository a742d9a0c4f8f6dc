"""Image side of the PET/CT weak-label pipeline: a report finding (axial slice, SUVmax) -> a lesion mask.

Follows the official pipeline (zhuemann/cog_2d_segmentation @ d5558044, ``data_prepocessing/``) on an SUV volume
indexed ``(i, j, k)`` with ``k`` the axial axis:

1. **Seed** (:func:`find_lesion_seeds`, ``get_max_pixel.get_max_pixel_step3``): threshold the volume at
   ``0.617 + 0.316 * SUVmax`` (the iterative-threshold formula with background 1), take the 6-connected regions, and
   keep those whose axial range contains the stated slice and whose maximum is within 0.1 of the stated SUVmax
   (regions longer than 50 slices with SUVmax < 5 are skipped). Each match gives its maximum voxel. The report
   counts slices from the top of the volume, 1-based: index ``k = depth - slice_number``
   (``slice_convention="official"``); ``"index"`` takes the number as the array index.
2. A finding that matches no region, or several (``remove_duplicates`` drops both rows), or whose sentence occurs
   twice in the report, gets no label.
3. **Grow** (:func:`grow_lesion_itm`, ``make_labels_from_point.itm``), the official rule: an iterative threshold
   ``T = (0.078 / V + 0.617 * B / SUVmax + 0.316) * SUVmax`` with ``V`` the contour volume in ml and ``B`` the mean
   SUV on the shell 3 voxels around the contour. It starts from the seed's 18-neighbourhood above the first ``T``
   (no volume term), then alternates: new ``B``, ``V`` and ``T``; add the contour's 6-neighbours above ``T``.
   It stops when ``T`` changes by <= 1 %, and gives up (no label) when ``T`` exceeds 0.9 * SUVmax. The contour
   only grows, by one voxel layer per iteration.
   ``rule="fraction"`` (:func:`grow_lesion_fraction`) is the simple alternative: the 6-connected region above a
   fixed fraction of SUVmax that contains the seed (the official code keeps a 50 % version, unused; 40 % is the
   common PET convention).
4. **Checks** (``check_max_pixels_and_slice``, ``remove_left_right_sided_errors``): the label's maximum SUV is
   within 0.2 of the stated SUVmax, the seed's axial slice holds more than one label voxel, and a sentence that
   says only ``left`` (or only ``right``, lower case as in the official check) is not labelled on the other side
   of the midline: the first label plane along axis 0 is compared with ``shape[0] / 2 -+ 10`` (the official
   volumes have the patient's left at high ``i``).

Differences from the official code, all at the volume border: shell and growth voxels outside the volume are
ignored (the official code wraps negative indices around and drops the finding on an index past the end). Volumes
are read and written with nibabel; the voxel volume (ml) comes from the header's ``pixdim`` and, as in the official
code, a value below 0.04 ml is replaced by 0.0435 ml.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

from .report_parser import Finding, LanguageModel, extract_findings

__all__ = [
    "WeakLabel",
    "find_lesion_seeds",
    "grow_lesion_fraction",
    "grow_lesion_itm",
    "label_matches_finding",
    "labels_to_volume",
    "load_nifti",
    "on_wrong_side",
    "save_label_nifti",
    "seed_threshold",
    "slice_index",
    "voxel_volume_ml",
    "weak_label_nifti",
    "weak_labels",
]

SliceConvention = Literal["official", "index"]
GrowRule = Literal["itm", "fraction"]

_SIX = ndimage.generate_binary_structure(3, 1)  # face neighbours
_EIGHTEEN = ndimage.generate_binary_structure(3, 2)  # faces and edges, no corners: the ITM's first neighbourhood
_CUBE = np.ones((3, 3, 3), dtype=bool)
_MIN_VOXEL_ML = 0.04
_FALLBACK_VOXEL_ML = 0.04346516799926758  # official replacement for implausibly small voxels


@dataclass
class WeakLabel:
    """A finding with its seed voxel ``(i, j, k)``, lesion mask (bool, volume shape) and final threshold (SUV)."""

    finding: Finding
    seed: tuple[int, int, int]
    mask: np.ndarray
    threshold: float


def slice_index(slice_number: int, depth: int, convention: SliceConvention = "official") -> int:
    """Array index along the axial axis of a report slice number (``official``: ``depth - slice_number``)."""
    if convention == "official":
        return depth - int(slice_number)
    if convention == "index":
        return int(slice_number)
    raise ValueError(f"slice_convention={convention!r}; accepted: 'official' (depth - number), 'index'")


def seed_threshold(suv_max: float) -> float:
    """SUV threshold of the seed search: the ITM threshold with background 1 (``0.617 + 0.316 * suv_max``)."""
    return (0.617 * (1.0 / suv_max) + 0.316) * suv_max


def _check_volume(name: str, volume: np.ndarray) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"{name} must be a 3-d (i, j, k) SUV volume, got shape {volume.shape}")
    return volume


def find_lesion_seeds(suv: np.ndarray, slice_number: int, suv_max: float, *,
                      slice_convention: SliceConvention = "official", suv_tolerance: float = 0.1,
                      slice_tolerance: int = 0, max_axial_extent: int = 50,
                      extent_suv_limit: float = 5.0) -> list[tuple[int, int, int]]:
    """Maximum voxels of the regions that match a stated slice and SUVmax (module docstring, step 1).

    Args:
        suv: (I, J, K) SUV volume, ``k`` axial.
        slice_number: the report's slice number.
        suv_max: the report's SUVmax.
        slice_convention: ``"official"`` (``k = K - slice_number``) or ``"index"``.
        suv_tolerance: largest |region max - suv_max| accepted.
        slice_tolerance: slices the region may miss the stated one by.
        max_axial_extent, extent_suv_limit: regions spanning more than ``max_axial_extent`` slices are skipped when
            ``suv_max`` is below ``extent_suv_limit`` (long low-uptake structures are not lesions).

    Returns:
        One ``(i, j, k)`` per matching region, in region-label order (one match is a usable seed).
    """
    suv = _check_volume("suv", suv)
    k_ref = slice_index(slice_number, suv.shape[2], slice_convention)
    regions, _ = ndimage.label(suv > seed_threshold(suv_max), structure=_SIX)
    seeds = []
    for region, box in enumerate(ndimage.find_objects(regions), start=1):
        k_min, k_max = box[2].start, box[2].stop - 1
        if not (k_ref - slice_tolerance <= k_max and k_min <= k_ref + slice_tolerance):
            continue
        local = np.where(regions[box] == region, suv[box], -np.inf)
        peak = np.unravel_index(np.argmax(local), local.shape)
        if abs(float(local[peak]) - suv_max) > suv_tolerance:
            continue
        if k_max - k_min > max_axial_extent and suv_max < extent_suv_limit:
            continue
        seeds.append(tuple(int(p + s.start) for p, s in zip(peak, box)))
    return seeds


def _inside(coords: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.all((coords >= 0) & (coords < np.asarray(shape)), axis=1)


def _shell_mean(suv: np.ndarray, contour: np.ndarray, extension: int = 3) -> float:
    """Mean SUV on the surface (6-neighbour boundary) of the contour dilated by an ``extension`` cube."""
    coords = np.argwhere(contour)
    origin = coords.min(0) - (extension + 1)
    size = coords.max(0) - coords.min(0) + 2 * extension + 3
    local = np.zeros(size, dtype=bool)  # a frame larger than the dilation, so it may reach past the volume
    local[tuple((coords - origin).T)] = True
    dilated = ndimage.binary_dilation(local, structure=_CUBE, iterations=extension)
    shell = np.argwhere(dilated & ~ndimage.binary_erosion(dilated, structure=_SIX)) + origin
    shell = shell[_inside(shell, suv.shape)]
    return float(suv[tuple(shell.T)].mean())


def _itm_threshold(volume_ml: float, background: float, suv_max: float) -> float:
    return (0.078 / volume_ml + 0.617 * background / suv_max + 0.316) * suv_max


def grow_lesion_itm(suv: np.ndarray, seed: tuple[int, int, int], suv_max: float, voxel_ml: float, *,
                    shell_extension: int = 3, tolerance: float = 0.01, give_up_ratio: float = 0.9,
                    max_iterations: int = 200) -> tuple[np.ndarray | None, float]:
    """The official iterative-threshold lesion contour from a seed (module docstring, step 3).

    Args:
        suv: (I, J, K) SUV volume.
        seed: ``(i, j, k)`` start voxel (the region maximum).
        suv_max: the stated SUVmax (the "source" of the threshold formula).
        voxel_ml: volume of one voxel in ml.
        shell_extension: distance (voxels, cube) of the background shell.
        tolerance: stop when the relative threshold change is at most this.
        give_up_ratio: no label when the threshold exceeds this fraction of ``suv_max``.
        max_iterations: guard against non-convergence (the official loop has none); reaching it gives no label.

    Returns:
        ``(mask, threshold)``: bool (I, J, K) mask, or None when the method gives up, and the last threshold.
    """
    suv = _check_volume("suv", suv)
    seed_mask = np.zeros(suv.shape, dtype=bool)
    seed_mask[seed] = True
    threshold = 0.617 * _shell_mean(suv, seed_mask, shell_extension) + 0.316 * suv_max
    contour = ndimage.binary_dilation(seed_mask, structure=_EIGHTEEN) & (suv > threshold)
    change = (suv_max - threshold) / suv_max
    for _ in range(max_iterations):
        if abs(change) <= tolerance:
            return contour, threshold
        if not contour.any():  # nothing above the first threshold: no lesion to contour
            return None, threshold
        background = _shell_mean(suv, contour, shell_extension)
        previous, threshold = threshold, _itm_threshold(contour.sum() * voxel_ml, background, suv_max)
        if threshold / suv_max > give_up_ratio:
            return None, threshold
        contour = contour | (ndimage.binary_dilation(contour, structure=_SIX) & (suv > threshold))
        change = (previous - threshold) / previous
    return None, threshold


def grow_lesion_fraction(suv: np.ndarray, seed: tuple[int, int, int], suv_max: float,
                         fraction: float = 0.4) -> tuple[np.ndarray, float]:
    """The 6-connected region above ``fraction * suv_max`` that contains the seed; returns ``(mask, threshold)``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1) (of SUVmax)")
    suv = _check_volume("suv", suv)
    threshold = fraction * suv_max
    regions, _ = ndimage.label(suv > threshold, structure=_SIX)
    if regions[seed] == 0:
        return np.zeros(suv.shape, dtype=bool), threshold
    return regions == regions[seed], threshold


def label_matches_finding(suv: np.ndarray, mask: np.ndarray, suv_max: float, seed_k: int,
                          suv_tolerance: float = 0.2) -> bool:
    """Official purity check: the label's max SUV is within ``suv_tolerance`` of the stated SUVmax and the seed's
    axial slice ``seed_k`` holds more than one label voxel."""
    if not mask.any():
        return False
    return abs(float(suv[mask].max()) - suv_max) <= suv_tolerance and int(mask[:, :, seed_k].sum()) > 1


def on_wrong_side(sentence: str, mask: np.ndarray, buffer: int = 10) -> bool:
    """Official side check: a sentence naming only ``left`` (only ``right``) whose label starts (first plane along
    axis 0) more than ``buffer`` planes into the right (left) half; patient left is at high ``i``."""
    says_left, says_right = "left" in sentence, "right" in sentence
    if says_left == says_right or not mask.any():
        return False
    first_plane = int(np.argmax(mask.any(axis=(1, 2))))
    midpoint = mask.shape[0] / 2
    if says_left:
        return first_plane < midpoint - buffer
    return first_plane > midpoint + buffer


def _grow(suv, seed, finding, voxel_ml, rule, fraction):
    if rule == "itm":
        return grow_lesion_itm(suv, seed, finding.suv_max, voxel_ml)
    if rule == "fraction":
        return grow_lesion_fraction(suv, seed, finding.suv_max, fraction)
    raise ValueError(f"rule={rule!r}; accepted: 'itm' (official iterative threshold), 'fraction'")


def weak_labels(suv: np.ndarray, findings: Sequence[Finding], voxel_ml: float, *, rule: GrowRule = "itm",
                fraction: float = 0.4, slice_convention: SliceConvention = "official",
                check_side: bool = True) -> list[WeakLabel]:
    """Weak labels of ``findings`` on one SUV volume (module docstring, steps 1-4); unusable findings are left out.

    Args:
        suv: (I, J, K) SUV volume, ``k`` axial, patient left at high ``i``.
        findings: from :func:`~zoo.multimodal.grounding.report_parser.extract_findings` for this scan.
        voxel_ml: voxel volume in ml (:func:`voxel_volume_ml`).
        rule: ``"itm"`` (official) or ``"fraction"`` (region above ``fraction * SUVmax``).
        fraction: used by ``rule="fraction"``.
        slice_convention: see :func:`slice_index`.
        check_side: apply the left/right check.

    Returns:
        One :class:`WeakLabel` per labelled finding, in the order of ``findings``.
    """
    suv = _check_volume("suv", suv)
    repeated = {s for s, n in Counter(f.sentence for f in findings).items() if n > 1}
    labels = []
    for finding in findings:
        if finding.sentence in repeated:
            continue
        seeds = find_lesion_seeds(suv, finding.slice_number, finding.suv_max, slice_convention=slice_convention)
        if len(seeds) != 1:
            continue
        mask, threshold = _grow(suv, seeds[0], finding, voxel_ml, rule, fraction)
        if mask is None or not label_matches_finding(suv, mask, finding.suv_max, seeds[0][2]):
            continue
        if check_side and on_wrong_side(finding.sentence, mask):
            continue
        labels.append(WeakLabel(finding, seeds[0], mask, float(threshold)))
    return labels


def labels_to_volume(labels: Sequence[WeakLabel], shape: tuple[int, int, int]) -> np.ndarray:
    """One uint16 volume: voxel value ``n`` (1-based) for the ``n``-th label, 0 elsewhere (later labels win)."""
    volume = np.zeros(shape, dtype=np.uint16)
    for n, label in enumerate(labels, start=1):
        volume[label.mask] = n
    return volume


def load_nifti(path: str | Path):
    """``(data, image)``: the volume as float64 (nibabel's ``get_fdata``) and the nibabel image (affine, header)."""
    import nibabel as nib

    image = nib.load(str(path))
    return image.get_fdata(), image


def voxel_volume_ml(image) -> float:
    """Voxel volume in ml from a nibabel image's ``pixdim`` (mm); below 0.04 ml the official fallback 0.0435 ml."""
    dx, dy, dz = (float(v) for v in image.header["pixdim"][1:4])
    volume = dx * dy * dz / 1000.0
    return _FALLBACK_VOXEL_ML if volume < _MIN_VOXEL_ML else volume


def save_label_nifti(label: np.ndarray, reference, path: str | Path) -> Path:
    """Write a label volume with the reference image's affine and header (as the official labels are written).

    Args:
        label: (I, J, K) mask or label volume, the shape of ``reference``.
        reference: nibabel image the label belongs to (its affine and header are copied).
        path: output ``.nii`` / ``.nii.gz`` file.
    """
    import nibabel as nib

    if tuple(label.shape) != tuple(reference.shape[:3]):
        raise ValueError(f"label shape {tuple(label.shape)} differs from the reference image's {reference.shape}")
    header = reference.header.copy()
    header.set_data_dtype(np.uint16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(label, dtype=np.uint16), reference.affine, header=header), str(path))
    return path


def weak_label_nifti(pet_path: str | Path, report: str, out_path: str | Path, *,
                     models: Sequence[LanguageModel] | None = None, min_votes: int = 2,
                     sentence_filter: Callable[[str], bool] | None = None, rule: GrowRule = "itm",
                     fraction: float = 0.4, slice_convention: SliceConvention = "official",
                     check_side: bool = True) -> list[WeakLabel]:
    """Report + PET SUV NIfTI -> label NIfTI (value ``n`` = ``n``-th returned label); the full pipeline.

    Args:
        pet_path: SUV volume (``.nii``/``.nii.gz``), axes ``(i, j, k)`` with ``k`` axial.
        report: findings text of the same scan.
        out_path: label volume to write (written even when empty, so every scan has a label file).
        models, min_votes, sentence_filter: text side, see :func:`extract_findings`.
        rule, fraction, slice_convention, check_side: image side, see :func:`weak_labels`.

    Returns:
        The labels written.
    """
    suv, image = load_nifti(pet_path)
    findings = extract_findings(report, models=models, min_votes=min_votes, sentence_filter=sentence_filter)
    labels = weak_labels(suv, findings, voxel_volume_ml(image), rule=rule, fraction=fraction,
                         slice_convention=slice_convention, check_side=check_side)
    save_label_nifti(labels_to_volume(labels, suv.shape), image, out_path)
    return labels
