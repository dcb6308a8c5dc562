"""`oncoserve predict CASE_DIR --out DIR [--url URL]`: analyse one study through the serving API.

CASE_DIR is a case folder with BraTS-named NIfTI files (*_t1, *_t1ce, *_t2, *_flair), a zip of a
DICOM study, or a folder of DICOM files. Writes DIR/findings.json, DIR/segmentation.nii.gz, the report
(DIR/report.md, DIR/report.fhir.json) and, for DICOM input, DIR/segmentation.dcm (DICOM SEG).
"""

from __future__ import annotations

from pathlib import Path

import typer

from oncoserve.settings import Settings
from pipelines.cli._console import console, err_console


def predict(
    case: Path = typer.Argument(..., help="Case folder (BraTS NIfTI names), DICOM zip, or DICOM folder."),
    out: Path = typer.Option(..., "--out", help="Folder for findings.json and segmentation.nii.gz."),
    url: str = typer.Option(None, "--url", help="Serving API base URL (default: this machine's, from settings)."),
    age: float = typer.Option(None, "--age", help="Age in years (default: the dataset's clinical.csv, if any)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for the analysis."),
    mapping: str = typer.Option(None, "--mapping", help='DICOM: JSON series description or UID -> modality, overriding '
                                'the automatic mapping, e.g. \'{"Series 3": "t1ce"}\''),
) -> None:
    """Analyse a study with the served champions and write the findings and the mask."""
    from pipelines.study_client import StudyClientError, analyze, findings_line, write_outputs  # imaging: only here

    settings = Settings()
    base = (url or settings.serve_url).rstrip("/")
    try:
        with console.status(f"analysing {case.name} at {base}"):
            body = analyze(base, case, settings.cli_token(), age, timeout, mapping)
    except StudyClientError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(exc.exit_code) from None
    written = write_outputs(body, out)
    f = body["findings"]
    console.print(findings_line(f))
    report = f.get("report") or {}
    if report.get("integrated_diagnosis"):
        console.print(f"report ({report['generator']}): {report['integrated_diagnosis']}")
    console.print(f"wrote {', '.join(str(w) for w in written)} (request {body['request_id']})")
