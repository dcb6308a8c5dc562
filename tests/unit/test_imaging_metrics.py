"""Shared metrics, checked against independent implementations (MONAI; the official BraTS package)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_dice
from scipy import ndimage

from imaging import metrics, nifti
from imaging.labels import ET, region_mask
from imaging.phantoms import make_case
from imaging.study import Volume

ROOT = Path(__file__).resolve().parents[2]
BRATS_PYTHON = Path(os.environ.get("ONCOSERVE_BRATS_PYTHON", ROOT / ".venv-brats" / "bin" / "python"))


def perturbed_pairs() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, prediction, truth, affine) from phantom segmentations and typical model errors."""
    pairs = []
    for i in range(2):
        study, _ = make_case(seed=11, index=i)
        truth = study.segmentation.data
        affine = study.segmentation.affine
        wt = truth > 0
        dilated = np.where(ndimage.binary_dilation(wt, iterations=1) & (truth == 0), 2, truth).astype(np.uint8)
        shifted = np.roll(truth, 2, axis=0)
        no_et = np.where(truth == ET, 1, truth).astype(np.uint8)
        eroded = np.where(ndimage.binary_erosion(wt, iterations=2), truth, 0).astype(np.uint8)
        for name, pred in (("dilated", dilated), ("shifted", shifted), ("no_et", no_et), ("eroded", eroded)):
            pairs.append((f"c{i}_{name}", pred, truth, affine))
    return pairs


@pytest.fixture(scope="module")
def pairs():
    return perturbed_pairs()


def test_dice_equals_official_brats_evaluation(pairs, tmp_path):
    assert BRATS_PYTHON.exists(), f"{BRATS_PYTHON} missing: `make test` creates .venv-brats"
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    for name, pred, truth, affine in pairs:
        # The official `gli` configuration reads ET as label 3 (BraTS 2023 convention).
        nifti.save(Volume(np.where(pred == ET, 3, pred).astype(np.uint8), affine), pred_dir / f"{name}.nii.gz")
        nifti.save(Volume(np.where(truth == ET, 3, truth).astype(np.uint8), affine), ref_dir / f"{name}.nii.gz")
    run = subprocess.run(
        [str(BRATS_PYTHON), str(ROOT / "tests/external/brats_metrics.py"), str(pred_dir), str(ref_dir)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, run.stdout[-2000:] + run.stderr[-2000:]
    official = json.loads(line[len("RESULT ") :])
    spacing = (2.0, 2.0, 2.0)
    for name, pred, truth, _ in pairs:
        ours = metrics.segmentation_scores(pred, truth, spacing)
        for region in ("WT", "TC", "ET"):
            assert ours[f"dice_{region}"] == pytest.approx(official[f"{name}.nii.gz"][region]["dice"], abs=1e-3), (name, region)


def test_dice_and_hd95_agree_with_monai(pairs):
    for name, pred, truth, _ in pairs[:4]:
        for region in ("WT", "TC"):
            p = torch.from_numpy(region_mask(pred, region)[None, None].astype(np.float32))
            t = torch.from_numpy(region_mask(truth, region)[None, None].astype(np.float32))
            ref_dice = float(compute_dice(p, t, include_background=True))
            ref_hd95 = float(compute_hausdorff_distance(p, t, percentile=95, spacing=2.0))
            ours = metrics.segmentation_scores(pred, truth, (2.0, 2.0, 2.0))
            assert ours[f"dice_{region}"] == pytest.approx(ref_dice, abs=1e-6), (name, region)
            # Surface definitions differ by at most a voxel (2 mm) between implementations.
            assert abs(ours[f"hd95_{region}"] - ref_hd95) <= 2.0 + 1e-6, (name, region, ours, ref_hd95)


def test_empty_mask_conventions():
    empty = np.zeros((4, 4, 4), bool)
    full = np.ones((4, 4, 4), bool)
    assert metrics.dice(empty, empty) == 1.0 and metrics.hd95(empty, empty) == 0.0
    assert metrics.dice(full, empty) == 0.0
    assert metrics.hd95(full, empty, (2.0, 2.0, 2.0)) == pytest.approx(np.sqrt(3 * 8.0**2))


def test_box_iou_and_centre_metrics_by_hand():
    a = np.array([0, 0, 0, 9, 9, 9])  # 1000 voxels
    b = np.array([5, 0, 0, 14, 9, 9])  # overlaps half
    assert metrics.box_iou(a, b) == pytest.approx(500 / 1500)
    assert metrics.box_iou(a, np.array([20, 20, 20, 25, 25, 25])) == 0.0
    assert metrics.centre_distance_mm([0, 0, 0], [3, 4, 0], spacing=(2, 2, 2)) == pytest.approx(10.0)
    assert metrics.centre_in_box([4.5, 4.5, 9.4], a) and not metrics.centre_in_box([4, 4, 10.6], a)
    mask = np.zeros((10, 10, 10), bool)
    mask[2:5, 3:7, 1:2] = True
    assert metrics.bbox(mask).tolist() == [2, 3, 1, 4, 6, 1]


def test_classification_metrics_by_hand():
    y = np.array([0, 0, 1, 1])
    assert metrics.auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert np.isnan(metrics.auc(np.array([1, 1]), np.array([0.2, 0.9])))
    assert metrics.balanced_accuracy(y, np.array([0, 1, 1, 1])) == pytest.approx(0.75)
    # Two predictions at confidence 0.9, one right one wrong: |0.5 - 0.9| = 0.4 in that bin.
    assert metrics.ece(np.array([1, 0]), np.array([0.9, 0.9])) == pytest.approx(0.4)
    assert metrics.ece(np.array([1, 0]), np.array([1.0, 0.0])) == pytest.approx(0.0)


def test_c_index_orders_risk_against_survival():
    days = np.array([100, 200, 300, 400])
    events = np.ones(4)
    assert metrics.c_index(days, np.array([4, 3, 2, 1]), events) == 1.0
    assert metrics.c_index(days, np.array([1, 2, 3, 4]), events) == 0.0


def test_auc_equals_sklearn_with_ties_and_the_bootstrap_interval_covers_the_figure():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(50):
        y, p = rng.integers(0, 2, 15), np.round(rng.random(15), 1)  # many tied scores
        if len(set(y)) == 2:
            assert metrics.auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    y = rng.integers(0, 2, 40)
    p = np.clip(y * 0.3 + rng.random(40) * 0.7, 0, 1)
    low, high = metrics.bootstrap_ci(metrics.auc, y, p)
    assert low < metrics.auc(y, p) < high and high - low > 0.05  # 40 cases: a real width
    assert metrics.bootstrap_ci(metrics.auc, y, p) == (low, high)  # seeded: the same interval twice
    wide = metrics.bootstrap_ci(metrics.auc, y[:10], p[:10])
    assert wide[1] - wide[0] > high - low  # fewer cases, a wider interval
    assert all(np.isnan(metrics.bootstrap_ci(metrics.auc, y[:1], p[:1])))
    assert metrics.brier(np.array([1, 0]), np.array([0.5, 0.5])) == 0.25
