"""Score an exported (ONNX) model on preprocessed cases with onnxruntime: the artifact serving will load.

Segmentation runs as serving runs it (the version's sliding window, imaging.sliding_window) and is scored
on each case's own grid against its untouched ground truth (the headline `dice_*` / `hd95_*`, comparable
to BraTS figures), and on the 2 mm model grid against the resampled truth (`model_grid/*`). The other
tasks are scored on the model grid with the shared imaging metrics and post-processing.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from imaging import metrics, sliding_window
from imaging.dataset import read_segmentation
from imaging.labels import CLASS_TO_LABEL
from imaging.native_grid import labels_on_grid
from imaging.postprocess import heatmap_to_box, probabilities_to_labels, remove_stray_voxels, volumes_ml
from imaging.preprocess import Grid
from imaging.study import MODALITIES
from training.data import CLS_TASKS, CaseArrays


def session(path: str, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _mean(values) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def segment(sess, image: np.ndarray, extras: dict) -> sliding_window.WindowedPrediction:
    """Probabilities over a whole (C, X, Y, Z) model-grid image, as serving computes them: the version's
    sliding window (no TTA), or one call for a version exported as a whole-volume network."""
    return sliding_window.predict_version(lambda windows: sess.run(None, {"image": windows})[0], image, extras)


def _native_scores(probs: np.ndarray, case: CaseArrays) -> dict | None:
    """Dice/HD95 on the case's own grid against its ground truth as stored (None when not available)."""
    if case.data_root is None or case.grid_affine is None:
        return None
    truth = read_segmentation(case.data_root, case.case_id)
    if truth is None:
        return None
    target = Grid(truth.shape, truth.affine)
    spacing = tuple(float(s) for s in np.linalg.norm(truth.affine[:3, :3], axis=0))
    voxel_ml = float(abs(np.linalg.det(truth.affine[:3, :3]))) / 1000.0
    pred = remove_stray_voxels(labels_on_grid(probs, Grid(case.image.shape[1:], case.grid_affine), target), voxel_ml)
    return metrics.segmentation_scores(pred, truth.data, spacing)


def evaluate_segmentation(sess, cases: list[CaseArrays], extras: dict) -> dict:
    rows = []
    for c in cases:
        if c.seg_classes is None:
            continue
        probs = segment(sess, c.image, extras).probabilities
        voxel_ml = c.spacing_mm**3 / 1000
        pred = remove_stray_voxels(probabilities_to_labels(probs), voxel_ml)
        truth = CLASS_TO_LABEL[c.seg_classes]
        grid_scores = metrics.segmentation_scores(pred, truth, (c.spacing_mm,) * 3)
        native = _native_scores(probs, c)
        row = {"case_id": c.case_id, "site": c.site, **{f"model_grid/{k}": v for k, v in grid_scores.items()},
               # what serving reports for the study (its region volumes): the output drift reference's values
               **{f"volume_{r}_ml": v for r, v in volumes_ml(pred, voxel_ml).items()}}  # fmt: skip
        # The headline figures are the native grid's; a case without its stored truth keeps the model grid's.
        rows.append(row | (native if native is not None else grid_scores) | {"native_grid": float(native is not None)})
    keys = [k for k in rows[0] if k not in ("case_id", "site") and not k.startswith("volume_")] if rows else []
    result = {k: _mean(r[k] for r in rows) for k in keys} | {"n_cases": len(rows)}
    for region in ("WT", "TC", "ET"):  # the interval of the headline Dice (the mean over cases)
        values = np.array([r[f"dice_{region}"] for r in rows], float)
        result[f"dice_{region}_ci_low"], result[f"dice_{region}_ci_high"] = metrics.bootstrap_ci(np.mean, values)
    return {"metrics": result, "per_case": rows}


def evaluate_localization(sess, cases: list[CaseArrays], extras: dict) -> dict:
    rows = []
    for c in cases:
        if c.seg_classes is None or not (c.seg_classes > 0).any():
            continue
        heat = sess.run(None, {"image": c.image[None]})[0][0, 0]
        loc = heatmap_to_box(heat)
        # 4 mm heatmap voxel -> the 2 mm model grid it covers.
        box = np.concatenate([loc.bbox_vox[:3] * 2, loc.bbox_vox[3:] * 2 + 1])
        centre = loc.centroid_vox * 2 + 0.5
        truth_box = metrics.bbox(c.seg_classes > 0)
        truth_centre = (truth_box[:3] + truth_box[3:]) / 2
        rows.append({
            "case_id": c.case_id,
            "site": c.site,
            "box_iou": metrics.box_iou(box, truth_box),
            "centre_distance_mm": metrics.centre_distance_mm(centre, truth_centre, (c.spacing_mm,) * 3),
            "hit": float(metrics.centre_in_box(centre, truth_box)),
            "tumour_found": float(loc.found),
        })  # fmt: skip
    return {
        "metrics": {"box_iou": _mean(r["box_iou"] for r in rows),
                    "centre_distance_mm": _mean(r["centre_distance_mm"] for r in rows),
                    "hit_rate": _mean(r["hit"] for r in rows), "n_cases": len(rows)},
        "per_case": rows,
    }  # fmt: skip


def _run_classifier(sess, image: np.ndarray, presence: np.ndarray) -> dict[str, np.ndarray]:
    """Named outputs for one case (a version exported before `ood_score` existed has three)."""
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, {"image": image[None], "presence": presence[None]})))


def _classify(sess, cases: list[CaseArrays], drop: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Probabilities, MC std and (where the version has it) the OOD score of each case."""
    probs, stds, oods = [], [], []
    for c in cases:
        image, presence = c.image.copy(), c.presence.copy()
        if drop is not None:
            image[drop], presence[drop] = 0.0, 0.0
        out = _run_classifier(sess, image, presence)
        probs.append(out["probabilities"][0])
        stds.append(out["mc_std"][0])
        if "ood_score" in out:
            oods.append(float(out["ood_score"][0, 0]))
    return np.array(probs), np.array(stds), (np.array(oods) if oods else None)


def _ood_metrics(sess, cases: list[CaseArrays], inside: np.ndarray | None, extras: dict) -> dict:
    """The OOD score measured: AUROC between the test cases (their scores `inside`) and out-of-distribution
    versions of them (training.ood.variants), overall and per kind, and the share flagged at the threshold."""
    from training import ood

    if inside is None or not cases:
        return {}
    rng = np.random.default_rng(0)
    outside: dict[str, list[float]] = {}
    for c in cases:
        for kind, (image, presence) in ood.variants(c.image, c.presence, rng).items():
            outside.setdefault(kind, []).append(float(_run_classifier(sess, image, presence)["ood_score"][0, 0]))
    every = np.concatenate([np.array(v) for v in outside.values()])
    out = {"ood_auroc": metrics.auc(np.r_[np.zeros(len(inside)), np.ones(len(every))], np.r_[inside, every]),
           "ood_n_in_distribution": len(inside), "ood_n_out_of_distribution": len(every)}  # fmt: skip
    for kind, scores in outside.items():
        out[f"ood_auroc_{kind}"] = metrics.auc(np.r_[np.zeros(len(inside)), np.ones(len(scores))], np.r_[inside, scores])
    threshold = (extras.get("ood") or {}).get("threshold")
    if threshold is not None:
        out["ood_flagged_in_distribution"] = float(np.mean(inside > threshold))
        out["ood_flagged_out_of_distribution"] = float(np.mean(every > threshold))
    return out


def _cls_metrics(probs: np.ndarray, labels: np.ndarray, prefix: str = "", temperature: list[float] | None = None) -> dict:
    """AUC, balanced accuracy, F1, ECE and Brier per marker; with `temperature`, ECE and Brier of the
    probabilities before temperature scaling too (`*_uncalibrated`), so the calibration's effect shows."""
    from training.calibration import uncalibrated

    out = {}
    for t, task in enumerate(CLS_TASKS):
        known = labels[:, t] >= 0
        y, p = labels[known, t], probs[known, t]
        out[f"{prefix}{task}_n"] = int(known.sum())
        if known.sum() == 0:
            continue
        out[f"{prefix}{task}_auc"] = metrics.auc(y, p)
        if not prefix:  # the interval of the headline figures (not of every missing-modality variant)
            out[f"{task}_auc_ci_low"], out[f"{task}_auc_ci_high"] = metrics.bootstrap_ci(metrics.auc, y, p)
        out[f"{prefix}{task}_balanced_accuracy"] = metrics.balanced_accuracy(y, p >= 0.5)
        out[f"{prefix}{task}_f1"] = metrics.f1(y, p >= 0.5)
        out[f"{prefix}{task}_ece"] = metrics.ece(y, p)
        out[f"{prefix}{task}_brier"] = metrics.brier(y, p)
        if temperature is not None:
            raw = uncalibrated(p, temperature[t])
            out[f"{prefix}{task}_ece_uncalibrated"] = metrics.ece(y, raw)
            out[f"{prefix}{task}_brier_uncalibrated"] = metrics.brier(y, raw)
    return out


def _marker_baselines(probs: np.ndarray, labels: np.ndarray) -> dict:
    """What a marker's AUC means beside the shortcut a cohort offers: IDH predicted from the grade alone
    (lower grade -> IDH-mutant) on the same cases, and 1p/19q judged only where it is asked in practice,
    within IDH-mutant tumours."""
    out = {}
    grade, idh, codel = labels[:, 0], labels[:, 1], labels[:, 2]
    both = (grade >= 0) & (idh >= 0)
    if both.any():
        out["idh_auc_grade_only"] = metrics.auc(idh[both], 1.0 - grade[both])
        out["idh_auc_same_cases"] = metrics.auc(idh[both], probs[both, 1])
        out["idh_auc_over_grade_only"] = out["idh_auc_same_cases"] - out["idh_auc_grade_only"]
    within = (idh == 1) & (codel >= 0)
    out["codeletion_1p19q_n_within_idh_mutant"] = int(within.sum())
    if within.any():
        out["codeletion_1p19q_auc_within_idh_mutant"] = metrics.auc(codel[within], probs[within, 2])
    return out


def evaluate_classification(sess, cases: list[CaseArrays], extras: dict) -> dict:
    cases = [c for c in cases if (c.cls >= 0).any()]
    labels = np.array([c.cls for c in cases]) if cases else np.zeros((0, 4))
    probs, stds, oods = _classify(sess, cases)
    result = _cls_metrics(probs, labels, temperature=extras.get("temperature", [1.0] * len(CLS_TASKS)))
    result["mean_mc_std"] = float(stds.mean()) if len(stds) else float("nan")
    result |= _marker_baselines(probs, labels)
    result |= _ood_metrics(sess, cases, oods, extras)
    for m, modality in enumerate(MODALITIES):
        # Robustness: the same cases with one modality missing (where it was present).
        with_it = [c for c in cases if c.presence[m] > 0]
        if with_it:
            p, _, _ = _classify(sess, with_it, drop=m)
            result |= _cls_metrics(p, np.array([c.cls for c in with_it]), prefix=f"without_{modality}/")
    rows = [{"case_id": c.case_id, "site": c.site, **{f"p_{t}": float(p[i]) for i, t in enumerate(CLS_TASKS)},
             **{f"label_{t}": int(c.cls[i]) for i, t in enumerate(CLS_TASKS)},
             **({"ood_score": float(oods[k])} if oods is not None else {})} for k, (c, p) in enumerate(zip(cases, probs))]  # fmt: skip
    return {"metrics": result | {"n_cases": len(cases)}, "per_case": rows}


def evaluate_survival(sess, cases: list[CaseArrays], extras: dict) -> dict:
    from lifelines.statistics import logrank_test

    cases = [c for c in cases if c.os_event >= 0 and np.isfinite(c.os_days) and np.isfinite(c.age)]
    risks = np.array([
        float(sess.run(None, {"image": c.image[None], "presence": c.presence[None],
                              "age": np.array([[c.age]], np.float32)})[0][0, 0])
        for c in cases
    ])  # fmt: skip
    days = np.array([c.os_days for c in cases])
    events = np.array([c.os_event for c in cases])
    out = {"n_cases": len(cases)}
    if len(cases) >= 2:
        from training.tasks import clinical_risk

        out["c_index"] = metrics.c_index(days, risks, events)
        out["c_index_ci_low"], out["c_index_ci_high"] = metrics.bootstrap_ci(_c_index_or_nan, days, risks, events)
        # Baselines beside the image model, on the same cases: age alone, and a clinical Cox model (age, grade,
        # IDH) fitted on the training split. The difference is the image's added value.
        ages = np.array([c.age for c in cases])
        out["c_index_age_only"] = metrics.c_index(days, ages, events)
        out["c_index_over_age_only"] = out["c_index"] - out["c_index_age_only"]
        low, high = metrics.bootstrap_ci(lambda d, r, a, e: _c_index_or_nan(d, r, e) - _c_index_or_nan(d, a, e),
                                         days, risks, ages, events)  # fmt: skip
        out["c_index_over_age_only_ci_low"], out["c_index_over_age_only_ci_high"] = low, high
        if extras.get("clinical_baseline"):
            clinical = clinical_risk(extras["clinical_baseline"], cases)
            out["c_index_clinical_only"] = metrics.c_index(days, clinical, events)
            out["c_index_over_clinical"] = out["c_index"] - out["c_index_clinical_only"]
            low, high = metrics.bootstrap_ci(lambda d, r, c, e: _c_index_or_nan(d, r, e) - _c_index_or_nan(d, c, e),
                                             days, risks, clinical, events)  # fmt: skip
            out["c_index_over_clinical_ci_low"], out["c_index_over_clinical_ci_high"] = low, high
        high = risks >= extras.get("risk_threshold", float(np.median(risks)))
        if high.any() and (~high).any():
            test = logrank_test(days[high], days[~high], events[high], events[~high])
            out["logrank_p"] = float(test.p_value)
    rows = [{"case_id": c.case_id, "site": c.site, "risk": float(r), "os_days": float(c.os_days), "os_event": int(c.os_event)}
            for c, r in zip(cases, risks)]  # fmt: skip
    return {"metrics": out, "per_case": rows}


def _c_index_or_nan(days, risk, events) -> float:
    """The c-index of a bootstrap resample; nan where it is undefined (no event, or no comparable pair)."""
    if events.sum() == 0:
        return float("nan")
    try:
        return metrics.c_index(days, risk, events)
    except ZeroDivisionError:  # lifelines: no admissible pairs
        return float("nan")


EVALUATORS = {
    "segmentation": evaluate_segmentation,
    "localization": evaluate_localization,
    "classification": evaluate_classification,
    "survival": evaluate_survival,
}


def evaluate(task: str, onnx_path: str, cases: list[CaseArrays], extras: dict) -> dict:
    return EVALUATORS[task](session(onnx_path), cases, extras)
