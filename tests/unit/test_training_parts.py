"""Training building blocks that would silently break a model if removed or wrong."""

from __future__ import annotations

import dataclasses

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


def _breslow_by_hand(risk, days, events) -> float:
    """The Breslow partial likelihood written as its definition, one distinct event time at a time."""
    total = 0.0
    for t in np.unique(days[events == 1]):
        dying = (days == t) & (events == 1)
        total += risk[dying].sum() - dying.sum() * np.log(np.exp(risk[days >= t]).sum())
    return -total / events.sum()


def test_cox_loss_with_ties_matches_lifelines_efron_and_breslow_by_hand_whatever_the_order():
    import pandas as pd
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(4)
    n = 40
    x = rng.normal(size=n)
    days = rng.choice([100.0, 200.0, 300.0, 400.0, 500.0], size=n)  # heavy ties
    events = (rng.random(n) < 0.7).astype(float)
    fitted = CoxPHFitter().fit(pd.DataFrame({"x": x, "T": days, "E": events}), "T", "E")  # lifelines: Efron ties
    risk = fitted.params_["x"] * x
    efron = losses.cox_partial_likelihood(torch.tensor(risk), torch.tensor(days), torch.tensor(events))
    assert efron.item() == pytest.approx(-fitted.log_likelihood_ / events.sum(), rel=1e-6)
    breslow = losses.cox_partial_likelihood(torch.tensor(risk), torch.tensor(days), torch.tensor(events), ties="breslow")
    assert breslow.item() == pytest.approx(_breslow_by_hand(risk, days, events), rel=1e-9)
    assert breslow.item() != pytest.approx(efron.item(), rel=1e-3)  # the ties matter here
    for seed in range(5):
        p = np.random.default_rng(seed).permutation(n)
        for ties, reference in (("efron", efron), ("breslow", breslow)):
            permuted = losses.cox_partial_likelihood(torch.tensor(risk[p]), torch.tensor(days[p]), torch.tensor(events[p]), ties=ties)
            assert permuted.item() == pytest.approx(reference.item(), rel=1e-9)
    # Without ties the two are the same likelihood; the gradient flows; a large risk does not overflow.
    distinct = torch.tensor(np.arange(1.0, n + 1)), torch.tensor(events)
    r = torch.tensor(x * 50, requires_grad=True)
    a = losses.cox_partial_likelihood(r, *distinct)
    assert a.item() == pytest.approx(losses.cox_partial_likelihood(r, *distinct, ties="breslow").item(), rel=1e-9)
    a.backward()
    assert torch.isfinite(a) and torch.isfinite(r.grad).all() and r.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="ties"):
        losses.cox_partial_likelihood(r, *distinct, ties="exact")


def test_temperature_scaling_tempers_overconfident_logits_within_its_bounds():
    from training.calibration import BOUNDS, MIN_CASES, fit_temperatures, uncalibrated

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    # Right 70% of the time but with |logit| = 2 (overconfident: the calibrated |logit| is logit(0.7) = 0.85).
    correct = rng.random(400) < 0.7
    logits = torch.tensor(np.where(correct == (y == 1), 2.0, -2.0)[:, None]).float()
    (fit,) = fit_temperatures(logits, torch.tensor(y[:, None]))
    assert fit.fitted and 2.0 < fit.temperature < 2.8 and fit.nll_after < fit.nll_before
    # Nine separable cases: the unbounded optimum is T -> 0; too few cases to fit, so T stays 1, said.
    few = torch.tensor([[-3.0], [-2], [-1], [-0.5], [0.5], [1], [2], [3], [4]])
    (small,) = fit_temperatures(few, torch.tensor([[0], [0], [0], [0], [1], [1], [1], [1], [1]]))
    assert small.temperature == 1.0 and not small.fitted and "too few" in small.why
    # Enough separable cases: sharpening stops at the bound instead of running to zero.
    many = torch.tensor(np.r_[-np.linspace(0.5, 3, 30), np.linspace(0.5, 3, 30)][:, None]).float()
    (sep,) = fit_temperatures(many, torch.tensor(np.r_[np.zeros(30), np.ones(30)][:, None]).long())
    assert sep.temperature == pytest.approx(BOUNDS[0], rel=1e-3) and "at the bound" in sep.why
    assert fit_temperature(torch.zeros(3, 4), torch.full((3, 4), -1)) == [1.0] * 4  # nothing to fit on
    assert MIN_CASES >= 20
    p = torch.sigmoid(logits[:, 0] / fit.temperature).numpy()
    assert np.allclose(uncalibrated(p, fit.temperature), torch.sigmoid(logits[:, 0]).numpy(), atol=1e-6)


def test_calibration_lowers_ece_and_brier_on_held_out_cases():
    from imaging.metrics import brier, ece
    from training.calibration import fit_temperatures

    rng = np.random.default_rng(3)

    def cohort(n):  # a true logit, seen through an overconfident model (x3)
        true = rng.normal(0, 1.5, n)
        return 3 * true, (rng.random(n) < 1 / (1 + np.exp(-true))).astype(int)

    z_val, y_val = cohort(300)
    z_test, y_test = cohort(2000)
    (fit,) = fit_temperatures(torch.tensor(z_val[:, None]), torch.tensor(y_val[:, None]))
    before, after = 1 / (1 + np.exp(-z_test)), 1 / (1 + np.exp(-z_test / fit.temperature))
    assert ece(y_test, after) < 0.05 < ece(y_test, before)
    assert brier(y_test, after) < brier(y_test, before)


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


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience():
    from training.early_stopping import EarlyStopping

    stop = EarlyStopping(patience=2)
    improved = [stop.update(e, v) for e, v in enumerate([1.0, 0.8, 0.9, 0.85])]
    assert improved == [True, True, False, False] and stop.best_epoch == 1 and stop.should_stop
    assert stop.reason(4, 10).startswith("epoch 1, the lowest validation metric (0.8000); stopped after epoch 3")
    resumed = EarlyStopping.from_state(EarlyStopping(patience=2, best_value=0.8, best_epoch=1, stale=1).state(), 2)
    assert not resumed.should_stop and resumed.update(2, 0.7) and resumed.best_epoch == 2 and resumed.stale == 0
    never = EarlyStopping(patience=None)
    for e in range(50):
        never.update(e, 1.0)
    assert not never.should_stop and never.best_epoch == 0 and "all 50 epochs ran" in never.reason(50, 50)
    blind = EarlyStopping(patience=3)  # no validation case: the latest epoch is kept, nothing stops
    assert blind.update(0, float("nan")) and blind.update(1, float("nan")) and blind.best_epoch == 1
    assert not blind.should_stop and "no validation case" in blind.reason(2, 2)


def test_exported_classifier_gives_the_same_uncertainty_for_the_same_study(tmp_path):
    from training import tasks
    from training.export import export_onnx
    from training.evaluate import session

    torch.manual_seed(0)
    net = MultiTaskClassifier().eval()
    rng = np.random.default_rng(1)
    case = CaseArrays("c", rng.standard_normal((4, 32, 32, 32)).astype(np.float32), np.ones(4, np.float32), None,
                      np.array([1, 0, -1, -1]), 50.0, 100.0, 1, "s", 2.0)  # fmt: skip
    exported = export_onnx(tasks.get("classification"), net, {}, case, tmp_path / "model.onnx")
    assert exported.parity_ok  # MC outputs included: torch and onnxruntime agree draw for draw
    sess = session(str(exported.path))
    feeds = {"image": case.image[None], "presence": case.presence[None]}
    first, second = sess.run(None, feeds), sess.run(None, feeds)
    assert np.array_equal(first[2], second[2]) and np.array_equal(first[1], second[1])
    assert (first[2] > 0).all()  # the samples differ from each other: a real spread, not a constant
    other = sess.run(None, {"image": (case.image * 0.5 + 1)[None], "presence": case.presence[None]})
    assert not np.array_equal(other[2], first[2])  # a different study, a different uncertainty
    # The masks thin the encoder's features as well as the hidden layer.
    graph = tasks.get("classification").export_module(net, {})
    assert (graph.feature_keep == 0).any() and (graph.hidden_keep == 0).any()
    # Beside the graph: the parity input and torch's output, which `oncoserve compile` checks runtimes against.
    with np.load(tmp_path / "reference.npz") as ref:
        assert sorted(ref.files) == ["input.image", "input.presence", "output.mc_mean", "output.mc_std",
                                     "output.ood_score", "output.probabilities"]  # fmt: skip
        assert np.array_equal(ref["input.image"], feeds["image"])
        np.testing.assert_allclose(ref["output.mc_std"], first[2], atol=1e-4)


def test_clinical_baseline_is_a_cox_model_on_age_grade_and_idh_from_the_training_split():
    from imaging import metrics
    from training.tasks import clinical_risk, fit_clinical_baseline

    rng = np.random.default_rng(2)

    def cohort(n):
        cases = []
        for i in range(n):
            age, grade, idh = rng.uniform(30, 80), int(rng.integers(0, 2)), int(rng.integers(0, 2))
            hazard = np.exp(0.05 * (age - 55) + 0.8 * grade - 0.7 * idh)
            days = float(rng.exponential(1000 / hazard))
            cls = np.array([grade, idh if rng.random() > 0.3 else -1, -1, -1])  # IDH unknown in 30 %
            cases.append(CaseArrays(f"c{i}", np.zeros((4, 2, 2, 2), np.float32), np.ones(4, np.float32), None, cls,
                                    age, days, int(rng.random() < 0.8), "s", 2.0))  # fmt: skip
        return cases

    train, test = cohort(120), cohort(200)
    baseline = fit_clinical_baseline(train)
    assert baseline["columns"] == ["age", "grade", "idh"]
    age_coef, grade_coef, idh_coef = baseline["coef"]
    assert age_coef > 0 and grade_coef > 0 and idh_coef < 0  # the signs of the cohort's hazards
    risk = clinical_risk(baseline, test)
    days, events = np.array([c.os_days for c in test]), np.array([c.os_event for c in test])
    assert metrics.c_index(days, risk, events) > metrics.c_index(days, np.array([c.age for c in test]), events)
    assert fit_clinical_baseline(train[:3]) is None  # too few cases to fit on: no baseline, said by its absence


def _ood_cases(n: int, rng) -> list[CaseArrays]:
    """Brain-like cases: a z-scored ellipsoid of correlated sequences in a zero background."""
    grid = np.mgrid[:32, :32, :32].astype(np.float32)
    cases = []
    for i in range(n):
        radius = rng.uniform(9, 12)
        brain = ((grid - 16) ** 2).sum(axis=0) < radius**2
        base = rng.standard_normal((32, 32, 32)).astype(np.float32)
        image = np.stack([base + rng.normal(0, 0.5 + 0.1 * c, base.shape) for c in range(4)]).astype(np.float32)
        image = (image - image[:, brain].mean(axis=1)[:, None, None, None]) / image[:, brain].std(axis=1)[:, None, None, None]
        presence = np.ones(4, np.float32)
        if i % 5 == 4:  # some studies lack a sequence: not foreign for that
            presence[1] = 0
        image = (image * brain * presence[:, None, None, None]).astype(np.float32)
        cases.append(CaseArrays(f"c{i}", image, presence, None, np.array([1, 0, -1, -1]), 50.0, 100.0, 1, "s", 2.0))
    return cases


def test_ood_score_is_a_mahalanobis_distance_in_the_exported_graph_and_separates_foreign_inputs(tmp_path):
    from training import ood, tasks
    from training.evaluate import _classify, _ood_metrics, session
    from training.export import export_onnx

    rng = np.random.default_rng(0)
    cases = _ood_cases(40, rng)
    stats = lambda cs: ood.case_statistics([c.image for c in cs], [c.presence for c in cs])  # noqa: E731
    fitted = ood.fit(stats(cases[:24]), stats(cases[24:36]))
    val_scores = ood.distance(*stats(cases[24:36]), fitted["mean"], fitted["whiten"])
    assert fitted["threshold"] > val_scores.max() and "99.9% quantile of a scaled chi-square" in fitted["rule"]
    assert "fitted to 12 validation cases" in fitted["rule"]
    assert "maximum of 2 validation" in ood.fit(stats(cases[:24]), stats(cases[24:26]))["rule"]
    assert ood.fit(stats(cases[:1]), stats(cases[24:27])) is None
    # A missing sequence takes the training mean: the study with T1ce missing is not far for that.
    missing = ood.distance(*stats([cases[39]]), fitted["mean"], fitted["whiten"])[0]
    assert missing < 3 * np.median(val_scores), (missing, val_scores)

    torch.manual_seed(0)
    net = MultiTaskClassifier().eval()
    extras = {"ood": fitted}
    exported = export_onnx(tasks.get("classification"), net, extras, cases[0], tmp_path / "m.onnx")
    assert exported.parity_ok and [o["name"] for o in exported.outputs][-1] == "ood_score"
    sess = session(str(exported.path))
    for case in (cases[36], cases[39]):  # the graph computes training.ood's distance, missing sequences included
        got = sess.run(None, {"image": case.image[None], "presence": case.presence[None]})[3][0, 0]
        assert got == pytest.approx(ood.distance(*stats([case]), fitted["mean"], fitted["whiten"])[0], rel=1e-3)
    measured = _ood_metrics(sess, cases[36:40], _classify(sess, cases[36:40])[2], extras)
    assert set(measured) >= {"ood_auroc", "ood_auroc_not_brain", "ood_auroc_wrong_sequence", "ood_auroc_corrupt",
                             "ood_auroc_intensity_shift", "ood_flagged_in_distribution", "ood_flagged_out_of_distribution"}  # fmt: skip
    assert measured["ood_n_out_of_distribution"] == 16 and measured["ood_auroc"] >= 0.9, measured
    kinds = ood.variants(cases[0].image, cases[0].presence, rng)
    assert kinds["wrong_sequence"][0][0].tolist() == cases[0].image[3].tolist()
    assert not kinds["corrupt"][0][:, :, :16].any()  # half the volume lost


def test_survival_evaluation_reports_the_c_index_interval_beside_age_only_and_clinical_baselines(tmp_path):
    from training import tasks
    from training.evaluate import evaluate
    from training.export import export_onnx
    from training.networks import CoxSurvivalNet

    rng = np.random.default_rng(5)
    cases = []
    for i in range(30):
        age, grade = float(rng.uniform(30, 80)), int(rng.integers(0, 2))
        days = float(rng.exponential(1000 / np.exp(0.04 * (age - 55) + 0.7 * grade)))
        cases.append(CaseArrays(f"c{i}", rng.standard_normal((4, 32, 32, 32)).astype(np.float32), np.ones(4, np.float32),
                                None, np.array([grade, -1, -1, -1]), age, days, int(rng.random() < 0.8), "s", 2.0))  # fmt: skip
    task = tasks.get("survival")
    torch.manual_seed(0)
    net = CoxSurvivalNet().eval()
    extras = {"clinical_baseline": tasks.fit_clinical_baseline(cases[:20]), "risk_threshold": 0.0}
    exported = export_onnx(task, net, extras, cases[0], tmp_path / "s.onnx")
    m = evaluate("survival", str(exported.path), cases[20:], extras)["metrics"]
    assert m["n_cases"] == 10 and m["c_index_ci_low"] <= m["c_index"] <= m["c_index_ci_high"]
    assert m["c_index_over_clinical"] == pytest.approx(m["c_index"] - m["c_index_clinical_only"])
    assert m["c_index_over_clinical_ci_low"] <= m["c_index_over_clinical"] <= m["c_index_over_clinical_ci_high"]
    assert m["c_index_over_age_only"] == pytest.approx(m["c_index"] - m["c_index_age_only"])
    assert m["c_index_over_age_only_ci_low"] <= m["c_index_over_age_only"] <= m["c_index_over_age_only_ci_high"]
    assert 0 <= m["c_index_age_only"] <= 1 and m["c_index_clinical_only"] > 0.5  # age and grade carry this cohort's hazard


def test_tumour_burden_reads_volume_and_separate_foci_off_the_segmentation():
    from training.tasks import tumour_burden

    seg = np.zeros((40, 40, 40), np.int64)
    seg[5:15, 5:15, 5:15] = 2  # 1000 voxels of 2 mm = 8 mL
    one = CaseArrays("a", np.zeros((4, 40, 40, 40), np.float32), np.ones(4, np.float32), seg.copy(),
                     np.array([1, 0, -1, -1]), 50.0, 100.0, 1, "s", 2.0)  # fmt: skip
    assert tumour_burden(one) == pytest.approx((np.log(8.0 / 30.0), 0.0))
    seg[30:34, 30:34, 30:34] = 1  # a second focus of 0.512 mL
    seg[20, 20, 20] = 1  # a single stray voxel (0.008 mL) is no focus
    two = dataclasses.replace(one, seg_classes=seg)
    volume, multifocal = tumour_burden(two)
    assert volume == pytest.approx(np.log((1000 + 64 + 1) * 0.008 / 30.0)) and multifocal == 1.0
    assert all(np.isnan(tumour_burden(dataclasses.replace(one, seg_classes=None))))


def test_the_survival_loss_supervises_the_image_findings_only_where_labels_are_known():
    from training import losses, tasks
    from training.networks import SURVIVAL_FINDINGS, CoxSurvivalNet

    rng = np.random.default_rng(3)
    seg = np.zeros((32, 32, 32), np.int64)
    seg[4:12, 4:12, 4:12] = 3

    def case(i, labels, segmentation):
        return CaseArrays(f"c{i}", rng.standard_normal((4, 32, 32, 32)).astype(np.float32), np.ones(4, np.float32),
                          segmentation, np.array(labels), 40.0 + 5 * i, 100.0 * (i + 1), 1, "s", 2.0)  # fmt: skip

    task = tasks.get("survival")
    torch.manual_seed(0)
    net = CoxSurvivalNet()
    labelled = task.make_batch([case(i, [1, 0, 1, 0], seg) for i in range(4)], rng, train=False)
    unlabelled = task.make_batch([case(i, [-1, -1, -1, -1], None) for i in range(4)], rng, train=False)
    risk, findings, _ = net.parts(unlabelled["image"], unlabelled["presence"], unlabelled["age"])
    assert findings.shape == (4, len(SURVIVAL_FINDINGS)) and torch.equal(risk, net(unlabelled["image"], unlabelled["presence"], unlabelled["age"]))
    cox_only = losses.cox_partial_likelihood(risk, unlabelled["days"], unlabelled["event"])
    assert task.loss(net, unlabelled).item() == pytest.approx(cox_only.item())  # nothing known, nothing added
    risk, _, _ = net.parts(labelled["image"], labelled["presence"], labelled["age"])
    assert task.loss(net, labelled).item() > losses.cox_partial_likelihood(risk, labelled["days"], labelled["event"]).item()
    with torch.no_grad():
        net.head.weight[:, 1:] = 0.0  # the hazard ignores the findings: their gradient is their own supervision
    for batch, supervised in ((unlabelled, False), (labelled, True)):
        net.zero_grad()
        task.loss(net, batch).backward()
        per_finding = net.findings.weight.grad.abs().sum(dim=1)
        assert bool((per_finding > 0).all()) if supervised else float(per_finding.sum()) == 0.0


def test_the_hazard_is_refitted_as_the_best_cox_model_of_its_covariates_and_kept_with_too_few_events():
    from lifelines.utils import concordance_index

    from training.networks import CoxSurvivalNet
    from training.tasks import MIN_REFIT_EVENTS, refit_hazard

    rng = np.random.default_rng(11)
    n = 120
    x = np.column_stack([rng.normal(0, 1, n), rng.random(n), rng.random(n), rng.random(n), rng.random(n),
                         rng.normal(0, 1, n), np.zeros(n)]).astype(np.float32)  # multifocality never varies
    lp = 0.8 * x[:, 0] + 1.5 * x[:, 1]  # age and grade carry the hazard
    days = rng.exponential(1000 / np.exp(lp))
    events = (rng.random(n) < 0.85).astype(float)
    net = CoxSurvivalNet()
    assert float(net(torch.zeros(2, 4, 32, 32, 32), torch.ones(2, 4), torch.tensor([[30.0], [80.0]])).abs().max()) == 0.0  # flat at start
    record = refit_hazard(net, x, days, events)
    coef = record["coefficients"]
    assert record["refitted"] and coef["age_decades"] > 0.4 and coef["p_grade"] > 0.7 and coef["p_multifocal"] == 0.0
    with torch.no_grad():
        risk = net.head(torch.from_numpy(x)).flatten().numpy()
    assert abs(risk.mean()) < 1e-4 and concordance_index(days, -risk, events) > 0.7
    untouched = CoxSurvivalNet()
    few = np.zeros(n)
    few[: MIN_REFIT_EVENTS - 1] = 1
    kept = refit_hazard(untouched, x, days, few)
    assert not kept["refitted"] and "events" in kept["why"] and float(untouched.head.weight.abs().sum()) == 0.0


def test_a_driver_aimed_at_no_cluster_fails_at_once_naming_it():
    import socket

    from training.errors import TrainingError
    from training.jobs import require_cluster

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(TrainingError, match=f"no Ray cluster answers at 127.0.0.1:{port}.*ONCOSERVE_RAY_CLUSTER"):
        require_cluster(f"127.0.0.1:{port}")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        require_cluster(f"127.0.0.1:{listening.getsockname()[1]}")
    require_cluster("auto")  # Ray finds the cluster itself (a RayJob's driver)


def test_two_writers_of_one_cached_case_never_take_each_others_temporary_file(tmp_path):
    """Trainings running side by side preprocess the same case into the same cache (tests.conftest
    `trained` runs two at a time); with one shared temporary name a rename failed with ENOENT."""
    import threading

    import numpy as np

    from training.data import save_atomically

    path, start, errors = tmp_path / "case.npz", threading.Barrier(2), []

    def write(value: int) -> None:
        start.wait()
        for _ in range(50):
            try:
                save_atomically(path, image=np.full((8, 8, 8), value, np.float16), meta="{}")
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=write, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with np.load(path) as z:
        assert z["image"][0, 0, 0] in (1, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["case.npz"]  # no temporary file left behind
