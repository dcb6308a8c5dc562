"""The job runner: takes queued jobs from the durable table and runs them to the end, in the platform API's
process (a thread), so a job outlives any one request, a Serve restart and a stack restart.

One analysis: fetch the stored input (preprocessing) -> the serving gateway's `studies:analyze` (inferring:
the gateway's own preprocessing and the models) -> store findings, mask, report and DICOM SEG in the object
store (reporting) -> `awaiting review`, or `completed` when nothing is to be sent anywhere. An accepted job
is exported: its DICOM results are re-identified in memory and sent to the configured PACS, with retries.

Every artifact the platform keeps is de-identified; re-identified objects exist only in memory while they
are sent. The gateway is called with the runner's own token (role clinician, created once by the platform
API and kept under HOME/jobs), and the job records who submitted it.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import threading
import time
from pathlib import Path

import httpx

from oncoserve.auth import Identity, TokenStore
from oncoserve.settings import Settings
from pipelines.jobs.store import Job, JobStore

log = logging.getLogger("oncoserve.jobs")
RUNNER = "jobs-runner"
SYSTEM = Identity(name="platform", role="admin")  # the platform API acting on its own token store
RETRY_BACKOFF_S = (2.0, 15.0)  # first wait, longest wait between tries of an unreachable or overloaded gateway


def artifact_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/{name}"


def store_unavailable(exc: BaseException) -> bool:
    """The object store failing on its side (restarting with the stack, overloaded, unreachable), which a job
    waits out like an unreachable gateway; a missing object or a refused request is not retried."""
    import urllib3
    from minio.error import S3Error, ServerError

    if isinstance(exc, S3Error):
        status = getattr(exc.response, "status", 0) or 0
        return exc.code in {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"} or status >= 500
    return isinstance(exc, (ServerError, urllib3.exceptions.HTTPError, ConnectionError))


class JobRunner:
    def __init__(self, settings: Settings, jobs: JobStore, store, audit, poll_s: float = 0.5):
        self.settings, self.jobs, self.store, self.audit = settings, jobs, store, audit
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        resumed = self.jobs.requeue_interrupted()
        if resumed:
            log.warning("resuming %d interrupted job(s): %s", len(resumed), ", ".join(resumed))
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """A job was queued or accepted: look now instead of at the next poll."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = None
            try:
                job = self.jobs.claim()
            except Exception as exc:  # the table briefly locked or the disk full: look again
                log.warning("claiming a job failed: %s", exc)
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            self.run_one(job)

    def run_one(self, job: Job) -> None:
        """One claimed job, one step: analysis, or an export attempt."""
        try:
            if job.state == "exporting":
                self._export(job)
            else:
                self._analyse(job)
        except Exception as exc:  # a bug must fail the job it hit, never the runner
            if job.state != "exporting" and store_unavailable(exc):  # export has its own delivery retries
                self._retry_or_fail(job, f"the object store is unavailable ({type(exc).__name__}: {str(exc)[:200]})")
                return
            log.exception("job %s failed", job.id)
            self.jobs.update(job.id, state="failed", error=f"internal error ({type(exc).__name__}: {str(exc)[:300]})")

    # -- analysis ---------------------------------------------------------------------------------
    def _token(self) -> str | None:
        if not self.settings.serve_auth:
            return None
        path = self.settings.home / "jobs" / ".runner-token"
        tokens = TokenStore(self.settings.tokens_file)
        if path.exists():
            token = path.read_text().strip()
            if tokens.authenticate(token) is not None:
                return token
        if any(t["name"] == RUNNER for t in tokens.list()):
            tokens.revoke(RUNNER, SYSTEM)
        token = tokens.create(RUNNER, "clinician", SYSTEM)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token)
        return token

    def _request(self, job: Job) -> dict:
        """The keyword arguments of the gateway request for the job's stored input."""
        spec = job.input
        form = {k: str(spec[k]) for k in ("case_id", "age", "mapping") if spec.get(k) not in (None, "")}
        if spec["kind"] == "s3":
            return {"json": {"s3_uri": spec["s3_uri"], **{k: spec[k] for k in ("case_id", "age") if spec.get(k) is not None}}}
        files = {}
        for name, key in spec["objects"].items():
            response = self.store.get_object(self.settings.bucket_artifacts, key)
            try:
                data = response.read()
            finally:
                response.close()
            files[name] = (Path(key).name, data, "application/zip" if name == "dicom" else "application/octet-stream")
        return {"files": files, "data": form}

    def _pull(self, job: Job) -> Job | None:
        """A PACS study: pulled over DICOMweb, de-identified and stored; the job then reads as a DICOM upload
        (a retry or an export uses the stored copy, and the original study UID leaves the job's input)."""
        from oncoserve.deid_salt import deid_salt
        from pipelines.pacs.identity import deidentified_zip
        from pipelines.pacs.pull import PullError, pull_study

        self.jobs.update(job.id, progress=0.02, detail=f"pulling the study from {self.settings.dicomweb_url}")
        try:
            datasets = pull_study(self.settings, job.input["study_uid"])
        except PullError as exc:
            if exc.retryable:  # the server, not the request: wait it out like the gateway
                self._retry_or_fail(job, str(exc))
            else:
                self.jobs.update(job.id, state="failed", error=str(exc))
            return None
        data, case_id, patient, uids = deidentified_zip(datasets, deid_salt(self.settings.home, self.settings.deid_salt))
        key = self._put(job, "input/study.zip", data, "application/zip")
        self.jobs.save_identity(job.id, patient, uids)
        spec = {"kind": "dicom", "objects": {"dicom": key}, "case_id": case_id, "export": job.input.get("export", True),
                "pulled": "dicomweb", "instances": len(datasets)}  # fmt: skip
        return self.jobs.update(job.id, input=spec)

    def _analyse(self, job: Job) -> None:
        if job.input.get("kind") == "pacs":
            job = self._pull(job)
            if job is None:
                return
        self.jobs.update(job.id, progress=0.05, detail="fetching the stored study")
        request = self._request(job)
        self.jobs.update(job.id, state="inferring", progress=0.2,
                         detail="the serving gateway is preprocessing the study and running the models")  # fmt: skip
        try:
            token = self._token()
        except ValueError as exc:
            self.jobs.update(job.id, state="failed", error=f"the job runner has no serving token: {exc}")
            return
        headers = {"authorization": f"Bearer {token}"} if token else {}
        try:
            # preview: the model-grid images and the QC picture, kept for the reviewer's viewer in the console.
            response = httpx.post(f"{self.settings.serve_url}/v1/studies:analyze", params={"preview": "true"}, headers=headers,
                                  timeout=900, **request)  # fmt: skip
        except httpx.HTTPError as exc:
            return self._retry_or_fail(job, f"the serving gateway is unreachable ({type(exc).__name__})")
        if response.status_code >= 500 or response.status_code == 429 or _not_deployed(response):
            return self._retry_or_fail(job, f"the serving gateway answered {response.status_code}: {_error_text(response)}")
        if response.status_code != 200:
            self.jobs.update(job.id, state="failed", error=f"the study was refused ({response.status_code}): {_error_text(response)}")
            return
        body = response.json()
        self.jobs.update(job.id, state="reporting", progress=0.8, detail="storing findings, mask, report and DICOM results")
        result = self._store_artifacts(job, body)
        wants_export = bool(job.input.get("export"))
        if not wants_export:
            self.jobs.update(job.id, state="completed", progress=1.0, detail="analysis done", result=result)
        elif self.settings.pacs_auto_export:
            self.jobs.update(job.id, state="accepted", progress=0.9, result=result,
                             review={"decision": "accept", "reviewer": None, "automatic": True, "time": time.time(),
                                     "reason": "automatic export for research use (pacs_auto_export)"},
                             detail="exported without review: research use")  # fmt: skip
            self.wake()
        else:
            self.jobs.update(job.id, state="awaiting review", progress=0.9, result=result,
                             detail="waiting for a clinician to accept or reject the results")  # fmt: skip

    def _retry_or_fail(self, job: Job, why: str) -> None:
        """Serving down or overloaded is waited out (Serve restarting, a stack restart) for
        `jobs_retry_for_s` after the submission, with a growing pause; then the job fails saying why."""
        if time.time() - job.created > self.settings.jobs_retry_for_s:
            self.jobs.update(job.id, state="failed", error=f"{why}; gave up after {job.attempts} attempts in "
                                                           f"{self.settings.jobs_retry_for_s:g} s")  # fmt: skip
            return
        pause = min(RETRY_BACKOFF_S[0] * 2 ** max(job.attempts - 1, 0), RETRY_BACKOFF_S[1])
        self.jobs.update(job.id, state="queued", progress=0.0, not_before=time.time() + pause,
                         detail=f"{why}; retrying in {pause:g} s (attempt {job.attempts})")  # fmt: skip

    def _put(self, job: Job, name: str, data: bytes, content_type: str) -> str:
        key = artifact_key(job.id, name)
        self.store.put_object(self.settings.bucket_artifacts, key, io.BytesIO(data), len(data), content_type=content_type)
        return key

    def _store_artifacts(self, job: Job, body: dict) -> dict:
        from pipelines.study_client import findings_line

        findings = body["findings"]
        artifacts = {"findings": self._put(job, "findings.json", json.dumps(findings, indent=2).encode(), "application/json"),
                     "mask": self._put(job, "segmentation.nii.gz", base64.b64decode(body["mask_nifti_gz_b64"]), "application/gzip")}  # fmt: skip
        if body.get("report_markdown"):
            artifacts["report"] = self._put(job, "report.md", body["report_markdown"].encode(), "text/markdown")
            artifacts["report_fhir"] = self._put(job, "report.fhir.json", json.dumps(body["report_fhir"]).encode(), "application/json")
        if body.get("images_nifti_gz_b64"):  # de-identified, on the model grid: what the console's viewer shows
            preview = {"images_nifti_gz_b64": body["images_nifti_gz_b64"], "qc_png_b64": body.get("qc_png_b64")}
            artifacts["preview"] = self._put(job, "preview.json", json.dumps(preview).encode(), "application/json")
        if body.get("dicom_seg_b64"):
            artifacts["dicom_seg"] = self._put(job, "segmentation.dcm", base64.b64decode(body["dicom_seg_b64"]), "application/dicom")
        return {"summary": findings_line(findings), "findings": findings, "artifacts": artifacts,
                "request_id": body.get("request_id")}  # fmt: skip

    # -- export -----------------------------------------------------------------------------------
    def _export(self, job: Job) -> None:
        from pipelines.pacs.export import export_job

        export_job(self, job)


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))[:500]
    except ValueError:
        return response.text[:500]


def _not_deployed(response: httpx.Response) -> bool:
    """Serve's proxy answering for a route no application serves (a redeploy in progress): not the
    gateway's own 404, which is JSON with an `error`."""
    if response.status_code != 404:
        return False
    try:
        return "error" not in response.json()
    except ValueError:
        return True
