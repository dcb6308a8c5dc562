"""`oncoserve reporting register`: version the knowledge base and prompts as a `reporting` model."""

from __future__ import annotations

from pathlib import Path

import typer

from oncoserve.settings import Settings
from pipelines.cli._console import cli_identity, console, user_errors
from services.reporting.generators import PROMPT_DIR, PROMPT_VERSION
from services.reporting.kb import PACKAGED

app = typer.Typer(help="The reporting model: knowledge base + prompt templates in the registry.", no_args_is_help=True)


@app.command()
def register(
    kb: Path = typer.Option(PACKAGED, "--kb", help="Folder of knowledge documents (*.md with an id/title/sources header)."),
    prompts: Path = typer.Option(PROMPT_DIR, "--prompts", help="Folder of prompt templates (<version>.txt)."),
    prompt_version: str = typer.Option(PROMPT_VERSION, "--prompt-version", help="Prompt template the reports use."),
) -> None:
    """Check the reporting model on the reference cases and register it as a new `reporting` version."""
    from oncoserve.audit import AuditLog
    from oncoserve.auth import AuthError, require
    from pipelines.reporting_registry import register_reporting

    settings = Settings()
    with user_errors(AuthError):
        who = require(cli_identity(settings), "data-scientist", "registering a reporting version")
    with user_errors(ValueError, FileNotFoundError, KeyError), console.status("checking and registering the reporting model"):
        version, metrics = register_reporting(settings, kb, prompts, prompt_version)
    AuditLog(settings.audit_file).event(who.name, who.role, "register", task="reporting", version=version, metrics=metrics)
    console.print(", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    console.print(f"registered model [bold]reporting[/] version [bold]{version}[/]")
