"""Serving on the real stack: `oncoserve serve up` (Ray Serve: gateway + four task deployments), then
the REST, gRPC and Open Inference Protocol v2 APIs with real clients (httpx, tritonclient, grpc),
`oncoserve predict`, DICOM in / DICOM SEG out, metrics, audit, autoscaling and hot-swap."""

from __future__ import annotations

import gzip
import json
import os
import socket
import threading

import grpc
import httpx
import nibabel as nib
import numpy as np
import pytest

from imaging.dataset import read_case
from imaging.preprocess import preprocess
from serving import monitoring_store
from serving.backends import EmbeddedBackend
from tests.conftest import MAX_REQUEST_MB, SERVE_TEST_CONFIG as TEST_CONFIG, oncoserve
from tests.dicom_factory import PHI_STRINGS, series_datasets, write_zip
from tests.helpers import wait_until

pytestmark = pytest.mark.integration
TASKS = ("localization", "segmentation", "classification", "survival")
FINDING_KEYS = {"case_id", "model_versions", "localization", "segmentation", "classification", "survival", "quality",
                "report", "preprocessing_version"}  # fmt: skip
def files_of(case_dir, skip=()):
    out = {}
    for p in sorted(case_dir.glob("*.nii.gz")):
        modality = p.name.split("_")[-1].split(".")[0]
        if modality != "seg" and modality not in skip:
            out[modality] = (p.name, p.read_bytes(), "application/gzip")
    return out


def cases(tiny_dataset):
    return sorted(p for p in tiny_dataset.iterdir() if p.is_dir())


def test_status_reports_every_deployment(served, trained):
    run = oncoserve("serve", "status", "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    info = json.loads(run.stdout)
    deployments = info["applications"]["oncoserve"]["deployments"]
    assert {"gateway", *TASKS} <= set(deployments)
    assert info["model_versions"] == {**{t: trained[t] for t in TASKS}, "reporting": served["reporting"]}
    assert httpx.get(f"{served['url']}/docs", timeout=10).status_code == 200
    assert httpx.get(f"{served['url']}/readyz", timeout=10).json()["status"] == "ready"


def test_predict_writes_findings_and_a_mask_on_the_input_grid(served, tiny_dataset, trained, tmp_path):
    case = cases(tiny_dataset)[0]
    run = oncoserve("predict", str(case), "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert FINDING_KEYS <= set(findings)
    assert findings["model_versions"] == {**{t: trained[t] for t in TASKS}, "reporting": served["reporting"]}
    assert set(findings["segmentation"]["volumes_ml"]) == {"NCR", "ED", "ET", "WT", "TC"}
    assert set(findings["classification"]) == {"grade", "idh", "codeletion_1p19q", "mgmt"}
    assert len(findings["localization"]["bbox_vox"]) == 6 and len(findings["localization"]["centroid_vox"]) == 3
    assert {"risk_score", "risk_group", "median_survival_days", "curve"} <= set(findings["survival"])
    assert findings["quality"]["missing_modalities"] == []
    mask = nib.load(tmp_path / "out" / "segmentation.nii.gz")
    reference = read_case(tiny_dataset, case.name).reference
    assert mask.shape == reference.shape and np.allclose(mask.affine, reference.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 4}
    # The grounded report, as Markdown and as a FHIR R4 DiagnosticReport.
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    report = findings["report"]
    assert report["generator"] == "template" and report["guard"]["passed"] and report["citations"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Layered diagnosis" in markdown and report["integrated_diagnosis"] in markdown
    fhir = DiagnosticReport.model_validate_json((tmp_path / "out" / "report.fhir.json").read_text())
    assert fhir.identifier[0].value == findings["case_id"]


def test_predict_without_a_server_says_how_to_start_one(tiny_dataset, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = oncoserve("predict", str(cases(tiny_dataset)[0]), "--out", str(tmp_path), "--url", f"http://127.0.0.1:{port}")
    assert run.returncode == 3
    assert "oncoserve serve up" in run.stderr and "Traceback" not in run.stderr


def test_missing_flair_still_returns_findings(served, tiny_dataset):
    case = cases(tiny_dataset)[1]
    response = httpx.post(f"{served['url']}/v1/studies:analyze", headers=served["auth"], files=files_of(case, skip=("flair",)), timeout=180)
    assert response.status_code == 200, response.text
    # (some phantoms lack a sequence already; FLAIR is now missing as well)
    expected = [m for m in ("t1", "t1ce", "t2", "flair") if m == "flair" or m not in files_of(case)]
    assert response.json()["findings"]["quality"]["missing_modalities"] == expected


def test_bad_requests_get_clear_4xx(served, tiny_dataset):
    url = served["url"]
    corrupt = httpx.post(f"{url}/v1/studies:analyze", headers=served["auth"], files={"t1": ("x.nii.gz", b"\x1f\x8bnot-a-nifti", "application/gzip")}, timeout=60)
    assert corrupt.status_code == 422 and "t1" in corrupt.json()["error"]
    assert corrupt.headers["x-request-id"] == corrupt.json()["request_id"]
    empty = httpx.post(f"{url}/v1/studies:analyze", headers=served["auth"], files={"age": (None, "50")}, timeout=60)
    assert empty.status_code == 400 and "no modality uploaded" in empty.json()["error"]
    form = httpx.post(f"{url}/v1/studies:analyze", headers=served["auth"], data={"age": "50"}, timeout=60)
    assert form.status_code == 415 and "multipart/form-data" in form.json()["error"]
    big = httpx.post(f"{url}/v1/studies:analyze", headers=served["auth"], files={"t1": ("t1.nii", os.urandom((MAX_REQUEST_MB + 1) << 20))}, timeout=60)
    assert big.status_code == 413 and "exceeds" in big.json()["error"]
    bomb = gzip.compress(b"\0" * ((MAX_REQUEST_MB + 4) << 20))
    inflated = httpx.post(f"{url}/v1/studies:analyze", content=bomb, timeout=60,
                          headers={**served["auth"], "content-type": "multipart/form-data; boundary=x", "content-encoding": "gzip"})  # fmt: skip
    assert inflated.status_code == 413
    text = httpx.post(f"{url}/v1/studies:analyze", content=b"hello", headers={**served["auth"], "content-type": "text/plain"}, timeout=30)
    assert text.status_code == 415
    unknown = httpx.post(f"{url}/v1/tumour:predict", headers=served["auth"], files=files_of(cases(tiny_dataset)[0]), timeout=30)
    assert unknown.status_code == 404 and "unknown task" in unknown.json()["error"]
    age = httpx.post(f"{url}/v1/studies:analyze", headers=served["auth"], files=files_of(cases(tiny_dataset)[0]), data={"age": "old"}, timeout=30)
    assert age.status_code == 400 and "age" in age.json()["error"]
    outside = httpx.post(f"{url}/v1/studies:analyze", headers=served["auth"], json={"s3_uri": "s3://oncoserve-models/triton/"}, timeout=30)
    assert outside.status_code == 403
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200


def test_reports_endpoint_takes_findings_json(served, tmp_path):
    from services.reporting import reference

    response = httpx.post(f"{served['url']}/v1/reports", headers=served["auth"], json=reference.BASE, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == served["reporting"] and body["report"]["integrated_diagnosis"] == "Glioblastoma, IDH-wildtype"
    assert "left hemisphere" in body["report_markdown"] and body["report_fhir"]["resourceType"] == "DiagnosticReport"
    broken = httpx.post(f"{served['url']}/v1/reports", headers=served["auth"], json={"case_id": "x"}, timeout=30)
    assert broken.status_code == 422 and "not a findings document" in broken.json()["error"]


def test_gzip_body_and_s3_uri_inputs(served, tiny_dataset):
    case = cases(tiny_dataset)[2]
    request = httpx.Request("POST", f"{served['url']}/v1/segmentation:predict", files=files_of(case))
    body = request.read()
    zipped = httpx.post(f"{served['url']}/v1/segmentation:predict", content=gzip.compress(body), timeout=180,
                        headers={**served["auth"], "content-type": request.headers["content-type"], "content-encoding": "gzip"})  # fmt: skip
    assert zipped.status_code == 200, zipped.text
    assert set(zipped.json()["result"]["volumes_ml"]) == {"NCR", "ED", "ET", "WT", "TC"}
    settings, store = served["settings"], served["store"]
    for path in case.glob("*.nii.gz"):
        store.fput_object(settings.bucket_data, f"incoming/{case.name}/{path.name}", str(path))
    from_s3 = httpx.post(f"{served['url']}/v1/studies:analyze", headers=served["auth"], json={"s3_uri": f"s3://{settings.bucket_data}/incoming/{case.name}/"}, timeout=180)
    assert from_s3.status_code == 200, from_s3.text
    assert from_s3.json()["findings"]["case_id"] == case.name
    nothing = httpx.post(f"{served['url']}/v1/studies:analyze", headers=served["auth"], json={"s3_uri": f"s3://{settings.bucket_data}/nothing-here/"}, timeout=30)
    assert nothing.status_code == 404


def _local_backend(served, task, version, tmp_path):
    settings = served["settings"]
    return EmbeddedBackend.from_version(served["registry"], served["store"], settings.bucket_models,
                                        settings.triton_repo_prefix, task, version, tmp_path)  # fmt: skip


def test_oip_v2_with_tritonclient_http_and_grpc(served, tiny_dataset, trained, tmp_path):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    study = read_case(tiny_dataset, cases(tiny_dataset)[0].name)
    prepared = preprocess(study)
    image, presence = prepared.image[None], prepared.presence[None]
    expected = _local_backend(served, "classification", trained["classification"], tmp_path).infer({"image": image, "presence": presence})

    http = httpclient.InferenceServerClient(served["url"].removeprefix("http://"), network_timeout=120)
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready("classification")
    meta = http.get_model_metadata("classification")
    assert meta["versions"] == [trained["classification"]] and {t["name"] for t in meta["inputs"]} == {"image", "presence"}
    inputs = [httpclient.InferInput("image", list(image.shape), "FP32"), httpclient.InferInput("presence", list(presence.shape), "FP32")]
    inputs[0].set_data_from_numpy(image, binary_data=True)
    inputs[1].set_data_from_numpy(presence, binary_data=True)
    result = http.infer("classification", inputs, headers=dict(served["auth"]))
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected["probabilities"], atol=1e-5)

    # (tritonclient adds its own headers to the dict it is given: each call gets a copy)
    limits = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    client = grpcclient.InferenceServerClient(served["grpc"], channel_args=limits)
    assert client.is_server_live() and client.is_model_ready("classification")
    assert client.get_model_metadata("classification").versions == [trained["classification"]]
    g_inputs = [grpcclient.InferInput("image", list(image.shape), "FP32"), grpcclient.InferInput("presence", list(presence.shape), "FP32")]
    g_inputs[0].set_data_from_numpy(image)
    g_inputs[1].set_data_from_numpy(presence)
    g_result = client.infer("classification", g_inputs, client_timeout=120, headers=dict(served["auth"]))
    np.testing.assert_allclose(g_result.as_numpy("probabilities"), expected["probabilities"], atol=1e-5)
    assert g_result.get_response().model_version == trained["classification"]

    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("tumour", g_inputs, headers=dict(served["auth"]))
    with pytest.raises(InferenceServerException, match="takes inputs"):
        client.infer("classification", g_inputs[:1], headers=dict(served["auth"]))
    bad = httpx.post(f"{served['url']}/v2/models/classification/infer", headers=served["auth"], content=b'{"inputs": [{"name": "image"', timeout=30)
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]


def test_grpc_study_service(served, tiny_dataset, trained):
    from services.grpc_servicers import study_pb2
    from services.proto import study_pb2_grpc

    case = cases(tiny_dataset)[3]
    request = study_pb2.AnalyzeRequest(case_id=case.name, nifti={m: f[1] for m, f in files_of(case).items()}, age=55.0,
                                       site="grpc-site-a")  # fmt: skip
    with grpc.insecure_channel(served["grpc"], options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        metadata = tuple(served["auth"].items())
        response = study_pb2_grpc.StudyServiceStub(channel).Analyze(request, timeout=180, metadata=metadata)
        findings = json.loads(response.findings_json)
        assert findings["case_id"] == case.name and findings["model_versions"]["segmentation"] == trained["segmentation"]
        assert "## Findings" in response.report_markdown and json.loads(response.report_fhir_json)["resourceType"] == "DiagnosticReport"
        mask = nib.Nifti1Image.from_bytes(gzip.decompress(response.segmentation_nifti_gz))
        assert mask.shape == read_case(tiny_dataset, case.name).reference.shape
        with pytest.raises(grpc.RpcError) as refused:
            study_pb2_grpc.StudyServiceStub(channel).Analyze(study_pb2.AnalyzeRequest(nifti={"t1": b"junk"}), timeout=60,
                                                             metadata=metadata)  # fmt: skip
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        bad_site = study_pb2.AnalyzeRequest(nifti={m: f[1] for m, f in files_of(case).items()}, site="../x")
        with pytest.raises(grpc.RpcError) as refused:
            study_pb2_grpc.StudyServiceStub(channel).Analyze(bad_site, timeout=60, metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "site" in refused.value.details()
        # The same request checks as REST on every input kind (gRPC once skipped the age check on DICOM and S3).
        for bad in (study_pb2.AnalyzeRequest(dicom_zip=b"PK\x03\x04", age=200.0), study_pb2.AnalyzeRequest(s3_uri="s3://data/x/", age=-1.0)):
            with pytest.raises(grpc.RpcError) as refused:
                study_pb2_grpc.StudyServiceStub(channel).Analyze(bad, timeout=60, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside 0-130" in refused.value.details()
    # The site a gRPC caller names is the study's drift site, as a REST caller's is (services/monitoring.py).
    assert wait_until(lambda: any(r.get("site") == "grpc-site-a" for r in monitoring_store.records(served["store"], served["settings"].bucket_artifacts, 1)),
                      timeout_s=30, interval_s=0.5)  # fmt: skip


def test_dicom_zip_in_dicom_seg_out(served, tiny_dataset, tmp_path):
    import highdicom as hd
    import pydicom

    study = read_case(tiny_dataset, cases(tiny_dataset)[4].name)
    uid = pydicom.uid.generate_uid()
    descriptions = {"t1": "T1 MPRAGE", "t1ce": "T1 post gad", "t2": "T2 TSE", "flair": "FLAIR"}
    series = {m: series_datasets(study.images[m], descriptions[m], uid) for m in study.present}
    archive = write_zip(tmp_path / "study.zip", series)
    run = oncoserve("predict", str(archive), "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    seg = hd.seg.segread(tmp_path / "out" / "segmentation.dcm")
    assert seg.Modality == "SEG" and len(seg.SegmentSequence) == 3
    assert seg.PatientName != "" and not any(s in str(seg) for s in PHI_STRINGS)
    reference = study.reference_name  # T1ce: the series the mask and the SEG refer to
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID != series[reference][0].SeriesInstanceUID  # de-identified UIDs
    mask = nib.load(tmp_path / "out" / "segmentation.nii.gz")
    assert mask.shape == study.images[reference].shape


def test_metrics_and_audit(served, trained):
    text = httpx.get(f"{served['url']}/metrics", timeout=10).text
    for task in TASKS:
        assert f'oncoserve_model_version_info{{task="{task}",version="{trained[task]}"}} 1.0' in text
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    stages = {(s.labels["task"], s.labels["stage"]) for s in samples if s.name == "oncoserve_stage_seconds_count"}
    assert {(t, stage) for t in TASKS for stage in ("load", "infer", "postprocess")} <= stages
    assert 'oncoserve_requests_total{route="/v1/studies:analyze",status="200"}' in text
    assert "oncoserve_batch_size_count" in text
    assert 'oncoserve_report_guard_total{generator="template",outcome="passed"}' in text
    assert 'oncoserve_report_format_total{generator="template",outcome="compliant"}' in text
    audit = [json.loads(line) for line in (served["settings"].audit_file).read_text().splitlines()]
    analyses = [a for a in audit if a.get("action") == "analyze"]
    assert analyses and all(a["model_versions"] for a in analyses)
    assert all("case_id" not in a and len(a["case_ref"]) == 16 for a in analyses)
    assert {a["actor"] for a in analyses} >= {"test-admin"}  # predict sends the CLI's token


def test_autoscaling_adds_a_segmentation_replica_under_a_burst(served, tiny_dataset):
    files = files_of(cases(tiny_dataset)[5])

    def running() -> int:
        info = json.loads(oncoserve("serve", "status", "--json").stdout)
        return info["applications"]["oncoserve"]["deployments"]["segmentation"]["replicas"].get("RUNNING", 0)

    assert running() == 1
    errors: list = []
    scaled_up = threading.Event()

    def burst():
        # Load until the second replica runs (bounded: at most 40 requests per client).
        with httpx.Client(timeout=300) as client:
            for _ in range(40):
                if scaled_up.is_set():
                    return
                r = client.post(f"{served['url']}/v1/segmentation:predict", headers=served["auth"], files=files)
                if r.status_code != 200:
                    errors.append(r.status_code)

    threads = [threading.Thread(target=burst) for _ in range(6)]
    for t in threads:
        t.start()
    scaled = wait_until(lambda: running() >= 2, timeout_s=180, interval_s=1.0)
    scaled_up.set()
    for t in threads:
        t.join()
    assert scaled, "no second segmentation replica under a burst of 6 concurrent clients"
    assert errors == []


def test_hot_swap_moves_versions_with_no_failed_request(served, tiny_dataset, trained):
    """Two localization replicas (SERVE_TEST_CONFIG): once any study is answered by the new version, no
    later one is answered by the old, whichever replica takes it (services.version_barrier)."""
    from pipelines.platform_client import PlatformClient

    settings = served["settings"]
    run = oncoserve("train", "localization", "--data", str(tiny_dataset), "--epochs", "1")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    new = run.stdout.split("registered model localization version")[-1].split()[0]
    served["hot_swapped"] = new
    platform = PlatformClient(settings)
    platform.compile("localization", new, force=True, reason="hot-swap test")
    files = files_of(cases(tiny_dataset)[6])
    seen, failures, stop = [], [], threading.Event()

    def loop():
        with httpx.Client(timeout=120) as client:
            for _ in range(400):  # bounded
                if stop.is_set():
                    return
                r = client.post(f"{served['url']}/v1/localization:predict", headers=served["auth"], files=files)
                if r.status_code == 200:
                    seen.append(r.json()["model_version"])
                else:
                    failures.append((r.status_code, r.text[:200]))

    def barrier() -> dict:
        return httpx.get(f"{served['url']}/v1/models", timeout=10).json()["version_barrier"]["localization"]

    assert wait_until(lambda: barrier()["replicas"] == 2, timeout_s=60, interval_s=0.2), barrier()
    commits = barrier()["commits"]
    worker = threading.Thread(target=loop)
    worker.start()
    assert wait_until(lambda: len(seen) >= 3, timeout_s=120, interval_s=0.1)
    platform.promote("localization", new, "champion", reason="hot-swap test", force=True)  # signed, then the alias
    switched = wait_until(lambda: new in seen[-1:], timeout_s=120, interval_s=0.1)
    count = len(seen)
    wait_until(lambda: len(seen) >= count + 3, timeout_s=60, interval_s=0.1)
    stop.set()
    worker.join()
    assert switched and failures == []
    assert seen[0] == trained["localization"] and seen[-1] == new
    first_new = seen.index(new)
    assert set(seen[first_new:]) == {new}, "a request went back to the old version after the swap"
    assert barrier() == {"active": new, "replicas": 2, "commits": commits + 1, "wanted": [new]}  # one commit, both replicas
    assert httpx.get(f"{served['url']}/v1/models", timeout=10).json()["model_versions"]["localization"] == new
    text = httpx.get(f"{served['url']}/metrics", timeout=10).text
    assert f'oncoserve_model_version_info{{task="localization",version="{new}"}} 1.0' in text


def test_triton_backend_through_serve_with_a_clear_503_and_fallback(served, tiny_dataset, trained, tmp_path):
    """classification on the Triton backend (a real OIP v2 server: KServe in its own process), then the
    server gone (503 naming it), then the same with fallback to embedded onnxruntime switched on."""
    from tests.helpers import export_triton_repo, start_v2_server

    settings = served["settings"]
    files = files_of(cases(tiny_dataset)[7])
    embedded = httpx.post(f"{served['url']}/v1/classification:predict", headers=served["auth"], files=files, timeout=180)
    assert embedded.status_code == 200, embedded.text
    repo = export_triton_repo(settings, served["store"], ["classification"], tmp_path / "repo")
    url, proc = start_v2_server(repo, tmp_path / "kserve.log", "classification", trained["classification"])

    def deploy(fallback: bool):
        config = tmp_path / f"triton-{fallback}.yaml"
        config.write_text(TEST_CONFIG.replace(
            "classification: {autoscaling: {min_replicas: 1, max_replicas: 1}}",
            f"classification: {{autoscaling: {{min_replicas: 1, max_replicas: 1}}, "
            f"backend: {{kind: triton, triton_url: '{url}', fallback_to_embedded: {str(fallback).lower()}}}}}"))  # fmt: skip
        run = oncoserve("serve", "up", "--config", str(config))
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]

    try:
        deploy(fallback=False)
        models = httpx.get(f"{served['url']}/v1/models", timeout=30).json()
        assert models["deployments"]["classification"]["backend"] == "triton"
        remote = httpx.post(f"{served['url']}/v1/classification:predict", headers=served["auth"], files=files, timeout=180)
        assert remote.status_code == 200, remote.text
        for marker, result in remote.json()["result"].items():
            assert result["probabilities"] == pytest.approx(embedded.json()["result"][marker]["probabilities"], abs=1e-3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    down = httpx.post(f"{served['url']}/v1/classification:predict", headers=served["auth"], files=files, timeout=180)
    assert down.status_code == 503 and f"triton at {url}" in down.json()["error"]
    assert httpx.get(f"{served['url']}/healthz", timeout=10).status_code == 200
    deploy(fallback=True)
    fallback = httpx.post(f"{served['url']}/v1/classification:predict", headers=served["auth"], files=files, timeout=180)
    assert fallback.status_code == 200, fallback.text
    assert 'oncoserve_backend_errors_total{backend="triton",task="classification"}' in httpx.get(f"{served['url']}/metrics", timeout=10).text
