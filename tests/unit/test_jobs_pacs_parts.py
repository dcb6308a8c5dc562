"""Analysis jobs and PACS parts without a stack: the durable job table, de-identification at receipt and
re-identification on the way out, the SR and PDF results, destinations, and the receiver's refusals."""

from __future__ import annotations

import io
import os
import stat
import threading
import time

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from imaging.deidentify import Deidentifier
from imaging.study import Volume
from oncoserve.settings import Settings
from pipelines.jobs.store import JobNotFound, JobStore
from pipelines.pacs.identity import StudyDeidentifier, reidentify
from pipelines.pacs.results import build_pdf, build_sr, sign_off_line
from pipelines.pacs.send import StowDestination, as_part10, parse_destination
from tests import dicom_factory as dcm

FINDINGS = {
    "model_versions": {"segmentation": "3", "classification": "2"},
    "segmentation": {"volumes_ml": {"WT": 41.5, "TC": 12.25, "ET": 6.0}},
    "classification": {"idh": {"label": "wildtype", "probabilities": {"mutant": 0.2, "wildtype": 0.8}},
                       "grade": {"label": "HGG", "probabilities": {"LGG": 0.1, "HGG": 0.9}}},
}  # fmt: skip


def series(n: int = 4, study_uid: str | None = None) -> list:
    data = np.zeros((12, 10, n), np.int16)
    data[3:9, 3:7, 1:3] = 500
    return dcm.series_datasets(Volume(data, np.diag([2.0, 2.0, 2.0, 1.0])), "T1 post gad", study_uid or generate_uid())


# -- the job table --------------------------------------------------------------------------------
def test_job_table_is_private_idempotent_and_claimed_once(tmp_path):
    jobs = JobStore(tmp_path / "jobs" / "jobs.sqlite")
    assert stat.S_IMODE(os.stat(jobs.path).st_mode) == 0o600 and stat.S_IMODE(os.stat(jobs.path.parent).st_mode) == 0o700
    first, created = jobs.create("alice", "api", {"kind": "nifti"}, idempotency_key="alice:k1")
    again, created_again = jobs.create("alice", "api", {"kind": "nifti"}, idempotency_key="alice:k1")
    assert created and not created_again and again.id == first.id and len(jobs.list()) == 1
    # Two runners racing for one queued job: exactly one gets it.
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(JobStore(jobs.path).claim())) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [j.id for j in got if j is not None] == [first.id]
    assert jobs.get(first.id).state == "preprocessing" and jobs.get(first.id).attempts == 1
    with pytest.raises(JobNotFound):
        jobs.get("job-nope")
    with pytest.raises(ValueError, match="unknown job state"):
        jobs.update(first.id, state="dancing")


def test_interrupted_jobs_resume_where_they_can_and_review_races_lose(tmp_path):
    jobs = JobStore(tmp_path / "jobs.sqlite")
    analysing, _ = jobs.create("a", "api", {})
    exporting, _ = jobs.create("a", "api", {})
    jobs.update(analysing.id, state="inferring")
    jobs.update(exporting.id, state="exporting")
    assert sorted(jobs.requeue_interrupted()) == sorted([analysing.id, exporting.id])
    assert jobs.get(analysing.id).state == "queued" and jobs.get(exporting.id).state == "accepted"
    assert "interruption during inferring" in jobs.get(analysing.id).detail
    # A review only moves a job that is awaiting one.
    assert jobs.transition(analysing.id, ("awaiting review",), state="rejected") is None
    # A failed delivery waits for its next attempt before it can be claimed again.
    jobs.update(analysing.id, state="failed")
    jobs.update(exporting.id, not_before=time.time() + 3600)
    assert jobs.claim() is None
    jobs.update(exporting.id, not_before=time.time() - 1)
    assert jobs.claim().id == exporting.id



class _FailingStore:
    """The object store as minio reports it failing: a server-side error while the stack restarts, or a
    missing object."""

    def __init__(self, status: int, code: str):
        import urllib3

        self.status, self.code, self.calls = status, code, 0
        self._response = urllib3.HTTPResponse(body=b"", status=status)

    def get_object(self, bucket, key):
        from minio.error import S3Error

        self.calls += 1
        raise S3Error(self._response, self.code, "We encountered an internal error, please try again.", f"/{bucket}/{key}",
                      "req-1", None, bucket, key)  # fmt: skip


def test_a_restarting_object_store_is_waited_out_and_a_missing_input_fails_the_job(tmp_path):
    from pipelines.jobs.runner import JobRunner, store_unavailable

    settings = Settings(home=tmp_path, jobs_retry_for_s=60)
    jobs = JobStore(tmp_path / "jobs.sqlite")
    job, _ = jobs.create("alice", "api", {"kind": "nifti", "objects": {"t1": "jobs/inputs/u/t1.nii.gz"}})
    restarting = _FailingStore(500, "InternalError")
    runner = JobRunner(settings, jobs, restarting, audit=None)
    runner.run_one(jobs.claim())
    waiting = jobs.get(job.id)
    assert restarting.calls == 1 and waiting.state == "queued" and jobs.claim() is None  # not before its pause
    assert "object store is unavailable" in waiting.detail and "retrying in" in waiting.detail
    # A missing input is not the store's outage: the job fails at once, saying what happened.
    jobs.update(job.id, not_before=time.time() - 1)
    JobRunner(settings, jobs, _FailingStore(404, "NoSuchKey"), audit=None).run_one(jobs.claim())
    failed = jobs.get(job.id)
    assert failed.state == "failed" and "NoSuchKey" in failed.error
    # An outage longer than jobs_retry_for_s ends the wait.
    late, _ = jobs.create("alice", "api", {"kind": "nifti", "objects": {"t1": "k"}})
    runner.settings = Settings(home=tmp_path, jobs_retry_for_s=1e-6)
    runner.run_one(jobs.claim())
    assert jobs.get(late.id).state == "failed" and "gave up" in jobs.get(late.id).error
    assert store_unavailable(ConnectionRefusedError()) and not store_unavailable(ValueError("bad"))

# -- identity: in, and back out -------------------------------------------------------------------
def test_received_instances_lose_their_phi_and_results_get_it_back():
    originals = series()
    study_uid, series_uid = originals[0].StudyInstanceUID, originals[0].SeriesInstanceUID
    deid = StudyDeidentifier("salt-1", study_uid)
    copies = [deid.apply(pydicom.dcmread(io.BytesIO(dcm.to_bytes(ds)))) for ds in originals]
    text = "".join(str(ds) for ds in copies)
    assert not any(value in text for value in dcm.PHI_STRINGS) and study_uid not in text
    assert deid.patient["PatientID"] == dcm.PHI["PatientID"] and deid.patient["StudyInstanceUID"] == study_uid
    # The gateway de-identifies again with the same salt: both generations map back to the original.
    twice = Deidentifier("case", "salt-1").remap_uid(str(copies[0].SeriesInstanceUID))
    assert deid.uids[twice] == deid.uids[str(copies[0].SeriesInstanceUID)] == series_uid
    result = pydicom.Dataset()
    result.StudyInstanceUID = Deidentifier("case", "salt-1").remap_uid(str(copies[0].StudyInstanceUID))
    result.ReferencedSeriesSequence = [pydicom.Dataset()]
    result.ReferencedSeriesSequence[0].SeriesInstanceUID = twice
    result.SOPInstanceUID = own = generate_uid()
    result.PatientIdentityRemoved = "YES"
    reidentify(result, deid.patient, deid.uids)
    assert result.StudyInstanceUID == study_uid and result.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    assert result.PatientID == dcm.PHI["PatientID"] and result.PatientName == dcm.PHI["PatientName"]
    assert result.SOPInstanceUID == own and result.PatientIdentityRemoved == "NO"


# -- the results a PACS receives ------------------------------------------------------------------
def test_sr_reports_volumes_and_probabilities_with_versions_and_its_review_state():
    evidence = series()
    review = {"decision": "accept", "reviewer": "dr-who", "automatic": False}
    sr = build_sr("job-1", FINDINGS, evidence, review)
    again = hd.sr.srread(io.BytesIO(_bytes(sr)))
    assert again.VerificationFlag == "VERIFIED" and again.VerifyingObserverSequence[0].VerifyingObserverName == "dr-who"
    assert again.SOPInstanceUID == build_sr("job-1", FINDINGS, evidence, review).SOPInstanceUID  # stable per job
    assert again.StudyInstanceUID == evidence[0].StudyInstanceUID
    groups = hd.sr.MeasurementReport.from_sequence([again]).get_image_measurement_groups()
    measured = {(str(g.tracking_identifier), m.name.meaning): m.value for g in groups for m in g.get_measurements()}
    assert measured[("Whole tumour (WT)", "Volume")] == 41.5 and measured[("Enhancing tumour (ET)", "Volume")] == 6.0
    assert measured[("idh classification", "Probability of idh wildtype")] == 0.8
    texts = [str(e.value) for e in again.iterall() if e.keyword == "TextValue"]
    assert "oncoserve segmentation" in texts and "3" in texts  # TID 4019 algorithm name and the model version
    assert {"segmentation v3", "classification v2"} <= set(again.SoftwareVersions)  # every model version, none cut at 64
    unreviewed = build_sr("job-1", FINDINGS, evidence, {"decision": "accept", "automatic": True})
    assert unreviewed.VerificationFlag == "UNVERIFIED" and "UNVERIFIED" in unreviewed.SeriesDescription


def test_pdf_is_an_encapsulated_pdf_in_the_study_saying_who_signed_it():
    reference = series()[0]
    pdf = build_pdf("job-2", FINDINGS, "# Report\nWT 41.5 mL", reference, {"decision": "accept", "reviewer": "dr-who"})
    back = pydicom.dcmread(io.BytesIO(_bytes(pdf)))
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1" and back.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert bytes(back.EncapsulatedDocument).startswith(b"%PDF") and back.StudyInstanceUID == reference.StudyInstanceUID
    assert "accepted by dr-who" in back.DocumentTitle and "segmentation v3" in " ".join(back.SoftwareVersions)
    assert sign_off_line(None).startswith("UNVERIFIED")


def _bytes(ds) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_destinations_parse_or_say_what_is_expected():
    d = parse_destination("ORTHANC@127.0.0.1:4242")
    assert (d.ae_title, d.host, d.port) == ("ORTHANC", "127.0.0.1", 4242) and str(d) == "ORTHANC@127.0.0.1:4242"
    for bad in ("ORTHANC", "127.0.0.1:4242", "WAY-TOO-LONG-AE-TITLE@h:1", "A@h:99999", "ftp://pacs/dicom-web"):
        with pytest.raises(ValueError, match="AE_TITLE@host:port"):
            parse_destination(bad)
    # STOW-RS sends DICOM files: a bare dataset gets its preamble and File Meta, so it reads back.
    from pydicom import dcmread, dcmwrite
    from pydicom.dataset import Dataset
    from pydicom.uid import EncapsulatedPDFStorage, generate_uid

    bare = Dataset()
    bare.SOPClassUID, bare.SOPInstanceUID, bare.PatientID = EncapsulatedPDFStorage, generate_uid(), "P1"
    written = io.BytesIO()
    dcmwrite(written, as_part10(bare))  # what dicomweb-client does with each dataset
    back = dcmread(io.BytesIO(written.getvalue()))
    assert written.getvalue()[128:132] == b"DICM" and back.file_meta.MediaStorageSOPInstanceUID == bare.SOPInstanceUID
    stow = parse_destination(" https://pacs.hospital.org/dicom-web/ ")
    assert isinstance(stow, StowDestination) and stow.url == "https://pacs.hospital.org/dicom-web"
    assert str(stow) == "STOW-RS https://pacs.hospital.org/dicom-web"


# -- the receiver's refusals ----------------------------------------------------------------------
@pytest.fixture()
def receiver(tmp_path):
    from pipelines.pacs.receiver import DicomReceiver

    # Port 0: the kernel picks a free one (read back from the server), no race with other tests' servers.
    settings = Settings(home=tmp_path / "home", dicom_port=0, dicom_allowed_aes=["SCANNER"], dicom_max_associations=1,
                        dicom_study_idle_s=3600)  # fmt: skip
    rx = DicomReceiver(settings, JobStore(tmp_path / "home" / "jobs" / "jobs.sqlite"), store=None)
    rx.start()
    yield rx
    rx.server.shutdown()


def _associate(port: int, calling: str):
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage, Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="ONCOSERVE")


def test_receiver_refuses_strangers_extra_associations_and_a_full_disk_with_dicom_statuses(receiver):
    port = receiver.server.server_address[1]
    stranger = _associate(port, "STRANGER")
    assert stranger.is_rejected and not stranger.is_established
    first = _associate(port, "SCANNER")
    try:
        assert first.is_established and first.send_c_echo().Status == 0x0000
        second = _associate(port, "SCANNER")  # over dicom_max_associations = 1
        assert second.is_rejected
        receiver.min_free_bytes = 1 << 60  # "nearly full": nothing is written
        status = first.send_c_store(series(1)[0])
        assert status.Status == 0xA700 and not any(receiver.spool.iterdir())
        receiver.min_free_bytes = 0
        assert first.send_c_store(series(1)[0]).Status == 0x0000 and len(receiver.open) == 1
        spooled = b"".join(p.read_bytes() for p in receiver.spool.rglob("*.dcm"))
        assert not any(value.encode() in spooled for value in dcm.PHI_STRINGS)
    finally:
        first.release()


def test_receiver_needs_an_allow_list(tmp_path):
    from pipelines.pacs.receiver import DicomReceiver

    with pytest.raises(ValueError, match="allow-list"):
        DicomReceiver(Settings(home=tmp_path, dicom_allowed_aes=[]), JobStore(tmp_path / "j.sqlite"), store=None).start()


def test_dicomweb_pull_checks_its_uid_and_its_configuration(tmp_path):
    from pipelines.pacs.pull import PullError, check_uid, pull_study

    assert check_uid("1.2.840.113619.2.5") == "1.2.840.113619.2.5"
    for bad in ("1.2.x", "../etc", "1." * 40, ""):
        with pytest.raises(ValueError, match="expected a DICOM UID"):
            check_uid(bad)
    with pytest.raises(PullError, match="ONCOSERVE_DICOMWEB_URL"):
        pull_study(Settings(home=tmp_path, dicomweb_url=None), "1.2.3")  # explicit: the session's stack sets one
