"""`oncoserve predict CASE_DIR --out DIR [--url URL]`: analyse one study through the serving API.

CASE_DIR is a case folder with BraTS-named NIfTI files (*_t1, *_t1ce, *_t2, *_flair), a zip of a
DICOM study, or a folder of DICOM files. Writes DIR/findings.json, DIR/segmentation.nii.gz, the report
(DIR/report.md, DIR/report.fhir.json) and, for DICOM input, DIR/segmentation.dcm (DICOM SEG).
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import httpx
import typer

from imaging.dataset import read_clinical
from imaging.ingest import NIFTI_NAME
from oncoserve.settings import Settings
from pipelines.cli._console import console, err_console


def _fail(message: str, code: int = 1):
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _upload(case: Path) -> tuple[dict, str]:
    """Multipart files for the request, and the input kind."""
    if case.is_file() and zipfile.is_zipfile(case):
        return {"dicom": (case.name, case.read_bytes(), "application/zip")}, "dicom"
    if not case.is_dir():
        _fail(f"{case}: not a case folder or a DICOM zip")
    files = {}
    for path in sorted(case.iterdir()):
        match = NIFTI_NAME.search(path.name)
        if match and path.is_file() and match.group(1).lower() != "seg":
            files[match.group(1).lower()] = (path.name, path.read_bytes(), "application/octet-stream")
    if files:
        return files, "nifti"
    dicoms = [p for p in sorted(case.rglob("*")) if p.is_file()]
    if not dicoms:
        _fail(f"{case}: no *_t1/_t1ce/_t2/_flair NIfTI and no DICOM files")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in dicoms:
            zf.write(p, p.relative_to(case).as_posix())
    return {"dicom": (f"{case.name}.zip", buffer.getvalue(), "application/zip")}, "dicom"


def predict(
    case: Path = typer.Argument(..., help="Case folder (BraTS NIfTI names), DICOM zip, or DICOM folder."),
    out: Path = typer.Option(..., "--out", help="Folder for findings.json and segmentation.nii.gz."),
    url: str = typer.Option(None, "--url", help="Serving API base URL (default: this machine's, from settings)."),
    age: float = typer.Option(None, "--age", help="Age in years (default: the dataset's clinical.csv, if any)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for the analysis."),
) -> None:
    """Analyse a study with the served champions and write the findings and the mask."""
    settings = Settings()
    base = (url or settings.serve_url).rstrip("/")
    if not case.exists():
        _fail(f"{case}: not found")
    try:
        httpx.get(f"{base}/healthz", timeout=10).raise_for_status()
    except httpx.HTTPError:
        _fail(f"no oncoserve serving API answers at {base}; start one with `oncoserve stack up` and "
              "`oncoserve serve up` (or pass --url)", 3)  # fmt: skip
    files, kind = _upload(case)
    form = {"case_id": case.name} if kind == "nifti" else {}
    if age is None and kind == "nifti":
        age = read_clinical(case.parent).get(case.name, {}).get("age") if (case.parent / "clinical.csv").exists() else None
    if age not in (None, ""):
        form["age"] = str(age)
    headers = {"authorization": f"Bearer {settings.cli_token()}"} if settings.cli_token() else {}
    with console.status(f"analysing {case.name} at {base}"):
        try:
            response = httpx.post(f"{base}/v1/studies:analyze", files=files, data=form, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            _fail(f"request to {base} failed: {exc}", 3)
    if response.status_code != 200:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text[:500]
        _fail(f"HTTP {response.status_code}: {message}", 2 if response.status_code < 500 else 3)
    body = response.json()
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
    f = body["findings"]
    vols = f["segmentation"]["volumes_ml"]
    console.print(f"{f['case_id']}: WT {vols['WT']:.1f} mL, ET {vols['ET']:.1f} mL; "
                  + ", ".join(f"{k} {v['label']} ({max(v['probabilities'].values()):.2f})" for k, v in f["classification"].items())
                  + f"; survival risk {f['survival']['risk_group']}"
                  + (f"; missing {', '.join(f['quality']['missing_modalities'])}" if f["quality"]["missing_modalities"] else "")
                  + ("; OUT OF DISTRIBUTION" if f["quality"]["ood_flag"] else ""))  # fmt: skip
    report = f.get("report") or {}
    if report.get("integrated_diagnosis"):
        console.print(f"report ({report['generator']}): {report['integrated_diagnosis']}")
    console.print(f"wrote {', '.join(str(out / w) for w in written)} (request {body['request_id']})")
