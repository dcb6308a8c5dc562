"""Raw scanner studies through the served platform: the gateway runs preprocessing v2, reports every
step in findings.quality.preprocessing, refuses what fails quality control with a 422 naming the check,
and returns the quality-control picture with ?preview=true. The served models are the session's."""

from __future__ import annotations

import base64
import gzip
import io

import httpx
import nibabel as nib
import numpy as np
import pytest

from imaging.detect import dice
from imaging.phantoms import make_case
from imaging.raw_phantoms import make_raw_case
from imaging.study import Study, Volume

pytestmark = pytest.mark.integration
SEED = 2


def upload(study: Study) -> dict:
    files = {}
    for modality, volume in study.images.items():
        img = nib.Nifti1Image(np.asarray(volume.data), volume.affine)
        files[modality] = (f"{modality}.nii.gz", gzip.compress(img.to_bytes(), compresslevel=1), "application/gzip")
    return files


def analyse(served, study: Study, preview: bool = False) -> httpx.Response:
    url = f"{served['url']}/v1/studies:analyze" + ("?preview=true" if preview else "")
    return httpx.post(url, headers=served["auth"], files=upload(study), timeout=600)


def served_dice(response: httpx.Response, truth: Volume) -> float:
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(response.json()["mask_nifti_gz_b64"])))
    assert mask.shape == truth.shape and np.allclose(mask.affine, truth.affine, atol=1e-4)
    return dice(np.asarray(mask.dataobj) > 0, truth.data > 0)


@pytest.fixture(scope="module")
def twin_case():
    return make_case(SEED, 3, sites=1)[0]


@pytest.fixture(scope="module")
def twin_answer(served, twin_case):
    response = analyse(served, twin_case, preview=True)
    assert response.status_code == 200, response.text
    return response


def test_fast_path_is_reported_and_the_qc_picture_comes_with_preview(twin_answer):
    body = twin_answer.json()
    pre = body["findings"]["quality"]["preprocessing"]
    assert pre["path"] == "fast" and pre["version"] == body["findings"]["preprocessing_version"]
    assert [s["step"] for s in pre["steps"]][:1] == ["detect"] and body["findings"]["quality"]["flags"] == []
    png = base64.b64decode(body["qc_png_b64"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    picture = Image.open(io.BytesIO(png))
    assert picture.width > picture.height  # three planes by (1 + other modalities) columns


def test_noisy_background_segments_like_its_zero_background_twin(served, twin_case, twin_answer):
    rng = np.random.default_rng(0)
    noisy = Study(twin_case.case_id, {m: Volume(np.hypot(v.data + rng.normal(0, 25, v.shape), rng.normal(0, 25, v.shape)).astype(np.float32), v.affine)
                                      for m, v in twin_case.images.items()})  # fmt: skip
    response = analyse(served, noisy)
    assert response.status_code == 200, response.text
    assert response.json()["findings"]["quality"]["preprocessing"]["steps"][0]["noisy_background"]
    clean, noisy_dice = served_dice(twin_answer, twin_case.segmentation), served_dice(response, twin_case.segmentation)
    assert abs(noisy_dice - clean) <= 0.03, (noisy_dice, clean)


def test_raw_scanner_study_segments_like_its_preprocessed_twin(served, twin_case, twin_answer):
    raw, _, _ = make_raw_case(SEED, 3)
    response = analyse(served, raw)
    assert response.status_code == 200, response.text
    pre = response.json()["findings"]["quality"]["preprocessing"]
    ran = [s["step"] for s in pre["steps"] if not s.get("skipped")]
    assert pre["path"] == "raw" and ran.count("register") == len(raw.present) - 1
    assert {"skull_strip", "n4", "resample", "normalise"} <= set(ran)
    raw_dice, twin_dice = served_dice(response, raw.segmentation), served_dice(twin_answer, twin_case.segmentation)
    assert abs(raw_dice - twin_dice) <= 0.03, (raw_dice, twin_dice)


def test_a_study_failing_quality_control_is_a_422_naming_the_check(served):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-80, -90, -70]
    box = np.zeros((80, 90, 70), np.int16)
    box[10:70, 10:80, 10:60] = 700  # a block, not a brain
    response = analyse(served, Study("BOX", {"t1": Volume(box, affine)}))
    assert response.status_code == 422
    assert "quality control failed" in response.json()["error"] and "brain_shape" in response.json()["error"]


def test_dicom_series_mapping_is_reported_and_can_be_overridden(served, twin_case, tmp_path):
    from pydicom.uid import generate_uid

    from tests.dicom_factory import series_datasets, write_zip

    uid = generate_uid()
    names = {"t1": "t1_mprage_sag", "t1ce": "Series 7", "t2": "T2W_TSE", "flair": "t2_tse_dark-fluid_tra"}
    series = {m: series_datasets(twin_case.images[m], names[m], uid) for m in twin_case.present}
    archive = write_zip(tmp_path / "study.zip", series).read_bytes()
    url = f"{served['url']}/v1/studies:analyze"
    files = {"dicom": ("study.zip", archive, "application/zip")}
    # "Series 7" says nothing and carries no tags: without a mapping the study lacks T1ce.
    plain = httpx.post(url, headers=served["auth"], files=files, timeout=600)
    assert plain.status_code == 200, plain.text
    decided = plain.json()["findings"]["quality"]["preprocessing"]["series_mapping"]
    assert decided["flair"]["modality"] == "flair" and decided["flair"]["confidence"] >= 0.9
    without_t1ce = [m for m in ("t1", "t1ce", "t2", "flair") if m == "t1ce" or m in twin_case.missing]
    assert "t1ce" not in decided and plain.json()["findings"]["quality"]["missing_modalities"] == without_t1ce
    mapped = httpx.post(url, headers=served["auth"], files=files, data={"mapping": '{"Series 7": "t1ce"}'}, timeout=600)
    assert mapped.status_code == 200, mapped.text
    decided = mapped.json()["findings"]["quality"]["preprocessing"]["series_mapping"]
    assert decided["t1ce"]["reason"] == "explicit --mapping"
    assert mapped.json()["findings"]["quality"]["missing_modalities"] == twin_case.missing
    bad = httpx.post(url, headers=served["auth"], files=files, data={"mapping": "t1ce please"}, timeout=60)
    assert bad.status_code == 400 and "mapping" in bad.json()["error"]
