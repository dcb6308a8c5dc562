"""The DICOM receiver: a C-STORE / C-ECHO SCP (pynetdicom) that turns each study a PACS or scanner sends
into one analysis job.

- Only calling AE titles on the allow-list get an association (others: A-ASSOCIATE-RJ, "calling AE title
  not recognised"); at most `dicom_max_associations` at once (more: rejected, "local limit exceeded").
- Each instance is de-identified as it arrives (pipelines.pacs.identity) and spooled under
  HOME/jobs/spool (mode 700); the original patient/study attributes and UID map stay in memory until
  the study closes, then go to the job table's protected identities.
- Below `dicom_min_free_mb` of free disk a C-STORE answers 0xA700 (out of resources) and stores nothing.
- A study is closed `dicom_study_idle_s` after its last instance: its instances are zipped into the object
  store and one job is queued (export on: the results go back once reviewed).

A receiver stopped with a study still open loses that study's spool (the sender's next C-STORE of it
starts a new one); a closed study is already a durable job.
"""

from __future__ import annotations

import io
import logging
import secrets
import shutil
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from oncoserve.deid_salt import deid_salt
from oncoserve.settings import Settings
from pipelines.jobs.store import JobStore
from pipelines.pacs.identity import StudyDeidentifier

log = logging.getLogger("oncoserve.dicom")
OUT_OF_RESOURCES, CANNOT_UNDERSTAND, SUCCESS = 0xA700, 0xC000, 0x0000


@dataclass
class OpenStudy:
    deid: StudyDeidentifier
    spool: Path
    calling_ae: str
    instances: int = 0
    last: float = field(default_factory=time.monotonic)


class DicomReceiver:
    def __init__(self, settings: Settings, jobs: JobStore, store, on_job=None):
        self.settings, self.jobs, self.store = settings, jobs, store
        self.on_job = on_job or (lambda job_id: None)
        self.salt = deid_salt(settings.home, settings.deid_salt)
        self.min_free_bytes = settings.dicom_min_free_mb * 1024 * 1024
        self.spool = settings.home / "jobs" / "spool"
        self.spool.mkdir(parents=True, exist_ok=True)
        self.spool.chmod(0o700)
        self.open: dict[str, OpenStudy] = {}  # keyed by the original Study Instance UID: memory only
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.server = None

    # -- the SCP ----------------------------------------------------------------------------------
    def _ae(self):
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.settings.dicom_ae_title)
        ae.require_calling_aet = list(self.settings.dicom_allowed_aes)
        ae.maximum_associations = self.settings.dicom_max_associations
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 60
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            if len(ae.supported_contexts) >= 128:  # the association's limit; MR and SEG classes come first
                break
            ae.add_supported_context(context.abstract_syntax)
        return ae, [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS)]

    def start(self, block: bool = False):
        if not self.settings.dicom_allowed_aes:
            raise ValueError("the DICOM receiver needs an allow-list of calling AE titles (dicom_allowed_aes)")
        ae, handlers = self._ae()
        threading.Thread(target=self._closer, name="dicom-study-closer", daemon=True).start()
        log.warning("DICOM receiver %s on %s:%d, accepting %s", self.settings.dicom_ae_title, self.settings.host,
                    self.settings.dicom_port, ", ".join(self.settings.dicom_allowed_aes))  # fmt: skip
        self.server = ae.start_server((self.settings.host, self.settings.dicom_port), block=block, evt_handlers=handlers)
        return self.server

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()
        self.close_idle(force=True)

    def _on_store(self, event) -> int:
        if shutil.disk_usage(self.spool).free < self.min_free_bytes:
            log.error("C-STORE refused: less than %.0f MB free under %s", self.settings.dicom_min_free_mb, self.spool)
            return OUT_OF_RESOURCES
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            study_uid = str(ds.StudyInstanceUID)
        except Exception as exc:  # an instance pydicom cannot decode, or without a study
            log.error("C-STORE refused: unreadable instance (%s)", type(exc).__name__)
            return CANNOT_UNDERSTAND
        calling = str(event.assoc.requestor.ae_title).strip()
        with self.lock:
            study = self.open.get(study_uid)
            if study is None:
                deid = StudyDeidentifier(self.salt, study_uid)
                study = self.open[study_uid] = OpenStudy(deid, self.spool / f"{deid.case_id}-{secrets.token_hex(4)}", calling)
                study.spool.mkdir(mode=0o700)
            study.deid.apply(ds)
            ds.save_as(study.spool / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            study.instances += 1
            study.last = time.monotonic()
        return SUCCESS

    # -- closing studies into jobs ----------------------------------------------------------------
    def _closer(self) -> None:
        while not self._stop.wait(min(1.0, self.settings.dicom_study_idle_s / 4)):
            try:
                self.close_idle()
            except Exception:  # the object store briefly down: the study stays open and is tried again
                log.exception("closing a received study failed")

    def close_idle(self, force: bool = False) -> list[str]:
        """Queue a job for every study idle long enough. A study leaves `open` before it is zipped, so an
        instance arriving meanwhile starts a new study (and job) instead of landing in a removed spool."""
        now, queued = time.monotonic(), []
        with self.lock:
            closing = [(uid, s) for uid, s in self.open.items() if force or now - s.last >= self.settings.dicom_study_idle_s]
            for uid, _ in closing:
                del self.open[uid]
        for uid, study in closing:
            try:
                queued.append(self._queue(study))
            except Exception:
                with self.lock:  # the object store is down: the study stays open and is tried again
                    self.open.setdefault(uid, study)
                raise
            shutil.rmtree(study.spool, ignore_errors=True)
        return queued

    def _queue(self, study: OpenStudy) -> str:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(study.spool.glob("*.dcm")):
                zf.write(path, path.name)
        key = f"jobs/received/{study.spool.name}/study.zip"
        self.store.put_object(self.settings.bucket_artifacts, key, io.BytesIO(buffer.getvalue()), buffer.tell(),
                              content_type="application/zip")  # fmt: skip
        spec = {"kind": "dicom", "objects": {"dicom": key}, "case_id": study.deid.case_id, "export": True,
                "calling_ae": study.calling_ae, "instances": study.instances}  # fmt: skip
        job, _ = self.jobs.create(f"dicom:{study.calling_ae}", "dicom-receiver", spec, idempotency_key=f"received:{study.spool.name}")
        self.jobs.save_identity(job.id, study.deid.patient or {}, study.deid.uids)
        log.warning("study %s closed (%d instances from %s): job %s", study.deid.case_id, study.instances, study.calling_ae, job.id)
        self.on_job(job.id)
        return job.id
