"""Hospital integration against a real PACS: Orthanc (Debian, authentication on) on loopback.

End to end: a multi-series raw DICOM study with PHI goes from Orthanc to the platform's receiver by
C-STORE -> one analysis job runs on the served models -> a clinician accepts it -> SEG, SR and PDF arrive in
Orthanc under the original PatientID and StudyInstanceUID (read back over DICOMweb, checked with
highdicom). Nothing the platform stored holds the planted PHI; a rejected review exports nothing; a
sender not on the allow-list is refused; Orthanc stopped during an export -> the job retries and
succeeds when it is back; a study pulled over DICOMweb (`oncoserve pacs pull`) takes the same way. And the
jobs API itself: submit, wait, artifacts, idempotency, another
caller's job, review permissions.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import struct
import subprocess
import zipfile

import highdicom as hd
import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from imaging.dataset import read_case
from oncoserve.audit import AuditLog
from oncoserve.auth import TokenStore
from oncoserve.object_store import object_store
from tests.conftest import PACS, oncoserve
from tests.dicom_factory import PHI, PHI_STRINGS, series_datasets, to_bytes
from tests.helpers import wait_until

pytestmark = pytest.mark.integration
AUTH = (PACS["user"], PACS["password"])
DESCRIPTIONS = {"t1": "T1 MPRAGE", "t1ce": "T1 post gad", "t2": "T2 TSE", "flair": "FLAIR"}


def start_orthanc(root, live_stack) -> subprocess.Popen:
    config = {
        "Name": "oncoserve-test-pacs", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
        "HttpPort": PACS["http_port"], "DicomPort": PACS["dicom_port"], "DicomAet": PACS["aet"],
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {AUTH[0]: AUTH[1]},
        "DicomModalities": {"oncoserve": [live_stack.dicom_ae_title, "127.0.0.1", live_stack.dicom_port]},
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StableAge": 1, "ConcurrentJobs": 1,
    }  # fmt: skip
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "ab")
    proc = subprocess.Popen(["/usr/sbin/Orthanc", str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{PACS['http_port']}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/system", auth=AUTH, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_until(up, timeout_s=60, interval_s=0.3), (root / "orthanc.log").read_text()[-2000:]
    return proc


@pytest.fixture(scope="module")
def orthanc(live_stack, served, tmp_path_factory):
    root = tmp_path_factory.mktemp("orthanc")
    state = {"proc": start_orthanc(root, live_stack), "root": root, "url": f"http://127.0.0.1:{PACS['http_port']}"}
    yield state
    state["proc"].terminate()
    state["proc"].wait(timeout=30)


def put_study(orthanc, tiny_dataset, case_index: int) -> tuple[str, dict]:
    """A four-series study with planted PHI, uploaded into Orthanc; returns (Orthanc study id, original UIDs)."""
    case = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[case_index]
    study = read_case(tiny_dataset, case.name)
    uid = generate_uid()
    series = {m: series_datasets(study.images[m], DESCRIPTIONS[m], uid) for m in study.present}
    orthanc_id = None
    for datasets in series.values():
        for ds in datasets:
            response = httpx.post(f"{orthanc['url']}/instances", content=to_bytes(ds), auth=AUTH, timeout=30)
            assert response.status_code == 200, response.text
            orthanc_id = response.json()["ParentStudy"]
    return orthanc_id, {"study": uid, "reference_series": series[study.reference_name][0].SeriesInstanceUID}


def send_to_platform(orthanc, orthanc_study: str) -> None:
    """Orthanc, as the hospital's PACS, C-STOREs the study to the platform's receiver."""
    response = httpx.post(f"{orthanc['url']}/modalities/oncoserve/store", content=orthanc_study, auth=AUTH, timeout=300)
    assert response.status_code == 200, response.text


def api(settings, method: str, path: str, token: str | None = None, **kw) -> httpx.Response:
    token = token or settings.cli_token()
    return httpx.request(method, f"{settings.platform_url}{path}", headers={"authorization": f"Bearer {token}"}, timeout=60, **kw)


def received_job(settings, known: set[str]) -> dict:
    """The job the receiver queued for a study just sent (not one of `known`), once it awaits review."""
    found: dict = {}

    def ready() -> bool:
        jobs = [j for j in api(settings, "GET", "/v1/jobs").json() if j["source"] == "dicom-receiver" and j["id"] not in known]
        if jobs and jobs[0]["state"] in ("awaiting review", "failed"):
            found.update(jobs[0])
            return True
        return False

    assert wait_until(ready, timeout_s=300, interval_s=0.5)
    assert found["state"] == "awaiting review", found
    return found


def job_state(settings, job_id: str, states: tuple[str, ...], timeout_s: float = 180) -> dict:
    doc: dict = {}

    def reached() -> bool:
        doc.update(api(settings, "GET", f"/v1/jobs/{job_id}").json())
        return doc["state"] in states

    assert wait_until(reached, timeout_s=timeout_s, interval_s=0.5), doc
    return doc


def results_in_pacs(orthanc, study_uid: str) -> dict[str, pydicom.Dataset]:
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_auth
    from requests.auth import HTTPBasicAuth

    client = DICOMwebClient(url=f"{orthanc['url']}/dicom-web", session=create_session_from_auth(HTTPBasicAuth(*AUTH)))
    out = {}
    for series in client.search_for_series(study_instance_uid=study_uid):
        modality = series["00080060"]["Value"][0]
        if modality in ("SEG", "SR", "DOC"):
            series_uid = series["0020000E"]["Value"][0]
            instances = client.retrieve_series(study_uid, series_uid)
            assert len(instances) == 1, f"{modality} stored {len(instances)} times"
            out[modality] = instances[0]
    return out


def readable(data: bytes) -> bytes:
    """What in a stored object could hold PHI: every DICOM element but the pixels (of each zip member too), a
    NIfTI's header and extensions, any other file whole. Compressed bytes and voxels are left out, where a
    short name like "Doe" turns up by chance."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
        if data[344:348] in (b"n+1\0", b"ni1\0"):  # NIfTI-1: header + extensions up to vox_offset
            return data[: int(struct.unpack("<f", data[108:112])[0])]
    if data[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return b"".join(readable(zf.read(n)) for n in zf.namelist())
    if data[:8] == b"\x89PNG\r\n\x1a\n":  # a picture (the QC image): compressed pixels only
        return b""
    if data[:1] == b"{" and data.rstrip()[-1:] == b"}":  # JSON: its text, and any base64 file inside as above
        try:
            return _readable_json(json.loads(data))
        except (UnicodeDecodeError, ValueError):
            return data
    if data[128:132] == b"DICM":
        ds = pydicom.dcmread(io.BytesIO(data))
        for keyword in ("PixelData", "EncapsulatedDocument"):
            if keyword in ds:
                del ds[keyword]
        out = io.BytesIO()
        ds.save_as(out)
        return out.getvalue()
    return data


def _readable_json(value) -> bytes:
    if isinstance(value, dict):
        return b"".join(k.encode() + _readable_json(v) for k, v in value.items())
    if isinstance(value, list):
        return b"".join(_readable_json(v) for v in value)
    if isinstance(value, str) and len(value) > 256:  # a base64 file (the job's preview images)?
        try:
            return readable(base64.b64decode(value, validate=True))
        except ValueError:
            return value.encode()
    return json.dumps(value).encode()


def stored_bytes(settings) -> bytes:
    """Everything the platform keeps about jobs (objects, logs, the audit log), as `readable` sees it."""
    store, blob = object_store(settings), b""
    for bucket in (settings.bucket_artifacts, settings.bucket_data):
        for obj in store.list_objects(bucket, prefix="jobs/", recursive=True):
            response = store.get_object(bucket, obj.object_name)
            data = response.read()
            response.close()
            blob += obj.object_name.encode() + readable(data)
    for path in [*settings.logs_dir.rglob("*"), settings.audit_file]:
        if path.is_file():
            blob += path.read_bytes()
    return blob


def test_a_pacs_study_comes_back_as_seg_sr_and_pdf_under_the_original_patient(orthanc, live_stack, tiny_dataset):
    known = {j["id"] for j in api(live_stack, "GET", "/v1/jobs").json()}
    orthanc_study, original = put_study(orthanc, tiny_dataset, 5)
    send_to_platform(orthanc, orthanc_study)
    job = received_job(live_stack, known)
    assert job["owner"] == f"dicom:{PACS['aet']}" and job["input"]["export"] is True and job["result"]["findings"]["segmentation"]
    review = oncoserve("jobs", "review", job["id"], "accept", "--reason", "contours checked on all slices")
    assert review.returncode == 0, review.stderr[-2000:]
    done = job_state(live_stack, job["id"], ("exported", "failed"))
    assert done["state"] == "exported", done
    assert {o["kind"] for o in done["delivery"]["objects"]} == {"seg", "sr", "pdf"}
    objects = results_in_pacs(orthanc, original["study"])
    assert set(objects) == {"SEG", "SR", "DOC"}
    for ds in objects.values():
        assert ds.PatientID == PHI["PatientID"] and ds.StudyInstanceUID == original["study"]
        assert str(ds.PatientName) == PHI["PatientName"]
    seg = hd.seg.Segmentation.from_dataset(objects["SEG"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == original["reference_series"]
    assert "accepted by test-admin" in seg.SeriesDescription
    sr = hd.sr.Comprehensive3DSR.from_dataset(objects["SR"])
    assert sr.VerificationFlag == "VERIFIED" and sr.VerifyingObserverSequence[0].VerifyingObserverName == "test-admin"
    versions = done["result"]["findings"]["model_versions"]
    named = " ".join(str(e.value) for e in objects["SR"].iterall() if e.keyword in ("TextValue", "SoftwareVersions"))
    assert "oncoserve segmentation" in named and f"segmentation v{versions['segmentation']}" in named  # algorithm + version
    assert bytes(objects["DOC"].EncapsulatedDocument).startswith(b"%PDF")
    # Nothing the platform stored (objects, logs, audit) holds the planted PHI.
    blob = stored_bytes(live_stack).lower()
    assert not [v for v in PHI_STRINGS if v.lower().encode() in blob]
    reviews = [e for e in AuditLog(live_stack.audit_file).entries() if e.get("action") == "review" and e.get("job") == job["id"]]
    assert [(e["decision"], e["actor"]) for e in reviews] == [("accept", "test-admin")]


def test_a_rejected_review_exports_nothing(orthanc, live_stack, tiny_dataset):
    known = {j["id"] for j in api(live_stack, "GET", "/v1/jobs").json()}
    orthanc_study, original = put_study(orthanc, tiny_dataset, 6)
    send_to_platform(orthanc, orthanc_study)
    job = received_job(live_stack, known)
    rejected = api(live_stack, "POST", f"/v1/jobs/{job['id']}:review", json={"decision": "reject", "reason": "motion artefact"})
    assert rejected.status_code == 200 and rejected.json()["state"] == "rejected"
    again = api(live_stack, "POST", f"/v1/jobs/{job['id']}:review", json={"decision": "accept", "reason": "changed my mind"})
    assert again.status_code == 409 and "not awaiting review" in again.json()["error"]
    assert results_in_pacs(orthanc, original["study"]) == {}
    assert api(live_stack, "GET", f"/v1/jobs/{job['id']}").json()["delivery"] is None


def test_a_sender_not_on_the_allow_list_is_refused(live_stack):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", live_stack.dicom_port, ae_title=live_stack.dicom_ae_title)
    assert assoc.is_rejected and not assoc.is_established


def test_an_export_to_a_stopped_pacs_is_retried_until_it_is_back(orthanc, live_stack, tiny_dataset):
    known = {j["id"] for j in api(live_stack, "GET", "/v1/jobs").json()}
    orthanc_study, original = put_study(orthanc, tiny_dataset, 7)
    send_to_platform(orthanc, orthanc_study)
    job = received_job(live_stack, known)
    orthanc["proc"].terminate()
    orthanc["proc"].wait(timeout=30)
    accepted = api(live_stack, "POST", f"/v1/jobs/{job['id']}:review", json={"decision": "accept", "reason": "fine"})
    assert accepted.status_code == 200

    def failed_once() -> bool:
        delivery = api(live_stack, "GET", f"/v1/jobs/{job['id']}").json()["delivery"] or {}
        return any(not a["ok"] for a in delivery.get("attempts", []))

    assert wait_until(failed_once, timeout_s=60, interval_s=0.3)
    assert api(live_stack, "GET", f"/v1/jobs/{job['id']}").json()["state"] in ("accepted", "exporting")
    orthanc["proc"] = start_orthanc(orthanc["root"], live_stack)
    done = job_state(live_stack, job["id"], ("exported", "failed"))
    assert done["state"] == "exported" and not done["delivery"]["attempts"][0]["ok"] and done["delivery"]["attempts"][-1]["ok"]
    assert set(results_in_pacs(orthanc, original["study"])) == {"SEG", "SR", "DOC"}


def test_results_go_back_by_stow_rs_to_a_dicomweb_destination(orthanc, live_stack, tiny_dataset):
    """A DICOMweb destination gets the same objects by STOW-RS (Orthanc's DICOMweb plugin, real HTTP);
    wrong credentials and a server that is down are send errors naming the destination."""
    from pipelines.pacs.export import result_objects
    from pipelines.pacs.send import SendError, parse_destination, send

    known = {j["id"] for j in api(live_stack, "GET", "/v1/jobs").json()}
    orthanc_study, original = put_study(orthanc, tiny_dataset, 2)
    send_to_platform(orthanc, orthanc_study)
    job = received_job(live_stack, known)
    # The objects the export builds for this job (re-identified), sent as the runner would for a URL.
    from pipelines.jobs.runner import JobRunner
    from pipelines.jobs.store import JobStore

    jobs = JobStore(live_stack.home / "jobs" / "jobs.sqlite")
    runner = JobRunner(live_stack, jobs, object_store(live_stack), AuditLog(live_stack.audit_file))  # never started
    objects = result_objects(runner, jobs.get(job["id"]))
    destination = parse_destination(f"{orthanc['url']}/dicom-web")
    with pytest.raises(SendError, match="HTTP 401"):
        send(destination, objects, "ONCOSERVE", AUTH[0], "wrong-password")
    sent = send(destination, objects, "ONCOSERVE", *AUTH)
    assert sorted(sent) == sorted(str(ds.SOPInstanceUID) for ds in objects)
    stored = results_in_pacs(orthanc, original["study"])
    assert set(stored) == {"SEG", "SR", "DOC"} and all(ds.PatientID == PHI["PatientID"] for ds in stored.values())
    with pytest.raises(SendError, match="could not be reached"):
        send(parse_destination("http://127.0.0.1:9/dicom-web"), objects, "ONCOSERVE")


def test_a_study_pulled_over_dicomweb_is_analysed_and_sent_back(orthanc, live_stack, tiny_dataset):
    _, original = put_study(orthanc, tiny_dataset, 3)  # in the PACS, never sent to the platform
    pulled = oncoserve("pacs", "pull", original["study"])
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    job_id = pulled.stdout.split()[1]
    job = job_state(live_stack, job_id, ("awaiting review", "failed"), timeout_s=300)
    assert job["state"] == "awaiting review", job
    assert job["input"]["kind"] == "dicom" and job["input"]["pulled"] == "dicomweb" and original["study"] not in json.dumps(job)
    assert api(live_stack, "POST", f"/v1/jobs/{job_id}:review", json={"decision": "accept", "reason": "fine"}).status_code == 200
    assert job_state(live_stack, job_id, ("exported", "failed"))["state"] == "exported"
    assert set(results_in_pacs(orthanc, original["study"])) == {"SEG", "SR", "DOC"}
    # A study the PACS does not have fails saying so; a malformed UID is refused at once.
    unknown = oncoserve("pacs", "pull", generate_uid())
    failed = job_state(live_stack, unknown.stdout.split()[1], ("failed",))
    assert "has no study" in failed["error"]
    bad = oncoserve("pacs", "pull", "not-a-uid")
    assert bad.returncode == 1 and "expected a DICOM UID" in bad.stderr and "Traceback" not in bad.stderr


def test_jobs_api_runs_an_upload_to_completion_and_keeps_callers_apart(live_stack, served, tiny_dataset, tmp_path):
    case = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[1]
    submitted = oncoserve("jobs", "submit", str(case), "--idempotency-key", "case-1")
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    job_id = submitted.stdout.split()[1]
    again = oncoserve("jobs", "submit", str(case), "--idempotency-key", "case-1")
    assert again.stdout.split()[1] == job_id  # the same submission is the same job
    waited = oncoserve("jobs", "wait", job_id, "--timeout", "300")
    assert waited.returncode == 0 and "completed" in waited.stdout, waited.stdout[-2000:] + waited.stderr[-2000:]
    job = api(live_stack, "GET", f"/v1/jobs/{job_id}").json()
    assert job["result"]["findings"]["case_id"] == case.name and job["progress"] == 1.0
    mask = api(live_stack, "GET", job["result"]["artifacts"]["mask"])
    assert mask.status_code == 200 and mask.content[:2] == b"\x1f\x8b"
    # Another caller's job is not found; a viewer may not review; a finished job is not reviewed again.
    tokens = TokenStore(live_stack.tokens_file)
    admin = tokens.authenticate(live_stack.cli_token())
    other = tokens.create(f"other-app-{generate_uid()[-6:]}", "app", admin)
    assert api(live_stack, "GET", f"/v1/jobs/{job_id}", token=other).status_code == 404
    assert job_id not in {j["id"] for j in api(live_stack, "GET", "/v1/jobs", token=other).json()}
    viewer = tokens.create(f"viewer-{generate_uid()[-6:]}", "viewer", admin)
    assert api(live_stack, "POST", f"/v1/jobs/{job_id}:review", token=viewer, json={"decision": "accept", "reason": "ok!"}).status_code == 403
    late = api(live_stack, "POST", f"/v1/jobs/{job_id}:review", json={"decision": "accept", "reason": "late"})
    assert late.status_code == 409
    unsure = api(live_stack, "POST", f"/v1/jobs/{job_id}:review", json={"decision": "maybe", "reason": "hmm"})
    assert unsure.status_code == 400 and "decision" in unsure.json()["error"]
    # Bad input is a message, not a trace.
    plain = httpx.post(f"{live_stack.platform_url}/v1/jobs", content=b"x", timeout=30,
                       headers={"authorization": f"Bearer {live_stack.cli_token()}", "content-type": "text/plain"})  # fmt: skip
    assert plain.status_code == 415 and "multipart/form-data" in plain.json()["error"]
    bad = httpx.post(f"{live_stack.platform_url}/v1/jobs", headers={"authorization": f"Bearer {live_stack.cli_token()}"},
                     files={"t1": ("t1.nii.gz", b"", "application/gzip")}, data={"export": "true"}, timeout=30)  # fmt: skip
    assert bad.status_code == 400 and "export=true needs a DICOM study" in bad.json()["error"]
    missing = oncoserve("jobs", "show", "job-00000000-000000000000")
    assert missing.returncode == 1 and "no job" in missing.stderr and "Traceback" not in missing.stderr
