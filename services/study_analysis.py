"""One study analysis for every protocol: REST `studies:analyze` / `{task}:predict` and gRPC `Analyze`.

  preprocess  once, in a worker thread (the same `imaging` code as training); a failed quality check
              is a 422 naming it
  fan out     one copy in Ray's object store, every task deployment called in parallel, with the
              study's place in each task's traffic policy (serving.traffic: canary and shadow routing)
  assemble    the per-task sections into the published findings and the mask (services.analyzer)
  report      the reporting deployment's grounded report; its failure never loses the analysis
  encode      the mask as .nii.gz (gzip level 1) and, for DICOM input, a DICOM SEG, in worker threads
  audit       who asked, which versions answered, the case only as a salted hash; written (and
              fsynced) before the result is returned, in a worker thread
  monitor     input statistics and outputs for drift (services.monitoring), after the answer

The protocol layers (services.gateway) only format what this returns.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import time
from dataclasses import dataclass

import ray

from imaging.errors import StudyError
from imaging.preprocess import PreparedStudy, preprocess
from serving.traffic import study_fraction
from services.version_barrier import rollout_slot
from services import metrics, remote_errors
from services.analyzer import Analysis, assemble
from services.study_input import InputError, StudyInput
from services.task_logic import TASKS

log = logging.getLogger("ray.serve")


def mask_nifti_gz(mask) -> bytes:
    """The label mask as .nii.gz. gzip level 1: a 240x240x155 mask takes 73 ms (69 kB) at level 1 and
    261 ms (19 kB) at level 9 on this CPU; the response is latency-bound, not size-bound."""
    import nibabel as nib

    img = nib.Nifti1Image(mask.data.astype("uint8"), mask.affine)
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


@dataclass
class StudyResult:
    source: StudyInput
    prepared: PreparedStudy
    analysis: Analysis
    report: dict  # {} when the report is unavailable (findings.report then says why)
    mask_nifti_gz: bytes
    dicom_seg: bytes | None  # DICOM input only
    elapsed_ms: float


class StudyAnalysis:
    def __init__(self, tasks: dict, reporting, preprocess_config, audit, salt: str, monitor=None, barrier=None):
        self.tasks, self.reporting = tasks, reporting
        self.barrier = barrier  # services.version_barrier.BarrierReader (None: studies are not pinned)
        self.preprocess_config, self.audit, self._salt = preprocess_config, audit, salt
        self.monitor = monitor  # services.monitoring.StudyMonitor (None: nothing recorded)

    async def fan_out(self, source: StudyInput, tasks: tuple[str, ...]) -> tuple[dict, PreparedStudy]:
        """Preprocess once, then every task in `tasks` on the same prepared study, in parallel."""
        t0 = time.perf_counter()
        try:
            prepared = await asyncio.to_thread(preprocess, source.study, self.preprocess_config)
        except StudyError as exc:  # QualityError included: 422 naming the failing check
            raise InputError(str(exc)) from None
        metrics.STAGE_SECONDS.labels("study", "preprocess", "-").observe(time.perf_counter() - t0)
        ref = await asyncio.to_thread(ray.put, prepared)  # serialising ~16 MB: off the event loop
        t1 = time.perf_counter()
        route = {"fraction": study_fraction(source.study.case_id), "case_ref": self.case_ref(source), "site": source.study.site}
        # One version per task for this study, whichever replica answers (services.version_barrier).
        pins = await self.barrier.versions() if self.barrier is not None else {}
        calls = {task: self.tasks[task].predict.remote(ref, source.study.age, {**route, "champion": pins.get(task), "rollout": pins.get(rollout_slot(task))})
                 for task in tasks}  # fmt: skip
        results = {task: await remote_errors.call(task, self._recorded(source, task, call, pins.get(task))) for task, call in calls.items()}
        metrics.STAGE_SECONDS.labels("study", "fanout", "-").observe(time.perf_counter() - t1)
        return results, prepared

    async def _recorded(self, source: StudyInput, task: str, call, pinned: str | None):
        """The task call; a failure of the version itself (not of its backend or replica) is recorded against
        the version the study was pinned to (what pipelines.champion_guard counts)."""
        try:
            return await call
        except Exception as exc:
            error = remote_errors.cause(exc)
            if self.monitor is not None and not remote_errors.infrastructure(error):
                self.monitor.failed(source, task, pinned, error, self.case_ref(source))
            raise

    async def report(self, findings) -> dict:
        """The reporting deployment's report for the findings (set on them); {} with the reason in
        `findings.report` when reporting fails."""
        try:
            result = await self.reporting.report.remote(findings.model_dump())
        except Exception as exc:
            log.exception("reporting failed")
            error = remote_errors.cause(exc)
            findings.report = {"error": f"report unavailable ({type(error).__name__}: {str(error)[:200]})"}
            return {}
        findings.report = result["report"]
        findings.model_versions["reporting"] = result["version"]
        return result

    async def analyze(self, source: StudyInput, identity, request_id: str, route: str) -> StudyResult:
        """The whole study: every task, the report, the encoded mask (and DICOM SEG), audited."""
        t0 = time.perf_counter()
        results, prepared = await self.fan_out(source, TASKS)
        versions = {task: results[task]["version"] for task in TASKS}
        analysis = await asyncio.to_thread(assemble, source.study, prepared.version, results, versions, prepared)
        report, mask = await asyncio.gather(self.report(analysis.findings), asyncio.to_thread(mask_nifti_gz, analysis.mask))
        seg = None
        if source.kind == "dicom" and source.dicom_reference:
            from services.dicom_seg import build_dicom_seg

            seg = await asyncio.to_thread(build_dicom_seg, analysis.mask.data, source.dicom_reference, versions["segmentation"])
        await self.record(identity, request_id, source, analysis.findings.model_versions, route)
        if self.monitor is not None:
            self.monitor.schedule(source, prepared, results, versions, self.case_ref(source), route)
        return StudyResult(source, prepared, analysis, report, mask, seg, round((time.perf_counter() - t0) * 1000, 1))

    async def predict(self, source: StudyInput, task: str, identity, request_id: str, route: str) -> dict:
        """One task's section of the findings (with the mask, encoded, for segmentation), audited."""
        results, prepared = await self.fan_out(source, (task,))
        result = results[task]
        body = {"task": task, "case_id": source.study.case_id, "model_version": result["version"],
                "result": result["section"], "preprocessing_version": prepared.version,
                "preprocessing": prepared.record, "quality_flags": prepared.flags,
                "implausible": result.get("implausible", []), "missing_modalities": source.study.missing}  # fmt: skip
        if "rollout" in result:  # answered by a canary candidate
            body["rollout"] = result["rollout"]
        if "mask" in result:
            body["mask_nifti_gz"] = await asyncio.to_thread(mask_nifti_gz, result["mask"])
        await self.record(identity, request_id, source, {task: result["version"]}, route)
        if self.monitor is not None:
            self.monitor.schedule(source, prepared, results, {task: result["version"]}, self.case_ref(source), route)
        return body

    def case_ref(self, source: StudyInput) -> str:
        """The case as a salted hash: what the audit log and rollout evidence keep instead of its id."""
        return hashlib.sha256(f"{self._salt}:{source.study.case_id}".encode()).hexdigest()[:16]

    async def record(self, identity, request_id: str, source: StudyInput, versions: dict, route: str) -> None:
        """The audit record (fsynced) is on disk before this returns; the write runs in a worker thread."""
        case_ref = self.case_ref(source)
        await asyncio.to_thread(self.audit.event, identity.name if identity else "anonymous",
                                identity.role if identity else "none", "analyze", request_id=request_id, route=route,
                                input=source.kind, model_versions=versions, case_ref=case_ref)  # fmt: skip
