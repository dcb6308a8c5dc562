"""Export of an accepted job: its DICOM results, re-identified in memory, sent to the configured PACS.

What is sent: the gateway's SEG, a TID 1500 SR and an encapsulated PDF (pipelines.pacs.results), each filed
under the original patient and study (pipelines.pacs.identity) and titled with its review state. A failed
delivery (C-STORE, or STOW-RS to a DICOMweb URL) is tried again every `pacs_retry_s` seconds, up to `pacs_max_attempts` times; the job's `delivery`
says what was sent where, each attempt's outcome and when the next one is due. Object UIDs are stable per
job, so a retry that repeats an object replaces it in the PACS.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

from imaging.dicom_series import read_datasets, sorted_slices
from pipelines.jobs.runner import store_unavailable
from pipelines.jobs.store import Job
from pipelines.pacs.identity import reidentify
from pipelines.pacs.results import build_pdf, build_sr, mark_seg
from pipelines.pacs.send import SendError, parse_destination, send


def _object(runner, key: str) -> bytes:
    response = runner.store.get_object(runner.settings.bucket_artifacts, key)
    try:
        return response.read()
    finally:
        response.close()


def result_objects(runner, job: Job) -> list:
    """SEG (when the gateway made one), SR and PDF, re-identified; built in memory, never stored."""
    patient, uids = runner.jobs.identity(job.id)
    artifacts, findings = job.result["artifacts"], job.result["findings"]
    with tempfile.TemporaryDirectory(prefix="oncoserve-export-") as tmp:
        path = Path(tmp) / "study.zip"
        path.write_bytes(_object(runner, job.input["objects"]["dicom"]))
        images = [reidentify(ds, patient, uids) for ds in read_datasets(path)]
    objects = []
    reference_series = None
    if "dicom_seg" in artifacts:
        seg = reidentify(dcmread(io.BytesIO(_object(runner, artifacts["dicom_seg"]))), patient, uids)
        reference_series = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
        objects.append(mark_seg(seg, job.review))
    evidence = [ds for ds in images if str(ds.SeriesInstanceUID) == reference_series] or \
               [ds for ds in images if ds.SeriesInstanceUID == images[0].SeriesInstanceUID]  # fmt: skip
    evidence = sorted_slices(evidence)
    report = _object(runner, artifacts["report"]).decode() if "report" in artifacts else ""
    objects.append(build_sr(job.id, findings, evidence, job.review))
    objects.append(build_pdf(job.id, findings, report, evidence[0], job.review))
    return objects


def export_job(runner, job: Job) -> None:
    settings, jobs = runner.settings, runner.jobs
    if not settings.pacs_destination:
        jobs.update(job.id, state="completed", progress=1.0, detail="accepted; no PACS destination is configured, results stay here")
        return
    if jobs.identity(job.id) is None or job.input.get("kind") != "dicom":
        jobs.update(job.id, state="failed", error="only a study that came in as DICOM can be sent to a PACS (no identity to file it under)")
        return
    destination = parse_destination(settings.pacs_destination)
    delivery = dict(job.delivery or {"destination": str(destination), "attempts": []})
    jobs.update(job.id, progress=0.95, detail=f"sending SEG, SR and PDF to {destination}")
    try:
        objects = result_objects(runner, job)
        sent = send(destination, objects, settings.dicom_ae_title, settings.dicomweb_username, settings.dicomweb_password)
    except Exception as exc:  # noqa: BLE001 - narrowed on the next line
        if not isinstance(exc, (SendError, OSError)) and not store_unavailable(exc):
            raise
        delivery["attempts"] = [*delivery["attempts"], {"time": time.time(), "ok": False, "error": str(exc)[:300]}]
        if len(delivery["attempts"]) >= settings.pacs_max_attempts:
            delivery["next_attempt_at"] = None
            jobs.update(job.id, state="failed", delivery=delivery, error=f"delivery to {destination} failed {len(delivery['attempts'])} times: {exc}")
        else:
            delivery["next_attempt_at"] = time.time() + settings.pacs_retry_s
            jobs.update(job.id, state="accepted", delivery=delivery, not_before=delivery["next_attempt_at"],
                        detail=f"delivery failed (attempt {len(delivery['attempts'])} of {settings.pacs_max_attempts}); retrying in {settings.pacs_retry_s:g} s")  # fmt: skip
        runner.audit.event("jobs-runner", "clinician", "export", job=job.id, destination=str(destination), status="failed",
                           error=str(exc)[:300])  # fmt: skip
        return
    kinds = [{"SEG": "seg", "SR": "sr", "DOC": "pdf"}.get(str(ds.Modality), str(ds.Modality)) for ds in objects]
    delivery["attempts"] = [*delivery["attempts"], {"time": time.time(), "ok": True}]
    delivery |= {"next_attempt_at": None, "objects": [{"kind": k, "sop_instance_uid": uid} for k, uid in zip(kinds, sent)],
                 "research_use_unreviewed": bool((job.review or {}).get("automatic"))}  # fmt: skip
    jobs.update(job.id, state="exported", progress=1.0, delivery=delivery, detail=f"sent {', '.join(kinds)} to {destination}")
    runner.audit.event("jobs-runner", "clinician", "export", job=job.id, destination=str(destination), status="completed",
                       objects=delivery["objects"])  # fmt: skip
