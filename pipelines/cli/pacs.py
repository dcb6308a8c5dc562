"""`oncoserve pacs receive`: the DICOM receiver (C-STORE/C-ECHO SCP) in the foreground (a stack component);
`oncoserve pacs pull STUDY_UID`: a job that pulls a study from the configured DICOMweb server."""

from __future__ import annotations

import signal
import threading

import typer

from oncoserve.settings import Settings
from pipelines.cli._console import console, user_errors

app = typer.Typer(help="Hospital integration: the DICOM receiver.", no_args_is_help=True)


@app.command()
def receive() -> None:
    """Receive studies on settings.dicom_port as settings.dicom_ae_title; each closed study becomes a job."""
    from oncoserve.object_store import object_store
    from pipelines.jobs.store import JobStore
    from pipelines.pacs.receiver import DicomReceiver

    settings = Settings()
    with user_errors(ValueError, OSError):
        receiver = DicomReceiver(settings, JobStore(settings.home / "jobs" / "jobs.sqlite"), object_store(settings))
        receiver.start(block=False)
    console.print(f"DICOM receiver {settings.dicom_ae_title} on {settings.host}:{settings.dicom_port}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    receiver.stop()


@app.command()
def pull(study_uid: str = typer.Argument(..., help="StudyInstanceUID on the configured DICOMweb server."),
         export: bool = typer.Option(True, "--export/--no-export", help="Send the reviewed results back to the PACS.")) -> None:  # fmt: skip
    """Queue a job that pulls the study over DICOMweb (QIDO-RS, WADO-RS) and analyses it; prints the job id."""
    from oncoserve.auth import AuthError
    from pipelines.platform_client import PlatformClient, PlatformUnavailable

    with user_errors(AuthError, PlatformUnavailable, ValueError):
        job = PlatformClient(Settings(), timeout_s=120).submit_pull(study_uid, export)
    console.print(f"job {job['id']} {job['state']}")
