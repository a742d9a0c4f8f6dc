"""Weak labels from reports on synthetic PET phantoms: seeds, the iterative-threshold contour, checks, NIfTI I/O."""
from __future__ import annotations

import numpy as np
import pytest

from zoo.multimodal.grounding.phantoms import make_petct_phantom
from zoo.multimodal.grounding.report_parser import Finding, extract_findings
from zoo.multimodal.grounding.weak_labels import (
    find_lesion_seeds,
    grow_lesion_fraction,
    grow_lesion_itm,
    label_matches_finding,
    labels_to_volume,
    load_nifti,
    on_wrong_side,
    seed_threshold,
    slice_index,
    voxel_volume_ml,
    weak_label_nifti,
    weak_labels,
)

VOXEL_ML = 0.064  # 4 mm isotropic voxels


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _hot_cube(peak: float = 10.5, hot: float = 10.0) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Background 1.0, a 3x3x3 cube of ``hot`` whose centre is ``peak``."""
    suv = np.ones((24, 24, 24))
    suv[10:13, 10:13, 10:13] = hot
    suv[11, 11, 11] = peak
    return suv, (11, 11, 11)


@pytest.fixture(scope="module")
def phantoms():
    return [make_petct_phantom(seed=seed) for seed in range(4)]


def _planted_mask(phantom, finding):
    return phantom.masks[phantom.sentences.index(finding.sentence)]


def test_report_of_a_phantom_gives_its_findings(phantoms):
    for phantom in phantoms:
        assert extract_findings(phantom.report) == phantom.findings  # distractors and the template are skipped


@pytest.mark.parametrize("rule, fraction", [("itm", None), ("fraction", 0.4)])
def test_weak_labeller_recovers_planted_lesions(phantoms, rule, fraction):
    scores = []
    for phantom in phantoms:
        labels = weak_labels(phantom.suv, extract_findings(phantom.report), VOXEL_ML, rule=rule,
                             fraction=fraction or 0.4)
        assert len(labels) == len(phantom.masks)  # every planted lesion is labelled
        for label in labels:
            planted = _planted_mask(phantom, label.finding)
            assert label.mask[label.seed] and planted[label.seed]  # the seed is inside the lesion
            scores.append(_dice(label.mask, planted))
    if rule == "fraction":
        assert min(scores) >= 0.9, scores
    else:  # the official contour grows one voxel layer per iteration and may stop a layer short
        assert np.mean(scores) >= 0.9 and min(scores) >= 0.6, scores


def test_seed_is_the_region_maximum_on_the_stated_slice():
    suv, centre = _hot_cube()
    depth = suv.shape[2]
    number = depth - centre[2]
    assert slice_index(number, depth) == centre[2] and slice_index(11, depth, "index") == 11
    assert seed_threshold(10.5) == pytest.approx(0.617 + 0.316 * 10.5)
    assert find_lesion_seeds(suv, number, 10.5) == [centre]
    assert find_lesion_seeds(suv, number - 1, 10.45) == [centre]  # slice inside the region, SUV within 0.1
    assert find_lesion_seeds(suv, number + 5, 10.5) == []  # region does not reach that slice
    assert find_lesion_seeds(suv, number, 10.7) == []  # SUVmax off by more than 0.1
    assert find_lesion_seeds(suv, centre[2], 10.5, slice_convention="index") == [centre]
    with pytest.raises(ValueError, match="slice_convention"):
        slice_index(3, depth, "dicom")


def test_itm_contour_and_threshold_by_hand():
    """Hot 3x3x3 cube in background 1 (shells all at SUV 1): the 18-neighbourhood first (19 voxels), the cube
    corners join on the next layer (27), then the threshold settles."""
    suv, centre = _hot_cube()
    mask, threshold = grow_lesion_itm(suv, centre, 10.5, VOXEL_ML)
    expected = np.zeros(suv.shape, dtype=bool)
    expected[10:13, 10:13, 10:13] = True
    np.testing.assert_array_equal(mask, expected)
    assert threshold == pytest.approx((0.078 / (27 * VOXEL_ML) + 0.617 * 1.0 / 10.5 + 0.316) * 10.5, rel=1e-12)
    assert threshold == pytest.approx(4.408964, abs=1e-5)


def test_itm_gives_up_inside_a_large_uniform_region():
    suv = np.ones((32, 32, 32))
    suv[6:26, 6:26, 6:26] = 8.0  # shells 3 voxels out stay inside: background ~ SUVmax, threshold > 0.9 SUVmax
    suv[16, 16, 16] = 8.2
    mask, threshold = grow_lesion_itm(suv, (16, 16, 16), 8.2, VOXEL_ML)
    assert mask is None and threshold / 8.2 > 0.9
    region, fraction_threshold = grow_lesion_fraction(suv, (16, 16, 16), 8.2, fraction=0.4)
    assert fraction_threshold == pytest.approx(3.28) and int(region.sum()) == 20 ** 3


def test_label_checks():
    suv, _ = _hot_cube()
    mask = np.zeros(suv.shape, dtype=bool)
    mask[10:13, 10:13, 10:13] = True
    assert label_matches_finding(suv, mask, 10.5, seed_k=11)
    assert not label_matches_finding(suv, mask, 10.8, seed_k=11)  # max 10.5 is 0.3 off
    assert not label_matches_finding(suv, mask, 10.5, seed_k=14)  # no label voxel on that slice
    left = np.zeros((40, 8, 8), dtype=bool)
    left[31:34] = True  # patient left = high i
    assert not on_wrong_side("left axillary node", left)
    assert on_wrong_side("right axillary node", left)  # first plane 31 > 20 + 10
    assert not on_wrong_side("Right and left nodes", left) and not on_wrong_side("Left node", left)  # lower case only


def test_ambiguous_and_repeated_findings_get_no_label():
    suv = np.ones((32, 32, 32))
    suv[5:8, 5:8, 14:17] = 6.0
    suv[22:25, 22:25, 14:17] = 6.0  # twin lesion on the same slices with the same SUVmax
    number = 32 - 15
    twin = Finding("twin nodes", number, 6.0)
    assert len(find_lesion_seeds(suv, number, 6.0)) == 2
    assert weak_labels(suv, [twin], VOXEL_ML) == []
    suv[22:25, 22:25, 14:17] = 1.0
    assert len(weak_labels(suv, [twin], VOXEL_ML, check_side=False)) == 1
    assert weak_labels(suv, [twin, twin], VOXEL_ML) == []  # the same sentence twice in one report


def test_nifti_round_trip(tmp_path, phantoms):
    nib = pytest.importorskip("nibabel")
    phantom = phantoms[0]
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = (-60.0, -70.0, -120.0)
    pet_path = tmp_path / "pet_suv.nii.gz"
    nib.save(nib.Nifti1Image(phantom.suv, affine), str(pet_path))
    suv, image = load_nifti(pet_path)
    np.testing.assert_array_equal(suv, phantom.suv.astype(np.float64))
    assert voxel_volume_ml(image) == pytest.approx(VOXEL_ML)

    out = weak_label_nifti(pet_path, phantom.report, tmp_path / "labels" / "label.nii.gz")
    written = nib.load(str(tmp_path / "labels" / "label.nii.gz"))
    np.testing.assert_array_equal(written.affine, affine)
    assert written.get_data_dtype() == np.uint16 and written.shape == phantom.suv.shape
    in_memory = weak_labels(phantom.suv, phantom.findings, VOXEL_ML)
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels_to_volume(in_memory, phantom.suv.shape))
    assert [w.finding for w in out] == phantom.findings
    assert sorted(np.unique(np.asarray(written.dataobj)).tolist()) == [0, 1, 2]


def test_small_voxels_use_the_official_fallback_volume(tmp_path):
    nib = pytest.importorskip("nibabel")
    path = tmp_path / "tiny.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    assert voxel_volume_ml(load_nifti(path)[1]) == pytest.approx(0.04346516799926758)  # 8 mm^3 < 0.04 ml
