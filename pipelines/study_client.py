"""A client of the serving API for one study: upload (NIfTI per modality or DICOM), analyse, write the
outputs. Used by `oncoserve predict` and the demo."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import httpx

from imaging.dataset import read_clinical
from imaging.ingest import NIFTI_NAME


class StudyClientError(RuntimeError):
    """The study could not be sent or the server refused it; `exit_code` is what the CLI returns."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def upload_files(case: Path) -> tuple[dict, str]:
    """Multipart files for the request, and the input kind."""
    if case.is_file() and zipfile.is_zipfile(case):
        return {"dicom": (case.name, case.read_bytes(), "application/zip")}, "dicom"
    if not case.is_dir():
        raise StudyClientError(f"{case}: not a case folder or a DICOM zip")
    files = {}
    for path in sorted(case.iterdir()):
        match = NIFTI_NAME.search(path.name)
        if match and path.is_file() and match.group(1).lower() != "seg":
            files[match.group(1).lower()] = (path.name, path.read_bytes(), "application/octet-stream")
    if files:
        return files, "nifti"
    dicoms = [p for p in sorted(case.rglob("*")) if p.is_file()]
    if not dicoms:
        raise StudyClientError(f"{case}: no *_t1/_t1ce/_t2/_flair NIfTI and no DICOM files")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in dicoms:
            zf.write(p, p.relative_to(case).as_posix())
    return {"dicom": (f"{case.name}.zip", buffer.getvalue(), "application/zip")}, "dicom"


def analyze(base: str, case: Path, token: str | None, age: float | None = None, timeout: float = 600.0,
            mapping: str | None = None) -> dict:  # fmt: skip
    """POST the study to /v1/studies:analyze; returns the response body."""
    base = base.rstrip("/")
    if not case.exists():
        raise StudyClientError(f"{case}: not found")
    try:
        httpx.get(f"{base}/healthz", timeout=10).raise_for_status()
    except httpx.HTTPError:
        raise StudyClientError(f"no oncoserve serving API answers at {base}; start one with `oncoserve stack up` and "
                               "`oncoserve serve up` (or pass --url)", 3) from None  # fmt: skip
    files, kind = upload_files(case)
    form = {"case_id": case.name} if kind == "nifti" else {}
    if age is None and kind == "nifti" and (case.parent / "clinical.csv").exists():
        age = read_clinical(case.parent).get(case.name, {}).get("age")
    if age not in (None, ""):
        form["age"] = str(age)
    if mapping:
        if kind != "dicom":
            raise StudyClientError("--mapping applies to DICOM input (series -> modality)")
        form["mapping"] = mapping
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(f"{base}/v1/studies:analyze", files=files, data=form, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise StudyClientError(f"request to {base} failed: {exc}", 3) from None
    if response.status_code != 200:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text[:500]
        raise StudyClientError(f"HTTP {response.status_code}: {message}", 2 if response.status_code < 500 else 3)
    return response.json()


def write_outputs(body: dict, out: Path) -> list[Path]:
    """findings.json, segmentation.nii.gz, report.md + report.fhir.json, segmentation.dcm (DICOM input)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "findings.json").write_text(json.dumps(body["findings"], indent=2) + "\n")
    (out / "segmentation.nii.gz").write_bytes(base64.b64decode(body["mask_nifti_gz_b64"]))
    written = ["findings.json", "segmentation.nii.gz"]
    if body.get("report_markdown"):
        (out / "report.md").write_text(body["report_markdown"])
        (out / "report.fhir.json").write_text(json.dumps(body["report_fhir"], indent=2) + "\n")
        written += ["report.md", "report.fhir.json"]
    if body.get("dicom_seg_b64"):
        (out / "segmentation.dcm").write_bytes(base64.b64decode(body["dicom_seg_b64"]))
        written.append("segmentation.dcm")
    return [out / w for w in written]


def findings_line(findings: dict) -> str:
    """One line a reader can scan: volumes, markers with probabilities, risk group, quality flags."""
    f = findings
    vols = f["segmentation"]["volumes_ml"]
    return (f"{f['case_id']}: WT {vols['WT']:.1f} mL, ET {vols['ET']:.1f} mL; "
            + ", ".join(f"{k} {v['label']} ({max(v['probabilities'].values()):.2f})" for k, v in f["classification"].items())
            + f"; survival risk {f['survival']['risk_group']}"
            + (f"; missing {', '.join(f['quality']['missing_modalities'])}" if f["quality"]["missing_modalities"] else "")
            + ("; OUT OF DISTRIBUTION" if f["quality"]["ood_flag"] else "")
            + (f"; QUALITY CONTROL FAILED: {', '.join(f['quality']['flags'])}" if f["quality"].get("flags") else "")
            + (f"; raw study ({', '.join(s['step'] for s in f['quality']['preprocessing']['steps'] if not s.get('skipped'))})"
               if (f["quality"].get("preprocessing") or {}).get("path") == "raw" else ""))  # fmt: skip
