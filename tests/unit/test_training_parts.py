"""Training building blocks that would silently break a model if removed or wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imaging.postprocess import breslow_baseline, heatmap_to_box, remove_stray_voxels, survival_curve
from training import losses
from training.augment import modality_dropout, tumour_crop
from training.calibration import fit_temperature
from training.data import CaseArrays, Dataset, split_cases
from training.networks import MultiTaskClassifier
from training.tasks import Classification


def test_unknown_labels_are_masked_out_of_the_loss():
    logits = torch.tensor([[2.0, 0.0], [-1.0, 5.0]], requires_grad=True)
    targets = torch.tensor([[1, -1], [0, -1]])  # task 1 unknown for both cases
    per_task, present = losses.masked_task_losses(logits, targets)
    assert present.tolist() == [True, False]
    assert per_task[1].item() == 0.0
    per_task.sum().backward()
    assert torch.all(logits.grad[:, 1] == 0)  # no gradient flows from unknown labels
    # Changing a masked logit changes nothing.
    other = logits.detach().clone()
    other[:, 1] = -100.0
    assert torch.allclose(losses.masked_task_losses(other, targets)[0], per_task.detach())


def test_uncertainty_weighting_formula_and_learning_signal():
    task_losses = torch.tensor([2.0, 0.5])
    log_sigma = torch.tensor([0.0, np.log(2.0)], requires_grad=True)
    total = losses.uncertainty_weighted(task_losses, torch.tensor([1.0, 1.0]), log_sigma)
    expected = 2.0 / 2 + 0.0 + 0.5 / (2 * 4) + np.log(2.0)
    assert total.item() == pytest.approx(expected)
    total.backward()
    # d/ds [L e^{-2s}/2 + s] = 1 - L e^{-2s}: the weights learn unless exactly balanced.
    assert log_sigma.grad[0].item() == pytest.approx(1 - 2.0)
    # A task absent from the batch adds nothing (its log s term would otherwise drift).
    absent = losses.uncertainty_weighted(task_losses, torch.tensor([1.0, 0.0]), log_sigma.detach())
    assert absent.item() == pytest.approx(1.0)


def test_classifier_loss_uses_the_learned_weights():
    torch.manual_seed(0)
    model = MultiTaskClassifier()
    batch = {"image": torch.randn(2, 4, 32, 32, 32), "presence": torch.ones(2, 4), "cls": torch.tensor([[1, 0, -1, 1], [0, 1, -1, 0]])}
    Classification().loss(model, batch).backward()
    assert model.log_sigma.grad is not None and model.log_sigma.grad[2] == 0  # no labels for task 2
    assert torch.all(model.log_sigma.grad[[0, 1, 3]] != 0)


def test_modality_dropout_blanks_like_a_missing_sequence_and_keeps_one():
    image = np.ones((4, 3, 3, 3), np.float32)
    presence = np.ones(4, np.float32)
    rng = np.random.default_rng(0)
    dropped_any = False
    for _ in range(200):
        img, pres = modality_dropout(image, presence, rng, p=1.0)
        assert 1 <= pres.sum() < 4
        assert np.all(img[pres == 0] == 0) and np.all(img[pres == 1] == 1)
        dropped_any = True
    assert dropped_any
    img, pres = modality_dropout(image, presence, rng, p=0.0)
    assert pres.sum() == 4 and img is image
    single = np.array([0, 0, 1, 0], np.float32)
    assert modality_dropout(image, single, rng, p=1.0)[1].tolist() == single.tolist()


def test_tumour_crop_stays_inside_and_finds_the_tumour():
    seg = np.zeros((40, 40, 40), np.int64)
    seg[30:34, 30:34, 30:34] = 2
    image = np.zeros((4, 40, 40, 40), np.float32)
    img, crop = tumour_crop(image, seg, 16, np.random.default_rng(1), p_tumour=1.0)
    assert img.shape == (4, 16, 16, 16) and crop.shape == (16, 16, 16) and crop.any()


def test_cox_loss_prefers_risk_that_orders_deaths():
    days = torch.tensor([100.0, 200.0, 300.0, 400.0])
    events = torch.tensor([1.0, 1.0, 1.0, 1.0])
    good = losses.cox_partial_likelihood(torch.tensor([3.0, 2.0, 1.0, 0.0]), days, events)
    bad = losses.cox_partial_likelihood(torch.tensor([0.0, 1.0, 2.0, 3.0]), days, events)
    assert good < bad
    assert losses.cox_partial_likelihood(torch.tensor([1.0, 2.0]), days[:2], torch.zeros(2)).item() == 0.0


def test_temperature_scaling_tempers_overconfident_logits():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    # Right 70% of the time but with |logit| = 6 (overconfident).
    correct = rng.random(400) < 0.7
    logits = np.where(correct == (y == 1), 6.0, -6.0)
    temps = fit_temperature(torch.tensor(np.stack([logits] * 4, 1)).float(), torch.tensor(np.stack([y] * 4, 1)))
    assert all(t > 3 for t in temps)
    assert fit_temperature(torch.zeros(3, 4), torch.full((3, 4), -1)) == [1.0] * 4  # nothing to fit on


def _case(i: int, grade: int, idh: int) -> CaseArrays:
    return CaseArrays(f"c{i:02d}", np.zeros((4, 2, 2, 2), np.float32), np.ones(4, np.float32), None,
                      np.array([grade, idh, -1, -1]), 50.0, 100.0, 1, "s", 2.0)  # fmt: skip


def test_split_is_by_case_seeded_disjoint_and_stratified():
    ds = Dataset(root=None, dataset_hash="h", preprocessing="p",
                 cases=[_case(i, i % 2, (i // 2) % 2) for i in range(40)])  # fmt: skip
    a, b = split_cases(ds, seed=3), split_cases(ds, seed=3)
    assert a == b and split_cases(ds, seed=4) != a
    ids = a["train"] + a["val"] + a["test"]
    assert sorted(ids) == sorted(c.case_id for c in ds.cases) and len(set(ids)) == 40
    assert len(a["test"]) >= 4 and len(a["val"]) >= 4
    grades_in_test = {ds.by_id()[i].cls[0] for i in a["test"]}
    assert grades_in_test == {0, 1}


def test_stray_voxels_go_but_multifocal_tumour_stays():
    labels = np.zeros((30, 30, 30), np.uint8)
    labels[2:8, 2:8, 2:8] = 2  # 216 voxels: a lesion
    labels[20:26, 20:26, 20:26] = 4  # a second lesion
    labels[15, 15, 15] = 1  # a stray voxel
    out = remove_stray_voxels(labels, voxel_ml=0.008, min_ml=0.1)
    assert out[15, 15, 15] == 0 and (out == 2).sum() == 216 and (out == 4).sum() == 216


def test_heatmap_box_covers_multifocal_disease():
    heat = np.zeros((20, 20, 20), np.float32)
    heat[2:5, 2:5, 2:5] = 0.9
    heat[12:16, 12:16, 12:16] = 0.8
    loc = heatmap_to_box(heat)
    assert loc.found and loc.bbox_vox.tolist() == [2, 2, 2, 15, 15, 15]
    assert not heatmap_to_box(np.zeros((5, 5, 5))).found


def test_breslow_baseline_and_survival_curve():
    days = np.array([10.0, 20.0, 30.0])
    events = np.array([1, 1, 0])
    times, hazard = breslow_baseline(days, events, np.zeros(3))
    assert times.tolist() == [10.0, 20.0] and hazard == pytest.approx([1 / 3, 1 / 3 + 1 / 2])
    curve = survival_curve(0.0, times, hazard)
    assert curve.probability == pytest.approx(np.exp(-hazard))
    assert curve.median_days == 20.0  # S(20) = exp(-0.83) = 0.43 <= 0.5
    assert survival_curve(-5.0, times, hazard).median_days is None
