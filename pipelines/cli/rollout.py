"""`oncoserve rollout set | show | report`: shadow and canary candidates beside a task's champion."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from oncoserve.auth import AuthError
from oncoserve.settings import Settings
from pipelines.cli._console import console, user_errors
from pipelines.platform_client import PlatformClient, PlatformUnavailable
from serving.registry import RegistryError

app = typer.Typer(help="Traffic policies: shadow and canary candidates beside the champion, and their evidence.", no_args_is_help=True)
ERRORS = (RegistryError, AuthError, ValueError, PlatformUnavailable)


@app.command("set")
def set_(
    task: str = typer.Argument(...),
    shadow: str = typer.Option(None, "--shadow", help="Candidate version that also analyses studies; its answers are only recorded."),
    sample: float = typer.Option(1.0, "--sample", help="Shadow: the share of studies the candidate analyses (0-1]."),
    canary: str = typer.Option(None, "--canary", help="Candidate version that answers a share of the studies."),
    weight: float = typer.Option(None, "--weight", help="Canary: the share of studies it answers (0-1], sticky per study."),
    off: bool = typer.Option(False, "--off", help="Champion only (withdraw any shadow or canary)."),
    reason: str = typer.Option(None, "--reason"),
    max_error_rate: float = typer.Option(None, "--max-error-rate", help="Canary: withdraw above this candidate error rate (default 0.1)."),
    max_p95_ms: float = typer.Option(None, "--max-p95-ms", help="Canary: withdraw above this candidate p95 latency."),
    min_studies: int = typer.Option(None, "--min-studies", help="Canary: studies before its limits are judged (default 5)."),
) -> None:
    """Set TASK's traffic policy (role: platform); signed by the platform, followed by every replica, audited."""
    chosen = [name for name, given in (("--shadow", shadow), ("--canary", canary), ("--off", off)) if given]
    if len(chosen) != 1:
        console.print("[red]error:[/] give exactly one of --shadow V, --canary V --weight W, --off")
        raise typer.Exit(2)
    if canary and weight is None:
        console.print("[red]error:[/] --canary needs --weight (the share of studies it answers)")
        raise typer.Exit(2)
    mode, version, share = ("shadow", shadow, sample) if shadow else ("canary", canary, weight) if canary else ("champion", None, 0.0)
    limits = {k: v for k, v in (("max_error_rate", max_error_rate), ("max_p95_ms", max_p95_ms), ("min_studies", min_studies)) if v is not None}
    with user_errors(*ERRORS):
        body = PlatformClient(Settings()).set_rollout(task, mode, version, share, reason, limits)
    policy = body["policy"]
    said = "champion only" if policy["mode"] == "champion" else f"{policy['mode']} v{policy['version']} at {policy['share']:.2f}"
    console.print(f"{task}: traffic policy seq {policy['seq']}: {said}")


@app.command()
def show(task: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """The policy in force and the policy history."""
    with user_errors(*ERRORS):
        body = PlatformClient(Settings()).rollout(task)
    if as_json:
        typer.echo(json.dumps(body, indent=1))
        return
    policy = body["policy"]
    console.print(f"{task}: champion v{body['champion']}; policy seq {policy['seq']}: {policy['mode']}"
                  + (f" v{policy['version']} at {policy['share']:.2f}" if policy["version"] else ""))  # fmt: skip
    table = Table(title="policy history")
    for col in ("seq", "mode", "version", "share", "actor", "reason"):
        table.add_column(col)
    for r in body["history"]:
        table.add_row(str(r["seq"]), r["mode"], str(r["version"] or "-"), f"{r['share']:.2f}", r["actor"], r.get("reason") or "")
    console.print(table)


def _interval(item: dict) -> str:
    low, high = item["ci95"]
    return f"{item['mean']:.3f} [{low:.3f}, {high:.3f}]"


@app.command()
def report(task: str = typer.Argument(...), seq: int = typer.Option(None, "--seq", help="A policy's seq (default: the latest with a candidate)."),
           as_json: bool = typer.Option(False, "--json")) -> None:  # fmt: skip
    """Candidate vs champion under a policy: agreement, errors and latency, overall, per site and per day (95% intervals)."""
    with user_errors(*ERRORS):
        body = PlatformClient(Settings()).rollout_report(task, seq)
    if as_json:
        typer.echo(json.dumps(body, indent=1))
        return
    policy = body["policy"]
    console.print(f"{task}: policy seq {policy['seq']} ({policy['mode']} v{policy['version']} at {policy['share']:.2f}"
                  f"{', in force' if body['in_force'] else ''})")  # fmt: skip
    for scope, summary in [("overall", body["overall"]), *body["sites"].items()]:
        table = Table(title=f"{scope}: {summary['studies']} studies, {summary['errors']} candidate errors "
                            f"(rate {_interval(summary['error_rate'])})")  # fmt: skip
        table.add_column("measure")
        table.add_column("mean [95% CI]")
        table.add_column("n")
        for name, item in summary["agreement"].items():
            table.add_row(name, _interval(item), str(item["n"]))
        latency = summary["latency_ms"]
        table.add_row("latency p50 ms (champion / candidate)", f"{latency['champion_p50']} / {latency['candidate_p50']}", "")
        console.print(table)
    if len(body.get("days") or {}) > 1:  # over time: the headline agreement and the error rate per day
        days = Table(title="per day (UTC)")
        for col in ("day", "studies", "candidate errors", "agreement mean [95% CI]"):
            days.add_column(col)
        for day, summary in body["days"].items():
            headline = summary["agreement"].get("agreement")
            days.add_row(day, str(summary["studies"]), str(summary["errors"]), _interval(headline) if headline else "-")
        console.print(days)
