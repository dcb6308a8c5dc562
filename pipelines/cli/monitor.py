"""`oncoserve monitor drift`: each site's input drift against the champion's training reference."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from oncoserve.auth import AuthError
from oncoserve.settings import Settings
from pipelines.cli._console import console, user_errors
from pipelines.platform_client import PlatformClient, PlatformUnavailable
from serving.registry import RegistryError

app = typer.Typer(help="Post-market monitoring: input drift per site.", no_args_is_help=True)
ERRORS = (RegistryError, AuthError, ValueError, PlatformUnavailable)


@app.command()
def drift(task: str = typer.Option("segmentation", "--task", help="Whose champion's training reference to test against."),
          days: float = typer.Option(7.0, "--days", help="The window of studies, in days."),
          as_json: bool = typer.Option(False, "--json")) -> None:  # fmt: skip
    """Per site: the share of input statistics that drifted (KS test) and the largest shifts."""
    with user_errors(*ERRORS):
        body = PlatformClient(Settings()).drift(task, days)
    if as_json:
        typer.echo(json.dumps(body, indent=1))
        return
    console.print(f"{task} v{body['champion']}: {body['test']}")
    table = Table(title=f"input drift, last {body['days']:g} days")
    for col in ("site", "studies", "drift score", "drifted", "largest shifts (reference -> site median)", "answers' drift", "QC flagged"):
        table.add_column(col)
    for site, result in body["sites"].items():
        shifts = ", ".join(f"{n} {result['tests'][n]['reference_median']:g}->{result['tests'][n]['site_median']:g}"
                           for n in result["largest_shifts"][:3])  # fmt: skip
        verdict = "DRIFTED" if result["drifted"] else ("no" if result["enough_studies"] else "too few studies")
        answers = result.get("output_drift")
        answered = (f"{answers['score']:.2f}" + (" DRIFTED" if answers["drifted"] else "")) if answers else "no reference"
        table.add_row(site, str(result["studies"]), f"{result['score']:.2f} (threshold {result['threshold']:.2f})", verdict, shifts, answered,
                      f"{result.get('qc_flagged_share', 0.0):.0%}")  # fmt: skip
    console.print(table)
