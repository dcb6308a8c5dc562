"""`/v1/jobs` on the platform API: asynchronous study analyses, their artifacts and their review.

  POST /v1/jobs                       the inputs of `studies:analyze` (multipart NIfTI or a DICOM zip, or JSON
                                      with an s3_uri), or {"pacs": {"study_uid"}} (pulled over DICOMweb);
                                      `export=true` sends the reviewed results to the PACS;
                                      an `Idempotency-Key` header makes a re-sent submission the same job -> 202
  GET  /v1/jobs[?state=]              the caller's jobs (a clinician or above: everyone's)
  GET  /v1/jobs/{id}                  state, progress, findings, artifact links, review, delivery
  GET  /v1/jobs/{id}/artifacts/{name} findings | mask | report | report_fhir | dicom_seg
  POST /v1/jobs/{id}:review           {"decision": "accept"|"reject", "reason": ...} (clinician)
  POST /v1/jobs/{id}:retry            a failed job, again from its stored input

Another caller's job answers 404, as an unknown one does, unless the caller's role may read all jobs.
A DICOM zip is de-identified before it is stored, as the receiver does (pipelines.pacs.identity).
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import tempfile
import time
from pathlib import Path
from typing import Literal

from fastapi import Body, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from oncoserve.auth import Identity, require
from oncoserve.deid_salt import deid_salt
from oncoserve.settings import Settings
from pipelines.jobs.store import Job, JobNotFound, JobStore
from pipelines.pacs.pull import check_uid

MODALITY_FIELDS = ("t1", "t1ce", "t2", "flair")
ARTIFACT_TYPES = {"findings": "application/json", "mask": "application/gzip", "report": "text/markdown",
                  "report_fhir": "application/json", "dicom_seg": "application/dicom",
                  "preview": "application/json"}  # fmt: skip
READS_ALL_JOBS = "clinician"


class ReviewRequest(BaseModel):
    decision: Literal["accept", "reject"]
    reason: str = Field(..., min_length=3, max_length=2000, description="Why: kept in the audit log")


def public(job: Job) -> dict:
    doc = job.to_json()
    if doc["result"]:
        doc["result"] = {**doc["result"], "artifacts": {name: f"/v1/jobs/{job.id}/artifacts/{name}" for name in doc["result"]["artifacts"]}}
    return doc


def uploaded_zip(data: bytes, salt: str) -> tuple[bytes, str, dict, dict]:
    """An uploaded DICOM zip, de-identified instance by instance (pipelines.pacs.identity)."""
    from imaging.dicom_series import read_datasets
    from imaging.errors import StudyError
    from pipelines.pacs.identity import deidentified_zip

    with tempfile.TemporaryDirectory(prefix="oncoserve-job-") as tmp:
        path = Path(tmp) / "study.zip"
        path.write_bytes(data)
        try:
            datasets = read_datasets(path)
        except StudyError as exc:
            raise ValueError(str(exc).replace(str(path), "upload")) from None
    return deidentified_zip(datasets, salt)


def add_job_routes(app: FastAPI, settings: Settings, jobs: JobStore, store, audit, runner, caller) -> None:
    max_bytes = int(settings.serve_max_request_mb * 1024 * 1024)

    def visible(job_id: str, who: Identity) -> Job:
        try:
            job = jobs.get(job_id)
        except JobNotFound:
            raise JobNotFound(f"no job {job_id!r}") from None
        if job.owner != who.name and not who.at_least(READS_ALL_JOBS):
            raise JobNotFound(f"no job {job_id!r}")
        return job

    @app.exception_handler(JobNotFound)
    async def _not_found(request: Request, exc: JobNotFound):
        return JSONResponse({"error": str(exc.args[0]) if exc.args else "no such job"}, status_code=404)

    def put(upload: str, name: str, data: bytes) -> str:
        key = f"jobs/inputs/{upload}/{name}"
        store.put_object(settings.bucket_artifacts, key, io.BytesIO(data), len(data))
        return key

    @app.post("/v1/jobs", status_code=202, summary="Queue a study analysis; answers at once with the job")
    async def submit(request: Request, who: Identity | None = Depends(caller),
                     idempotency_key: str | None = Header(None, max_length=200)) -> JSONResponse:  # fmt: skip
        who = require(who, "app", "submitting an analysis job")
        key = f"{who.name}:{idempotency_key}" if idempotency_key else None
        if key and (existing := jobs.by_key(key)) is not None:  # a re-sent submission: the same job
            return JSONResponse(public(existing), status_code=200, headers={"location": f"/v1/jobs/{existing.id}"})
        body = await request.body()
        if len(body) > max_bytes:
            return JSONResponse({"error": f"request of {len(body)} bytes exceeds the limit of {max_bytes}"}, status_code=413)
        ctype = request.headers.get("content-type", "").lower()
        upload = "upload-" + secrets.token_hex(8)
        identity = None
        if ctype.startswith("application/json"):
            try:
                doc = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ValueError("body is not JSON") from None
            if isinstance(doc, dict) and set(doc) <= {"pacs", "export"} and isinstance(doc.get("pacs"), dict):
                require(who, "clinician", "pulling a study from the PACS")
                if not settings.dicomweb_url:
                    raise ValueError("no DICOMweb server is configured on this platform (ONCOSERVE_DICOMWEB_URL)")
                spec = {"kind": "pacs", "study_uid": check_uid(doc["pacs"].get("study_uid")), "export": bool(doc.get("export", True))}
            elif isinstance(doc, dict) and isinstance(doc.get("s3_uri"), str) and not set(doc) - {"s3_uri", "case_id", "age"}:
                require(who, "clinician", "analysing a stored study (s3_uri)")
                spec = {"kind": "s3", **doc}
            else:
                raise ValueError('JSON body must be {"s3_uri": "s3://bucket/case/", "case_id"?: ..., "age"?: ...} '
                                 'or {"pacs": {"study_uid": "1.2..."}, "export"?: true}')
        elif ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=8, max_fields=16)
            try:
                spec = {k: str(form[k]) for k in ("case_id", "age", "mapping") if isinstance(form.get(k), str) and form.get(k)}
                export = str(form.get("export", "")).lower() in ("1", "true", "yes")
                if hasattr(form.get("dicom"), "read"):
                    # De-identification and the store write are blocking work: off the event loop.
                    data, case_id, patient, uids = await asyncio.to_thread(uploaded_zip, await form["dicom"].read(), deid_salt(settings.home, settings.deid_salt))
                    stored = await asyncio.to_thread(put, upload, "study.zip", data)
                    spec |= {"kind": "dicom", "objects": {"dicom": stored}, "export": export}
                    spec.setdefault("case_id", case_id)
                    identity = (patient, uids)
                else:
                    if export:
                        raise ValueError("export=true needs a DICOM study (NIfTI has no patient to file results under)")
                    objects = {}
                    for name in MODALITY_FIELDS:
                        if hasattr(form.get(name), "read"):
                            objects[name] = await asyncio.to_thread(put, upload, f"{name}.nii.gz", await form[name].read())
                    if not objects:
                        raise ValueError(f"no study in the form: send files {', '.join(MODALITY_FIELDS)} or dicom")
                    spec |= {"kind": "nifti", "objects": objects, "export": False}
            finally:
                await form.close()
        else:
            return JSONResponse({"error": f"content-type {ctype or 'none'!r}: send multipart/form-data (files t1, t1ce, t2, "
                                          "flair or dicom) or application/json with an s3_uri"}, status_code=415)  # fmt: skip
        job, created = jobs.create(who.name, "api", spec, idempotency_key=key)
        if identity is not None and created:
            jobs.save_identity(job.id, *identity)
        runner.wake()
        return JSONResponse(public(job), status_code=202 if created else 200, headers={"location": f"/v1/jobs/{job.id}"})

    @app.get("/v1/jobs", summary="Jobs the caller may see, newest first")
    def list_jobs(state: str | None = None, limit: int = 100, who: Identity | None = Depends(caller)) -> list[dict]:
        who = require(who, "viewer", "reading jobs")
        owner = None if who.at_least(READS_ALL_JOBS) else who.name
        return [public(j) for j in jobs.list(owner=owner, state=state, limit=min(max(limit, 1), 1000))]

    @app.get("/v1/jobs/{job_id}")
    def show(job_id: str, who: Identity | None = Depends(caller)) -> dict:
        return public(visible(job_id, require(who, "viewer", "reading jobs")))

    @app.get("/v1/jobs/{job_id}/artifacts/{name}")
    def artifact(job_id: str, name: str, who: Identity | None = Depends(caller)) -> Response:
        job = visible(job_id, require(who, "viewer", "reading job results"))
        key = ((job.result or {}).get("artifacts") or {}).get(name)
        if key is None or name not in ARTIFACT_TYPES:
            raise JobNotFound(f"job {job_id} has no artifact {name!r}")
        response = store.get_object(settings.bucket_artifacts, key)
        try:
            return Response(response.read(), media_type=ARTIFACT_TYPES[name])
        finally:
            response.close()

    @app.post("/v1/jobs/{job_id}:review", summary="Accept (results go to the PACS) or reject a job's results")
    def review(job_id: str, payload: dict | None = Body(None), who: Identity | None = Depends(caller)) -> dict:
        who = require(who, "clinician", "reviewing analysis results")  # before the body: a stranger learns nothing
        body = ReviewRequest.model_validate(payload or {})  # a ValidationError is a 400 with the fields named
        visible(job_id, who)
        decision = {"decision": body.decision, "reason": body.reason, "reviewer": who.name, "role": who.role,
                    "automatic": False, "time": time.time()}  # fmt: skip
        state = "accepted" if body.decision == "accept" else "rejected"
        detail = "accepted; exporting" if state == "accepted" else f"rejected by {who.name}: nothing is exported"
        job = jobs.transition(job_id, ("awaiting review",), state=state, review=decision, detail=detail)
        if job is None:
            return JSONResponse({"error": f"job {job_id} is {jobs.get(job_id).state!r}, not awaiting review"}, status_code=409)
        audit.event(who.name, who.role, "review", job=job_id, decision=body.decision, reason=body.reason)
        runner.wake()
        return public(job)

    @app.post("/v1/jobs/{job_id}:retry", summary="Run a failed job again from its stored input")
    def retry(job_id: str, who: Identity | None = Depends(caller)) -> dict:
        who = require(who, "app", "retrying a job")
        job = visible(job_id, who)
        back = "accepted" if job.review and job.review.get("decision") == "accept" else "queued"
        # An export retried starts its delivery attempts afresh; an analysis starts from its stored input.
        delivery = {**job.delivery, "attempts": [], "next_attempt_at": None} if back == "accepted" and job.delivery else None
        moved = jobs.transition(job_id, ("failed",), state=back, error=None, delivery=delivery, not_before=0,
                                detail=f"retried by {who.name}")  # fmt: skip
        if moved is None:
            return JSONResponse({"error": f"job {job_id} is {job.state!r}; only a failed job is retried"}, status_code=409)
        audit.event(who.name, who.role, "job_retry", job=job_id)
        runner.wake()
        return public(moved)

