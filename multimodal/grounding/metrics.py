"""Loss and metrics of the grounding recipe: Dice-CE loss, voxel Dice, and the lesion-level detection F1.

* :func:`dice_ce_loss`: the MONAI Auto3DSeg default the official segmenter is configured with (``DiceCELoss``,
  softmax, one-hot target, background included, squared prediction in the denominator, ``smooth_nr=0``,
  ``smooth_dr=1e-5``): cross-entropy + (1 - Dice) averaged over samples and classes.
* :func:`lesion_detection_counts` (official ``TPFPFNHelper``): 26-connected components; a ground-truth component
  touched by the prediction is a true positive, otherwise a false negative; a predicted component of more than 8
  voxels touching no ground truth is a false positive. Only the first 49 components of each kind are examined,
  as in the official loop. :func:`f1_from_counts` gives ``TP / (TP + (FP + FN) / 2)``, the paper's F1.
  The paper (arXiv 2502.00528) states a different matching rule: a predicted contour is a true positive when its
  SUVmax is within 0.1 of the ground truth's. ``match="suvmax"`` implements that reading (needs the SUV volume):
  a ground-truth component is found when some predicted component's SUVmax is within ``suv_tolerance`` of its
  own, and a predicted component (of the counted size) matching no ground-truth SUVmax is a false positive.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["dice_ce_loss", "dice_score", "f1_from_counts", "lesion_detection_counts"]

_TWENTY_SIX = np.ones((3, 3, 3), dtype=bool)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, smooth_dr: float = 1e-5) -> torch.Tensor:
    """Cross-entropy + squared soft Dice loss.

    Args:
        logits: (B, K, *S) class logits.
        target: (B, *S) integer labels in ``[0, K)``.
        smooth_dr: added to the Dice denominator.

    Returns:
        Scalar loss.
    """
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target must be (B, *S)={tuple(logits.shape[:1] + logits.shape[2:])} integer labels, "
                         f"got {tuple(target.shape)}")
    target = target.long()
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
    dims = tuple(range(2, logits.ndim))
    overlap = (probs * onehot).sum(dims)
    denominator = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    dice = 1.0 - 2.0 * overlap / (denominator + smooth_dr)
    return ce + dice.mean()


def dice_score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample Dice of two binary masks (B, *S) -> (B,); 1 when both are empty."""
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    overlap = (pred & target).sum(1).float()
    total = pred.sum(1).float() + target.sum(1).float()
    return torch.where(total > 0, 2.0 * overlap / total.clamp_min(1.0), torch.ones_like(total))


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(mask, structure=_TWENTY_SIX)


def _component_maxima(labels: np.ndarray, n: int, suv: np.ndarray) -> np.ndarray:
    return np.asarray(ndimage.maximum(suv, labels, index=np.arange(1, n + 1)), dtype=np.float64).reshape(-1)


def lesion_detection_counts(pred: np.ndarray, target: np.ndarray, *, match: Literal["overlap", "suvmax"] = "overlap",
                            suv: np.ndarray | None = None, suv_tolerance: float = 0.1, min_fp_voxels: int = 9,
                            max_components: int = 49) -> tuple[int, int, int]:
    """(TP, FP, FN) lesion counts of one binary prediction against one binary ground truth (3-d arrays).

    Args:
        pred, target: (I, J, K) binary masks.
        match: ``"overlap"`` (official code) or ``"suvmax"`` (the paper's rule, needs ``suv``).
        suv: (I, J, K) SUV volume for ``match="suvmax"``.
        suv_tolerance: SUVmax agreement of ``"suvmax"`` matching.
        min_fp_voxels: smallest predicted component counted as a false positive (official: more than 8 voxels).
        max_components: components examined per mask (official loop: the first 49).
    """
    pred, target = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred and target must be 3-d masks of one shape, got {pred.shape} and {target.shape}")
    pred_cc, n_pred = _components(pred)
    gt_cc, n_gt = _components(target)
    n_gt, n_pred = min(n_gt, max_components), min(n_pred, max_components)
    sizes = np.bincount(pred_cc.ravel(), minlength=n_pred + 1)[1:n_pred + 1]
    if match == "overlap":
        found = [bool(pred[gt_cc == idx].any()) for idx in range(1, n_gt + 1)]
        spurious = [not target[pred_cc == idx].any() for idx in range(1, n_pred + 1)]
    elif match == "suvmax":
        if suv is None or np.shape(suv) != pred.shape:
            raise ValueError(f"match='suvmax' needs suv, an SUV volume of shape {pred.shape}")
        gt_max, pred_max = _component_maxima(gt_cc, n_gt, suv), _component_maxima(pred_cc, n_pred, suv)
        close = np.abs(gt_max[:, None] - pred_max[None, :]) <= suv_tolerance  # (n_gt, n_pred)
        found, spurious = close.any(1).tolist(), (~close.any(0)).tolist()
    else:
        raise ValueError(f"match={match!r}; accepted: 'overlap' (official code), 'suvmax' (paper)")
    tp = sum(found)
    fp = sum(1 for s, size in zip(spurious, sizes) if s and size >= min_fp_voxels)
    return tp, fp, n_gt - tp


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """Lesion-level F1 ``TP / (TP + (FP + FN) / 2)``; 1.0 when there is nothing to find and nothing found."""
    denominator = tp + 0.5 * (fp + fn)
    return 1.0 if denominator == 0 else tp / denominator
