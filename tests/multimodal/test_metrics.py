"""Anomaly metrics on constructed cases with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from zoo.multimodal.metrics import aupro, auroc, image_auroc, label_regions, pixel_auroc, pro_curve


def test_auroc_perfect_inverted_and_tied():
    y = np.array([0, 0, 1, 1, 1])
    assert auroc(y, [0.1, 0.2, 0.3, 0.4, 0.5]) == 1.0
    assert auroc(y, [0.5, 0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auroc(y, np.zeros(5)) == 0.5


def test_auroc_by_hand():
    # pairs (pos, neg): (0.35 vs 0.1) win, (0.35 vs 0.4) lose, (0.8 vs both) win -> 3/4
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    # a tie counts one half: (0.4 vs 0.4) 1/2, (0.4 vs 0.1) 1 -> 3/4
    assert auroc([0, 0, 1], [0.1, 0.4, 0.4]) == 0.75


def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + 0.7 * y, 1)  # rounding makes many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    masks = rng.random((3, 16, 16)) > 0.8
    maps = rng.random((3, 16, 16)) + masks * 0.3
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert image_auroc([1, 0, 1, 0], [0.9, 0.2, 0.4, 0.5]) == pytest.approx(roc_auc_score([1, 0, 1, 0],
                                                                                          [0.9, 0.2, 0.4, 0.5]))


def test_auroc_errors_name_the_problem():
    with pytest.raises(ValueError, match="both classes"):
        auroc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0/1"):
        auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="same number"):
        auroc([0, 1], [0.1])


def test_regions_are_8_connected_and_numbered_across_images():
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    masks[0, 4, 4] = True
    masks[1, 2, 1:4] = True
    regions, count = label_regions(masks)
    assert count == 3
    assert regions[0, 0, 0] == regions[0, 1, 1] != regions[0, 4, 4]
    assert set(np.unique(regions[1])) == {0, 3}


def _two_region_case():
    """Regions A (2 px, score 0.9) and B (4 px, score 0.7); 10 normal px: two at 0.8, eight at 0.1."""
    masks = np.zeros((1, 4, 4), dtype=bool)
    maps = np.full((1, 4, 4), 0.1)
    masks[0, 0, 0:2] = True
    maps[0, 0, 0:2] = 0.9
    masks[0, 3, :] = True
    maps[0, 3, :] = 0.7
    maps[0, 1, 3] = maps[0, 2, 3] = 0.8
    return masks, maps


def test_pro_curve_and_aupro_by_hand():
    masks, maps = _two_region_case()
    fprs, pros = pro_curve(masks, maps)
    # thresholds 0.9, 0.8, 0.7, 0.1: PRO = mean of per-region overlaps, FPR over the 10 normal pixels
    np.testing.assert_allclose(fprs, [0.0, 0.0, 0.2, 0.2, 1.0])
    np.testing.assert_allclose(pros, [0.0, 0.5, 0.5, 1.0, 1.0])
    # area up to FPR 0.3: 0.2 * 0.5 + 0.1 * 1.0 = 0.2, normalised by 0.3
    assert aupro(masks, maps) == pytest.approx(0.2 / 0.3)
    # interpolation at the limit: FPR 0.1 cuts inside the first horizontal segment -> 0.1 * 0.5 / 0.1
    assert aupro(masks, maps, fpr_limit=0.1) == pytest.approx(0.5)


def test_aupro_perfect_constant_and_inverted():
    masks, _ = _two_region_case()
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    # a constant map: one step from (0, 0) to (1, 1), the diagonal; area to 0.3 is 0.045
    assert aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.045 / 0.3)
    assert aupro(masks, 1.0 - masks.astype(float)) == pytest.approx(0.0)


def test_aupro_anovl_variant_by_hand():
    # defect pixels score 1.0 and 0.25 (one region), one normal pixel 0.5, nine normal pixels 0
    masks = np.zeros((1, 1, 12), dtype=bool)
    maps = np.zeros((1, 1, 12))
    masks[0, 0, :2] = True
    maps[0, 0, :3] = [1.0, 0.25, 0.5]
    # official binned curve: FPR 0.1 for th < 0.5, else 0 -> rescaled to {1, 0}; the only non-zero-width
    # segment runs from (1, PRO 0.5) to (0, PRO 0.5): area 0.5
    assert aupro(masks, maps, method="anovl") == pytest.approx(0.5)
    # exact MVTec curve: (0, .5), (.1, .5), (.1, 1), (1, 1): (0.1 * 0.5 + 0.2 * 1) / 0.3
    assert aupro(masks, maps) == pytest.approx(0.25 / 0.3)


def test_aupro_errors():
    masks, maps = _two_region_case()
    with pytest.raises(ValueError, match="method"):
        aupro(masks, maps, method="paper")
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="defect region"):
        aupro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="same shape"):
        aupro(masks, maps[..., :2])
