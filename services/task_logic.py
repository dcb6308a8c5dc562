"""What each task does around its model: the inputs it takes from a prepared study (preprocess) and
how its outputs become a section of the findings (postprocess).

One implementation, used by the Serve task deployments and by the in-process StudyAnalyzer alike, so
the platform and the plain-function baseline of the benchmark run exactly the same code.
"""

from __future__ import annotations

import numpy as np

from imaging import sliding_window
from imaging.native_grid import labels_on_grid
from imaging.postprocess import heatmap_to_box, remove_stray_voxels, survival_curve, volumes_ml
from imaging.preprocess import PreparedStudy, PreprocessConfig, box_to_source, points_to_source
from imaging.study import CLASS_LABELS, Volume
from services import plausibility
from serving.tasks import MODEL_TASKS

TASKS = MODEL_TASKS
CURVE_POINTS = 40
MIDLINE_MM = 5.0  # tumour centre within this distance of the brain's centre plane: "midline"
DEFAULT_AGE = 60.0  # survival's age input when a study has none (the training cohort's centre)


def preprocess_config(settings) -> PreprocessConfig:
    """The preprocessing the platform's settings ask for (model grid fixed by the serving contract)."""
    return PreprocessConfig(skull_strip=settings.skull_strip, quality_mode=settings.quality_mode,
                            hdbet_weights=str(settings.hdbet_weights) if settings.hdbet_weights else None)  # fmt: skip


class ServingError(RuntimeError):
    """The platform cannot serve a request (a task without a champion, a model that will not load)."""


def feeds(task: str, prepared: PreparedStudy, age: float | None) -> dict[str, np.ndarray]:
    """The model inputs of `task` for one study (batch axis of 1)."""
    image, presence = prepared.image[None], prepared.presence[None]
    if task in ("localization", "segmentation"):
        return {"image": image}
    if task == "classification":
        return {"image": image, "presence": presence}
    if task == "survival":
        return {"image": image, "presence": presence, "age": np.array([[age or DEFAULT_AGE]], np.float32)}
    raise ServingError(f"unknown task {task!r}")


def infer(task: str, run, inputs: dict[str, np.ndarray], extras: dict, window: dict | None = None) -> dict[str, np.ndarray]:
    """The model's outputs for one study's inputs. `run` is the model call (named inputs -> named outputs).

    A segmentation version trained on patches (its extras name the window) runs as a sliding window over
    the model grid, with the serving options `window` (overlap, mirror, batch) on top of the version's own;
    its outputs then carry `tta_disagreement` when mirroring ran. Every other model is one call.
    """
    if task != "segmentation":
        return run(inputs)
    result = sliding_window.predict_version(lambda windows: run({"image": windows})["probabilities"],
                                            inputs["image"][0], extras, **(window or {}))  # fmt: skip
    out = {"probabilities": result.probabilities[None]}
    if result.disagreement is not None:
        out["tta_disagreement"] = np.array([[result.disagreement]], np.float32)
    return out


def postprocess(task: str, outputs: dict[str, np.ndarray], prepared: PreparedStudy, extras: dict) -> dict:
    """One study's outputs -> {"section": findings section, and "mask" / "mc_std_mean" where they apply}."""
    if task == "localization":
        return {"section": _localization(outputs["heatmap"][0, 0], prepared)}
    if task == "segmentation":
        mask = _segmentation(outputs["probabilities"][0], prepared)
        voxel_ml = float(abs(np.linalg.det(mask.affine[:3, :3]))) / 1000.0
        volumes = volumes_ml(mask.data, voxel_ml)
        brain_ml = float(prepared.brain_mask.sum()) * float(abs(np.linalg.det(prepared.grid.affine[:3, :3]))) / 1000.0
        section = {"volumes_ml": volumes, "mask": "segmentation.nii.gz"}
        if "tta_disagreement" in outputs:  # mirroring TTA: 1 - mean Dice of the 8 passes to their consensus
            section["uncertainty"] = {"tta_disagreement": round(float(outputs["tta_disagreement"][0, 0]), 4), "passes": len(sliding_window.MIRROR_AXES)}
        return {"section": section, "mask": mask,
                "implausible": plausibility.segmentation_checks(volumes, brain_ml, extras.get("training_volumes_ml"))}  # fmt: skip
    if task == "classification":
        return {"section": _classification(outputs), "mc_std_mean": float(np.mean(outputs["mc_std"][0])),
                "ood": _ood(outputs, extras),
                "implausible": plausibility.classification_checks(outputs["probabilities"][0])}  # fmt: skip
    if task == "survival":
        return {"section": _survival(float(outputs["risk"][0, 0]), extras)}
    raise ServingError(f"unknown task {task!r}")


def _segmentation(probs: np.ndarray, prepared: PreparedStudy) -> Volume:
    """Probabilities resampled onto the study's own grid, labelled there, stray clusters dropped there."""
    labels = labels_on_grid(probs, prepared.grid, prepared.source)
    voxel_ml = float(abs(np.linalg.det(prepared.source.affine[:3, :3]))) / 1000.0
    return Volume(remove_stray_voxels(labels, voxel_ml), prepared.source.affine)


def _localization(heatmap: np.ndarray, prepared: PreparedStudy) -> dict:
    loc = heatmap_to_box(heatmap)
    # 4 mm heatmap voxel -> the 2 mm model-grid voxels it covers -> the input grid.
    box = np.concatenate([loc.bbox_vox[:3] * 2, loc.bbox_vox[3:] * 2 + 1])
    centre = loc.centroid_vox * 2 + 0.5
    return {"found": loc.found,
            "bbox_vox": [round(float(v), 1) for v in box_to_source(box, prepared)],
            "centroid_vox": [round(float(v), 1) for v in points_to_source(centre[None], prepared)[0]],
            "hemisphere": _hemisphere(centre, prepared) if loc.found else None}  # fmt: skip


def _hemisphere(centre_vox: np.ndarray, prepared: PreparedStudy) -> str:
    """Side of the tumour centre relative to the brain's own centre (RAS: +x is the patient's right),
    so it does not depend on where the scanner put the world origin."""
    brain = np.argwhere(prepared.brain_mask).mean(axis=0)
    dx = float(prepared.grid.vox_to_world(centre_vox[None])[0, 0] - prepared.grid.vox_to_world(brain[None])[0, 0])
    if abs(dx) < MIDLINE_MM:
        return "midline"
    return "right" if dx > 0 else "left"


def _classification(out: dict) -> dict:
    probs, stds = out["probabilities"][0], out["mc_std"][0]
    result = {}
    for i, (task, (negative, positive)) in enumerate(CLASS_LABELS.items()):
        p = float(probs[i])
        result[task] = {"label": positive if p >= 0.5 else negative,
                        "probabilities": {negative: round(1 - p, 4), positive: round(p, 4)},
                        "uncertainty": round(float(stds[i]), 4)}  # fmt: skip
    return result


def _ood(outputs: dict, extras: dict) -> dict | None:
    """The classifier's Mahalanobis OOD score against its validation threshold (training.ood), for a
    version that has both; None for an older one (the MC-dropout score stands in)."""
    threshold = (extras.get("ood") or {}).get("threshold")
    if "ood_score" not in outputs or threshold is None:
        return None
    score = float(outputs["ood_score"][0, 0])
    return {"score": round(score, 4), "threshold": round(float(threshold), 4), "flag": score > threshold}


def _survival(risk: float, extras: dict) -> dict:
    days = np.asarray(extras.get("baseline_days", []), dtype=float)
    hazard = np.asarray(extras.get("baseline_hazard", []), dtype=float)
    if days.size == 0:
        raise ServingError("survival model has no baseline hazard (extras.json)")
    curve = survival_curve(risk, days, hazard)
    keep = np.unique(np.linspace(0, days.size - 1, min(CURVE_POINTS, days.size)).astype(int))
    return {"risk_score": round(risk, 4),
            "risk_group": "high" if risk >= extras.get("risk_threshold", 0.0) else "low",
            "median_survival_days": curve.median_days,
            "curve": [{"days": float(curve.days[i]), "probability": round(float(curve.probability[i]), 4)} for i in keep]}  # fmt: skip
