"""`oncoserve jobs submit|list|show|wait|review|retry`: asynchronous study analyses on the platform API."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table

from oncoserve.auth import AuthError
from oncoserve.settings import Settings
from pipelines.cli._console import console, err_console, user_errors
from pipelines.platform_client import PlatformClient, PlatformUnavailable
from serving.registry import RegistryError

app = typer.Typer(help="Analysis jobs: queued, run, reviewed and exported by the platform.", no_args_is_help=True)
ERRORS = (AuthError, PlatformUnavailable, RegistryError, ValueError)
FINAL = ("exported", "completed", "rejected", "failed")


def _client() -> PlatformClient:
    return PlatformClient(Settings(), timeout_s=120)


def _line(job: dict) -> str:
    extra = f" - {job['error']}" if job.get("error") else (f" - {job['detail']}" if job.get("detail") else "")
    return f"{job['id']}  {job['state']}  {job['progress'] * 100:.0f}%{extra}"


@app.command()
def submit(case: Path = typer.Argument(..., help="A case folder (NIfTI per modality, or DICOM files) or a DICOM zip."),
           export: bool = typer.Option(False, "--export", help="Send the results to the PACS once a clinician accepts them (DICOM only)."),
           age: float = typer.Option(None, "--age"), key: str = typer.Option(None, "--idempotency-key",
                                                                             help="Re-sending with the same key returns the same job.")) -> None:  # fmt: skip
    """Queue an analysis; prints the job id at once."""
    from pipelines.study_client import StudyClientError, upload_files

    with user_errors(*ERRORS, StudyClientError):
        if not case.exists():
            raise ValueError(f"{case}: not found")
        files, kind = upload_files(case)
        form = {k: v for k, v in {"age": age, "export": "true" if export else None,
                                  "case_id": case.name if kind == "nifti" else None}.items() if v is not None}  # fmt: skip
        job = _client().submit_job(files, {k: str(v) for k, v in form.items()}, key)
    console.print(f"job {job['id']} {job['state']}")


@app.command("list")
def list_(state: str = typer.Option(None, "--state"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Jobs you may see, newest first."""
    with user_errors(*ERRORS):
        jobs = _client().jobs(state)
    if as_json:
        console.print_json(json.dumps(jobs))
        return
    table = Table("job", "state", "progress", "owner", "source", "updated", "detail")
    for j in jobs:
        table.add_row(j["id"], j["state"], f"{j['progress'] * 100:.0f}%", j["owner"], j["source"],
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["updated"])), (j.get("error") or j.get("detail") or "")[:80])  # fmt: skip
    console.print(table)


@app.command()
def show(job_id: str) -> None:
    """One job as JSON: state, progress, findings, artifact links, review, delivery."""
    with user_errors(*ERRORS):
        console.print_json(json.dumps(_client().job(job_id)))


@app.command()
def wait(job_id: str, until: str = typer.Option(None, "--until", help="A state to wait for (default: a final one)."),
         timeout: float = typer.Option(1800, "--timeout", help="Seconds before giving up (exit 2).")) -> None:  # fmt: skip
    """Follow a job until it ends (or reaches --until); exit 1 if it failed or was rejected."""
    client, deadline, last = _client(), time.monotonic() + timeout, None
    with user_errors(*ERRORS):
        while True:
            job = client.job(job_id)
            if _line(job) != last:
                last = _line(job)
                console.print(last, highlight=False)
            if job["state"] == until or (until is None and job["state"] in FINAL):
                break
            if job["state"] in FINAL:
                err_console.print(f"[bold red]error:[/] job ended {job['state']} before reaching {until!r}", highlight=False)
                raise typer.Exit(1)
            if time.monotonic() > deadline:
                err_console.print(f"[bold red]error:[/] job still {job['state']} after {timeout:g} s", highlight=False)
                raise typer.Exit(2)
            time.sleep(1.0)
    if job["state"] in ("failed", "rejected"):
        raise typer.Exit(1)


@app.command()
def review(job_id: str, decision: str = typer.Argument(..., help="accept | reject"),
           reason: str = typer.Option(..., "--reason", help="Why (kept in the audit log).")) -> None:  # fmt: skip
    """Accept (results go to the PACS) or reject a job awaiting review (clinician role)."""
    with user_errors(*ERRORS):
        if decision not in ("accept", "reject"):
            raise ValueError("decision must be accept or reject")
        job = _client().review_job(job_id, decision, reason)
    console.print(_line(job), highlight=False)


@app.command()
def retry(job_id: str) -> None:
    """Run a failed job again from its stored input (or its export again)."""
    with user_errors(*ERRORS):
        console.print(_line(_client().retry_job(job_id)), highlight=False)
