"""What the gateway computes for the web UI: latency quantiles from its metrics, demo files, display images."""

from __future__ import annotations

import base64
import gzip

import nibabel as nib
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from imaging.study import Study, Volume
from services import ui_support


def test_request_summary_matches_prometheus_histogram_quantiles():
    registry = CollectorRegistry()
    requests = Counter("oncoserve_requests", "r", ["route", "status"], registry=registry)
    seconds = Histogram("oncoserve_request_seconds", "s", ["route"], buckets=(0.1, 0.5, 1.0, 2.0), registry=registry)
    for value in [0.05] * 50 + [0.7] * 49 + [1.5]:
        seconds.labels("/v1/studies:analyze").observe(value)
    requests.labels("/v1/studies:analyze", "200").inc(97)
    requests.labels("/v1/studies:analyze", "503").inc(2)
    requests.labels("/v1/studies:analyze", "400").inc(1)
    summary = ui_support.request_summary(generate_latest(registry).decode())["/v1/studies:analyze"]
    assert summary["requests"] == 100 and summary["client_errors"] == 1
    assert summary["error_rate"] == 0.02  # 5xx only
    assert summary["p50_ms"] == 100.0  # exactly the 50th observation: the 0.1 s bucket's upper bound
    # p99: 99th of 100 falls in (0.5, 1.0]: 0.5 + 0.5 * (99 - 50) / 49 = 1.0 s
    assert summary["p99_ms"] == 1000.0
    assert ui_support.request_summary("") == {}


def test_demo_files_never_leave_their_folder(tmp_path):
    case = tmp_path / "PH-1"
    case.mkdir()
    (case / "PH-1_flair.nii.gz").write_bytes(b"x")
    (tmp_path / "secret_flair.nii.gz").write_bytes(b"s")
    assert ui_support.demo_cases(tmp_path) == [{"case_id": "PH-1", "modalities": ["flair"]}]
    assert ui_support.demo_file(tmp_path, "PH-1", "flair") == case / "PH-1_flair.nii.gz"
    for case_id, modality in (("..", "flair"), ("../PH-1", "flair"), ("PH-1", "passwd"), ("PH-2", "flair"), ("", "t1")):
        assert ui_support.demo_file(tmp_path, case_id, modality) is None
    assert ui_support.demo_file(None, "PH-1", "flair") is None and ui_support.demo_cases(None) == []


def test_preview_images_are_on_the_reference_grid_and_display_scaled():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    t1 = np.random.default_rng(0).normal(100, 20, (10, 12, 8)).astype(np.float32)
    flair = np.random.default_rng(1).normal(50, 5, (5, 6, 4)).astype(np.float32)  # coarser grid: resampled
    study = Study("c", {"t1": Volume(t1, affine), "flair": Volume(flair, np.diag([4.0, 4.0, 4.0, 1.0]))})
    out = ui_support.preview_images(study)
    assert set(out) == {"t1", "flair"}
    for b64 in out.values():
        img = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(b64)))
        data = np.asarray(img.dataobj)
        assert img.shape == (10, 12, 8) and np.allclose(img.affine, affine) and data.dtype == np.int16
        assert data.min() >= 0 and data.max() <= 1000


def test_ui_headers_name_only_this_origin_and_the_platform_api():
    headers = ui_support.security_headers("http://127.0.0.1:8600")
    csp = headers["content-security-policy"]
    assert "connect-src 'self' http://127.0.0.1:8600;" in csp and "*" not in csp
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer"
