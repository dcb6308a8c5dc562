"""The study gateway on Ray Serve (real Ray, real HTTP): upload NIfTI, get findings and the mask back."""

from __future__ import annotations

import base64
import gzip
import socket

import httpx
import nibabel as nib
import numpy as np
import pytest

from imaging.dataset import read_case
from services.analyzer import TASKS
from tests.conftest import compiled_champions

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway(live_stack, trained):
    import ray
    from ray import serve

    from services.gateway import deploy

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with compiled_champions(live_stack, {t: trained[t] for t in TASKS}):
        try:
            yield deploy(live_stack, http_port=port)
        finally:
            serve.shutdown()
            ray.shutdown()


def files_of(case_dir, skip=()):
    return {p.name.split("_")[-1].split(".")[0]: (p.name, p.read_bytes(), "application/gzip")
            for p in sorted(case_dir.glob("*.nii.gz")) if not p.name.endswith("_seg.nii.gz")
            and p.name.split("_")[-1].split(".")[0] not in skip}  # fmt: skip


def test_analyze_returns_findings_and_a_mask_on_the_input_grid(gateway, tiny_dataset, trained):
    case = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[0]
    response = httpx.post(f"{gateway}/v1/studies:analyze", files=files_of(case), data={"age": "61"}, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["x-request-id"] == body["request_id"]
    assert body["findings"]["model_versions"] == {t: trained[t] for t in TASKS}
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(body["mask_nifti_gz_b64"])))
    reference = read_case(tiny_dataset, case.name).reference
    assert mask.shape == reference.shape and np.allclose(mask.affine, reference.affine)
    assert httpx.get(f"{gateway}/v1/models", timeout=10).json()["model_versions"] == {t: trained[t] for t in TASKS}


def test_missing_flair_and_bad_uploads(gateway, tiny_dataset):
    case = sorted(p for p in tiny_dataset.iterdir() if p.is_dir())[1]
    no_flair = httpx.post(f"{gateway}/v1/studies:analyze", files=files_of(case, skip=("flair",)), timeout=120)
    assert no_flair.status_code == 200 and "flair" in no_flair.json()["findings"]["quality"]["missing_modalities"]
    corrupt = httpx.post(f"{gateway}/v1/studies:analyze", files={"t1": ("x.nii.gz", b"\x1f\x8bnot-a-nifti", "application/gzip")}, timeout=60)
    assert corrupt.status_code == 422 and "t1.nii.gz" in corrupt.json()["error"]
    empty = httpx.post(f"{gateway}/v1/studies:analyze", data={"age": "50"}, timeout=60)
    assert empty.status_code == 400 and "no modality uploaded" in empty.json()["error"]
