"""Study -> findings in one process: preprocess once, run every task's model, map results back to
the input's grid.

Built once (from the registry's champions, or from given backends) and then called many times: by the
CLI, the tests and the benchmark's plain-function baseline. The Serve gateway runs the same steps
(services.task_logic + `assemble`) with each task in its own deployment.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from imaging.preprocess import PreparedStudy, PreprocessConfig, preprocess
from imaging.study import Study, Volume
from serving.backends import InferenceBackend, EmbeddedBackend
from services.schemas import Findings
from services.task_logic import TASKS, ServingError, feeds, infer, postprocess

OOD_THRESHOLD = 0.15  # mean MC-dropout std above which a study is flagged (versions without a measured OOD score)

__all__ = ["TASKS", "ServingError", "Analysis", "StudyAnalyzer", "assemble"]


@dataclass
class Analysis:
    findings: Findings
    mask: Volume  # labels 1/2/4 on the input's reference grid and affine


def assemble(study: Study, preprocessing_version: str, results: dict[str, dict], versions: dict[str, str],
             prepared: PreparedStudy | None = None) -> Analysis:  # fmt: skip
    """Per-task results (task_logic.postprocess output) -> the published findings and the mask."""
    loc = results["localization"]["section"]
    mc_std = results["classification"]["mc_std_mean"]
    ood = results["classification"].get("ood")
    if ood is not None:  # the measured detector (training.ood): Mahalanobis distance vs its validation threshold
        ood_score, ood_flag, method, threshold = ood["score"], ood["flag"], "mahalanobis", ood["threshold"]
    else:
        ood_score, ood_flag, method, threshold = round(mc_std, 4), mc_std > OOD_THRESHOLD, "mc_dropout", OOD_THRESHOLD
    findings = Findings(
        case_id=study.case_id,
        model_versions=versions,
        localization=loc,
        segmentation=results["segmentation"]["section"],
        classification=results["classification"]["section"],
        survival=results["survival"]["section"],
        quality={"missing_modalities": study.missing, "ood_score": ood_score,
                 "ood_flag": bool(ood_flag or not loc["found"]), "ood_method": method, "ood_threshold": threshold,
                 "mc_std_mean": round(mc_std, 4),
                 "preprocessing": prepared.record if prepared is not None else None,
                 "flags": list(prepared.flags) if prepared is not None else [],
                 "implausible": [c for task in TASKS for c in results.get(task, {}).get("implausible", [])]},  # fmt: skip
        preprocessing_version=preprocessing_version,
    )
    return Analysis(findings, results["segmentation"]["mask"])


class StudyAnalyzer:
    def __init__(self, backends: dict[str, InferenceBackend], extras: dict[str, dict],
                 config: PreprocessConfig = PreprocessConfig(), window: dict | None = None):  # fmt: skip
        missing = [t for t in TASKS if t not in backends]
        if missing:
            raise ServingError(f"no backend for {', '.join(missing)}")
        self.backends, self.extras, self.config = backends, extras, config
        self.window = window or {}  # segmentation's sliding-window options (overlap, mirror, batch)

    @classmethod
    def from_registry(cls, registry, store, bucket: str, prefix: str, alias: str = "champion", threads: int = 1) -> "StudyAnalyzer":
        backends, extras = {}, {}
        for task in TASKS:
            version = registry.alias(task, alias)
            if version is None:
                raise ServingError(f"{task} has no `{alias}` version; promote one (oncoserve models promote)")
            backends[task] = EmbeddedBackend.from_version(registry, store, bucket, prefix, task, version, threads=threads)
            extras[task] = json.loads(registry.artifact_text(task, version, "extras.json") or "{}")
        return cls(backends, extras)

    @property
    def versions(self) -> dict[str, str]:
        return {task: backend.version for task, backend in self.backends.items()}

    def run_task(self, task: str, prepared, age: float | None) -> dict:
        extras = self.extras.get(task, {})
        outputs = infer(task, self.backends[task].infer, feeds(task, prepared, age), extras, self.window)
        return postprocess(task, outputs, prepared, self.extras.get(task, {}))

    def analyze(self, study: Study) -> Analysis:
        prepared = preprocess(study, self.config)
        # The four models are independent: run them side by side (onnxruntime releases the GIL).
        with ThreadPoolExecutor(max_workers=len(TASKS)) as pool:
            futures = {task: pool.submit(self.run_task, task, prepared, study.age) for task in TASKS}
            results = {task: future.result() for task, future in futures.items()}
        return assemble(study, prepared.version, results, self.versions, prepared)
