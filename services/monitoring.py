"""The gateway's post-market record of every analysed study (serving.monitoring_store), off the
response's path: input statistics (imaging.input_stats) for drift, QC flags, which versions answered
and what they said (region volumes, marker probabilities, OOD score, risk group); and of every study a
task failed on, with the version it was pinned to (what pipelines.champion_guard counts). With
`payload_logging` on, the de-identified input volumes and the findings are kept too.

A record is written after the answer is ready, in a worker thread; a failed write is logged and
counted (`oncoserve_monitoring_write_errors_total`), never an error for the caller.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from imaging.input_stats import input_statistics
from serving import monitoring_store
from services import metrics

log = logging.getLogger("ray.serve")


def output_summary(results: dict[str, dict]) -> dict[str, float]:
    """The numbers drift of the outputs is read from, flat, by task section."""
    out: dict[str, float] = {}
    seg = (results.get("segmentation") or {}).get("section") or {}
    for region, ml in (seg.get("volumes_ml") or {}).items():
        out[f"volume_{region}_ml"] = float(ml)
    cls = results.get("classification") or {}
    for marker, item in (cls.get("section") or {}).items():
        probabilities = list(item.get("probabilities", {}).values())
        if len(probabilities) == 2:
            out[f"p_{marker}"] = float(probabilities[1])
    if cls.get("ood"):
        out["ood_score"] = float(cls["ood"]["score"])
    surv = (results.get("survival") or {}).get("section") or {}
    if "risk_score" in surv:
        out["risk_score"] = float(surv["risk_score"])
        out["risk_group_high"] = float(surv.get("risk_group") == "high")
    loc = (results.get("localization") or {}).get("section") or {}
    if "found" in loc:
        out["tumour_found"] = float(bool(loc["found"]))
    return out


class StudyMonitor:
    def __init__(self, store_factory, bucket: str, records: bool, payloads: bool):
        self._store_factory, self.bucket, self.records, self.payloads = store_factory, bucket, records, payloads
        self._pending: set[asyncio.Task] = set()

    def schedule(self, source, prepared, results: dict[str, dict], versions: dict, case_ref: str, route: str) -> None:
        """Record the study in the background (the caller's answer does not wait for it)."""
        if not self.records and not self.payloads:
            return
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._write, source, prepared, results, versions, case_ref, route))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def failed(self, source, task: str, version: str | None, error: BaseException, case_ref: str) -> None:
        """Record, in the background, that `task` failed on a study pinned to `version` (None: not pinned)."""
        if not self.records:
            return
        record = {"time": time.time(), "site": source.study.site, "case_ref": case_ref, "input": source.kind,
                  "failed": {task: version}, "error": f"{type(error).__name__}: {str(error)[:300]}"}  # fmt: skip
        task_ = asyncio.get_running_loop().create_task(asyncio.to_thread(self._put, record))
        self._pending.add(task_)
        task_.add_done_callback(self._pending.discard)

    def _put(self, record: dict) -> None:
        try:
            monitoring_store.put_json(self._store_factory(), self.bucket,
                                      monitoring_store.new_key(monitoring_store.RECORDS, record["time"]) + ".json", record)  # fmt: skip
        except Exception as exc:
            metrics.MONITORING_ERRORS.inc()
            log.error("monitoring record not written (%s: %s)", type(exc).__name__, str(exc)[:200])

    def _write(self, source, prepared, results, versions, case_ref: str, route: str) -> None:
        now = time.time()
        try:
            store = self._store_factory()
            record = {"time": now, "site": source.study.site, "case_ref": case_ref, "route": route, "input": source.kind,
                      "inputs": input_statistics(source.study), "qc_flags": list(prepared.flags),
                      "missing_modalities": list(source.study.missing), "model_versions": versions,
                      "outputs": output_summary(results)}  # fmt: skip
            if self.records:
                monitoring_store.put_json(store, self.bucket, monitoring_store.new_key(monitoring_store.RECORDS, now) + ".json", record)
            if self.payloads:
                self._payload(store, now, source, results, record)
        except Exception as exc:
            metrics.MONITORING_ERRORS.inc()
            log.error("monitoring record not written (%s: %s)", type(exc).__name__, str(exc)[:200])

    def _payload(self, store, now: float, source, results: dict, record: dict) -> None:
        import gzip

        import nibabel as nib

        folder = monitoring_store.new_key(monitoring_store.PAYLOADS, now)
        for modality, volume in source.study.images.items():
            image = nib.Nifti1Image(volume.data, volume.affine)  # a fresh header: nothing from the upload's
            monitoring_store.put_bytes(store, self.bucket, f"{folder}/{modality}.nii.gz",
                                       gzip.compress(image.to_bytes(), compresslevel=1, mtime=0), "application/gzip")  # fmt: skip
        sections = {task: r.get("section") for task, r in results.items()}
        monitoring_store.put_bytes(store, self.bucket, f"{folder}/findings.json",
                                   json.dumps({**record, "sections": sections}, default=str).encode(), "application/json")  # fmt: skip
