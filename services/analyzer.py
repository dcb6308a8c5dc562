"""Study -> findings: preprocess once, run every task's model, map results back to the input's grid.

The predictor object is built once (from the registry's champions, or from given backends) and then
called many times: by the Ray Serve gateway replicas, the CLI and the benchmarks alike.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from imaging.postprocess import (
    heatmap_to_box,
    probabilities_to_labels,
    remove_stray_voxels,
    survival_curve,
    volumes_ml,
)
from imaging.preprocess import PreparedStudy, box_to_source, labels_to_source, points_to_source, preprocess
from imaging.study import CLASS_LABELS, Study, Volume
from serving.backends import InferenceBackend, OnnxRuntimeBackend
from services.schemas import Findings

TASKS = ("localization", "segmentation", "classification", "survival")
OOD_THRESHOLD = 0.15  # mean MC-dropout std above which a study is flagged as unlike the training data
CURVE_POINTS = 40


class ServingError(RuntimeError):
    """The platform cannot serve a request (a task without a champion, a model that will not load)."""


@dataclass
class Analysis:
    findings: Findings
    mask: Volume  # labels 1/2/4 on the input's reference grid and affine


class StudyAnalyzer:
    def __init__(self, backends: dict[str, InferenceBackend], extras: dict[str, dict]):
        missing = [t for t in TASKS if t not in backends]
        if missing:
            raise ServingError(f"no backend for {', '.join(missing)}")
        self.backends, self.extras = backends, extras

    @classmethod
    def from_registry(cls, registry, store, bucket: str, prefix: str, alias: str = "champion", threads: int = 1) -> "StudyAnalyzer":
        backends, extras = {}, {}
        for task in TASKS:
            version = registry.alias(task, alias)
            if version is None:
                raise ServingError(f"{task} has no `{alias}` version; promote one (oncoserve models promote)")
            backends[task] = OnnxRuntimeBackend.from_version(registry, store, bucket, prefix, task, version, threads=threads)
            extras[task] = json.loads(registry.artifact_text(task, version, "extras.json") or "{}")
        return cls(backends, extras)

    @property
    def versions(self) -> dict[str, str]:
        return {task: backend.version for task, backend in self.backends.items()}

    def analyze(self, study: Study) -> Analysis:
        prepared = preprocess(study)
        image, presence = prepared.image[None], prepared.presence[None]
        feeds = {
            "localization": {"image": image},
            "segmentation": {"image": image},
            "classification": {"image": image, "presence": presence},
            "survival": {"image": image, "presence": presence, "age": np.array([[study.age or 60.0]], np.float32)},
        }
        # The four models are independent: run them side by side (onnxruntime releases the GIL).
        with ThreadPoolExecutor(max_workers=len(TASKS)) as pool:
            futures = {task: pool.submit(self.backends[task].infer, feeds[task]) for task in TASKS}
            outputs = {task: future.result() for task, future in futures.items()}
        mask = self._segmentation(outputs["segmentation"]["probabilities"][0], prepared)
        voxel_ml = float(abs(np.linalg.det(mask.affine[:3, :3]))) / 1000.0
        loc = self._localization(outputs["localization"]["heatmap"][0, 0], prepared)
        cls = self._classification(outputs["classification"])
        mc_std = float(np.mean(outputs["classification"]["mc_std"][0]))
        findings = Findings(
            case_id=study.case_id,
            model_versions=self.versions,
            localization=loc,
            segmentation={"volumes_ml": volumes_ml(mask.data, voxel_ml), "mask": "segmentation.nii.gz"},
            classification=cls,
            survival=self._survival(float(outputs["survival"]["risk"][0, 0])),
            quality={"missing_modalities": study.missing, "ood_score": round(mc_std, 4),
                     "ood_flag": bool(mc_std > OOD_THRESHOLD or not loc["found"])},  # fmt: skip
            preprocessing_version=prepared.version,
        )
        return Analysis(findings, mask)

    def _segmentation(self, probs: np.ndarray, prepared: PreparedStudy) -> Volume:
        spacing = float(prepared.grid.affine[0, 0])
        labels = remove_stray_voxels(probabilities_to_labels(probs), spacing**3 / 1000.0)
        return labels_to_source(labels, prepared)

    def _localization(self, heatmap: np.ndarray, prepared: PreparedStudy) -> dict:
        loc = heatmap_to_box(heatmap)
        # 4 mm heatmap voxel -> the 2 mm model-grid voxels it covers -> the input grid.
        box = np.concatenate([loc.bbox_vox[:3] * 2, loc.bbox_vox[3:] * 2 + 1])
        centre = loc.centroid_vox * 2 + 0.5
        return {"found": loc.found,
                "bbox_vox": [round(float(v), 1) for v in box_to_source(box, prepared)],
                "centroid_vox": [round(float(v), 1) for v in points_to_source(centre[None], prepared)[0]]}  # fmt: skip

    def _classification(self, out: dict) -> dict:
        probs, stds = out["probabilities"][0], out["mc_std"][0]
        result = {}
        for i, (task, (negative, positive)) in enumerate(CLASS_LABELS.items()):
            p = float(probs[i])
            result[task] = {"label": positive if p >= 0.5 else negative,
                            "probabilities": {negative: round(1 - p, 4), positive: round(p, 4)},
                            "uncertainty": round(float(stds[i]), 4)}  # fmt: skip
        return result

    def _survival(self, risk: float) -> dict:
        extras = self.extras.get("survival", {})
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
