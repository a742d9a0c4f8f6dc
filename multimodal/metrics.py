"""Anomaly-detection metrics: pixel AUROC, AUPRO (FPR <= 0.3) and image AUROC.

* AUROC is the Mann-Whitney statistic: the probability that a random positive scores higher than a random negative,
  ties counting one half (equal to the area under the ROC curve through every distinct threshold, as
  ``sklearn.metrics.roc_auc_score``).
* AUPRO follows the MVTec AD protocol (Bergmann et al., the MVTec evaluation code ``compute_pro``): ground-truth
  regions are the 8-connected components of each mask; at every threshold the per-region overlap (PRO) is the
  mean over all regions of all images of the fraction of the region's pixels above the threshold, and the FPR is
  the fraction of normal pixels above it. The PRO curve is integrated over FPR in [0, limit] (linearly interpolated
  at the limit, trapezoids) and divided by ``limit``, so a perfect map scores 1.
* ``aupro(..., method="anovl")`` is the variant AnoVL's ``vl_test.py:cal_pro_score`` evaluates with (adapted from
  cflow-ad): 200 thresholds evenly spaced from the minimum to the maximum score, points with FPR < limit kept, their
  FPRs min-max rescaled to [0, 1], trapezoid area. Use it to compare with AnoVL's reported AUPRO; it is coarser and
  not the MVTec definition.
"""
from __future__ import annotations

import numpy as np

__all__ = ["auroc", "pixel_auroc", "image_auroc", "label_regions", "pro_curve", "aupro"]


def _as_binary(name: str, labels) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype != bool:
        values = np.unique(arr)
        if not np.all(np.isin(values, (0, 1))):
            raise ValueError(f"{name} must hold only 0/1 or booleans, got values {values[:5].tolist()}")
        arr = arr.astype(bool)
    return arr


def auroc(labels, scores) -> float:
    """Area under the ROC curve.

    Args:
        labels: (N,) 0/1 or bool ground truth (both classes must occur).
        scores: (N,) scores, higher = more anomalous.

    Returns:
        AUROC in [0, 1] (ties count one half).
    """
    y = _as_binary("labels", labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same number of elements, got {y.size} and {s.size}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes; got {n_pos} positives and {n_neg} negatives")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # average ranks over ties (1-based)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pixel_auroc(masks, maps) -> float:
    """Pixel-level AUROC over all pixels of all images: masks (N, H, W) 0/1, maps (N, H, W) scores."""
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.shape != maps.shape:
        raise ValueError(f"masks and maps must have the same shape, got {masks.shape} and {maps.shape}")
    return auroc(masks.ravel(), maps.ravel())


def image_auroc(labels, scores) -> float:
    """Image-level AUROC: labels (N,) 1 = anomalous image, scores (N,)."""
    return auroc(labels, scores)


def label_regions(masks) -> tuple[np.ndarray, int]:
    """8-connected ground-truth regions, numbered across all images.

    Args:
        masks: (N, H, W) 0/1 masks.

    Returns:
        ``(regions, count)``: (N, H, W) int array, 0 = normal pixel, 1..count = region id.
    """
    from scipy import ndimage

    masks = _as_binary("masks", masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    regions = np.zeros(masks.shape, dtype=np.int64)
    count = 0
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=int))
        regions[i] = np.where(lab > 0, lab + count, 0)
        count += n
    return regions, count


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """FPR and PRO at every distinct score threshold (MVTec ``compute_pro``), from (0, 0) upwards.

    Args:
        masks: (N, H, W) 0/1 ground truth with at least one defect pixel and one normal pixel.
        maps: (N, H, W) anomaly scores.

    Returns:
        ``(fprs, pros)``: non-decreasing arrays starting at 0; point k counts pixels with score >= the k-th
        largest distinct score.
    """
    masks, maps = _as_binary("masks", masks), np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape:
        raise ValueError(f"masks and maps must have the same shape, got {masks.shape} and {maps.shape}")
    regions, count = label_regions(masks)
    if count == 0 or masks.all():
        raise ValueError("AUPRO needs at least one defect region and one normal pixel")
    flat_regions, flat_scores = regions.ravel(), maps.ravel()
    area = np.bincount(flat_regions, minlength=count + 1).astype(np.float64)
    # each defect pixel adds 1 / (regions * its region's area) to the PRO, each normal pixel 1 / normals to the FPR
    pro_step = np.where(flat_regions > 0, 1.0 / (count * area[flat_regions]), 0.0)
    fpr_step = np.where(flat_regions == 0, 1.0 / area[0], 0.0)
    order = np.argsort(-flat_scores, kind="mergesort")
    fprs, pros = np.cumsum(fpr_step[order]), np.cumsum(pro_step[order])
    sorted_scores = flat_scores[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    fprs = np.r_[0.0, np.clip(fprs[last_of_value], 0.0, 1.0)]
    pros = np.r_[0.0, np.clip(pros[last_of_value], 0.0, 1.0)]
    return fprs, pros


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the piecewise-linear curve (x, y) for x in [0, x_max] (x non-decreasing)."""
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    if xs[-1] < x_max and keep.sum() < x.size:
        j = int(np.argmax(~keep))  # first point beyond the limit
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_at]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def _aupro_anovl(masks: np.ndarray, maps: np.ndarray, fpr_limit: float, max_step: int = 200) -> float:
    regions, count = label_regions(masks)
    normal = regions == 0
    area = np.bincount(regions.ravel(), minlength=count + 1)
    lo, hi = maps.min(), maps.max()
    fprs, pros = [], []
    for th in np.arange(lo, hi, (hi - lo) / max_step):
        above = maps > th
        hits = np.bincount(regions[above].ravel(), minlength=count + 1)
        pros.append(float(np.mean(hits[1:] / area[1:])))
        fprs.append(float(np.logical_and(normal, above).sum() / normal.sum()))
    fprs_a, pros_a = np.asarray(fprs), np.asarray(pros)
    keep = fprs_a < fpr_limit
    f = fprs_a[keep]
    f = (f - f.min()) / (f.max() - f.min())
    # sklearn.metrics.auc: trapezoids along x, which here decreases with the threshold
    return float(abs(np.sum(np.diff(f) * (pros_a[keep][1:] + pros_a[keep][:-1]) / 2.0)))


def aupro(masks, maps, fpr_limit: float = 0.3, method: str = "mvtec") -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit``.

    Args:
        masks: (N, H, W) 0/1 ground truth (at least one defect region and one normal pixel).
        maps: (N, H, W) anomaly scores.
        fpr_limit: integration limit on the false-positive rate (MVTec: 0.3).
        method: ``"mvtec"`` (exact, every distinct threshold, divided by the limit) or ``"anovl"`` (the
            official AnoVL evaluation, see the module docstring).

    Returns:
        AUPRO in [0, 1].
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if method == "mvtec":
        fprs, pros = pro_curve(masks, maps)
        return _area_up_to(fprs, pros, fpr_limit) / fpr_limit
    if method == "anovl":
        masks_b = _as_binary("masks", masks)
        maps_a = np.asarray(maps, dtype=np.float64)
        if masks_b.shape != maps_a.shape:
            raise ValueError(f"masks and maps must have the same shape, got {masks_b.shape} and {maps_a.shape}")
        return _aupro_anovl(masks_b, maps_a, fpr_limit)
    raise ValueError(f"method must be 'mvtec' or 'anovl', got {method!r}")
