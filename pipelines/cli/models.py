"""`oncoserve models list | show | promote | rollback | audit` and `oncoserve compile`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markdown import Markdown
from rich.table import Table

from oncoserve.audit import AuditLog
from oncoserve.auth import AuthError
from oncoserve.settings import Settings
from pipelines.cli._console import cli_identity, console, err_console, user_errors
from serving.registry import TASKS, Registry, RegistryError

app = typer.Typer(help="The model registry: versions, aliases, promotion with gates, rollback, audit.", no_args_is_help=True)
ERRORS = (RegistryError, AuthError, ValueError)


def _promoter(settings: Settings):
    from pipelines.promotion import Promoter

    return Promoter(Registry(settings.mlflow_url), AuditLog(settings.audit_file), settings.home / "cache", settings.gates_file)


@app.command("list")
def list_(task: str = typer.Argument(None, help="One task; default: all."), as_json: bool = typer.Option(False, "--json")) -> None:
    """Registered versions per task with aliases and headline metrics."""
    settings = Settings()
    registry = Registry(settings.mlflow_url)
    with user_errors(*ERRORS):
        cli_identity(settings)  # a token given must be valid; reading needs none beyond that
        rows = [v for t in ([task] if task else TASKS) for v in registry.versions(t)]
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in rows], indent=1))
        return
    table = Table(title="registered versions")
    for col in ("task", "version", "aliases", "dataset", "preprocessing", "metrics"):
        table.add_column(col)
    for r in rows:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in list(r.metrics.items())[:4] if isinstance(v, float))
        table.add_row(r.task, r.version, ",".join(r.aliases), r.tags.get("dataset_hash", "")[:12], r.tags.get("preprocessing_version", ""), shown)
    console.print(table)


@app.command()
def show(task: str = typer.Argument(...), version: str = typer.Argument(None, help="Default: the champion.")) -> None:
    """One version: aliases, metrics, lineage and its model card."""
    settings = Settings()
    registry = Registry(settings.mlflow_url)
    with user_errors(*ERRORS):
        version = version or registry.alias(task, "champion")
        if version is None:
            raise RegistryError(f"{task} has no champion; name a version")
        info = registry.version(task, version)
        card = registry.model_card(task, version)
    console.print_json(data=info.to_json() | {"compiled": info.tags.get("compiled_repository")})
    console.print(Markdown(card))


def _gate_table(gates) -> Table:
    table = Table(title="promotion gates")
    for col in ("gate", "result", "value", "threshold", "detail"):
        table.add_column(col)
    for g in gates:
        table.add_row(g.name, "[green]pass[/]" if g.passed else "[red]FAIL[/]", str(g.value), str(g.threshold), g.detail)
    return table


@app.command()
def promote(
    task: str = typer.Argument(...),
    version: str = typer.Argument(...),
    to: str = typer.Option(..., "--to", help="candidate | champion"),
    reason: str = typer.Option(None, "--reason", help="Why (required with --force)."),
    force: bool = typer.Option(False, "--force", help="Admin only: promote despite failing gates (audited)."),
    eval_data: Path = typer.Option(None, "--eval-data", help="Recompute metrics for this version and the champion on one dataset."),
) -> None:
    """Move an alias to VERSION if it passes its gates (role: data-scientist for candidate, platform for champion)."""
    from pipelines.promotion import PromotionRefused

    settings = Settings()
    try:
        with user_errors(*ERRORS), console.status(f"running gates for {task} v{version}"):
            result = _promoter(settings).promote(cli_identity(settings), task, version, to, reason, force, eval_data)
    except PromotionRefused as refused:
        console.print(_gate_table(refused.gates))
        err_console.print(f"[bold red]refused:[/] {refused}", highlight=False)
        raise typer.Exit(2) from None
    console.print(_gate_table(result.gates))
    forced = " [yellow](FORCED past failing gates)[/]" if result.forced else ""
    console.print(f"{task}: {to} -> v{result.version} (was {result.previous_holder or 'unset'}){forced}")


@app.command()
def rollback(task: str = typer.Argument(...), reason: str = typer.Option(None, "--reason")) -> None:
    """Move champion back to the previous version (role: platform)."""
    settings = Settings()
    with user_errors(*ERRORS):
        old, new = _promoter(settings).rollback(cli_identity(settings), task, reason)
    console.print(f"{task}: champion v{old} -> v{new}")


@app.command()
def audit(task: str = typer.Option(None, "--task"), as_json: bool = typer.Option(False, "--json")) -> None:
    """The audit log: one row per action (registrations, promotions, refusals, rollbacks, forced actions)."""
    settings = Settings()
    with user_errors(*ERRORS):
        cli_identity(settings)
    entries = [e for e in AuditLog(settings.audit_file).entries() if not task or e.get("task") == task]
    if as_json:
        typer.echo(json.dumps(entries, indent=1, default=str))
        return
    table = Table(title="audit log")
    for col in ("when", "who", "action", "task", "version", "from", "to", "status", "reason"):
        table.add_column(col)
    import datetime as dt

    for e in entries:
        when = dt.datetime.fromtimestamp(e.get("time", 0)).strftime("%Y-%m-%d %H:%M:%S")
        status = e["status"] + (" (forced)" if e.get("forced") else "")
        table.add_row(when, f"{e.get('actor')} ({e.get('role')})", e.get("action", ""), e.get("task", ""),
                      str(e.get("version", "")), str(e.get("from_version") or ""), str(e.get("to") or ""), status, e.get("reason") or "")  # fmt: skip
    console.print(table)


@app.command()
def compare(
    task: str = typer.Argument(..., help="localization | segmentation | classification | survival"),
    a: str = typer.Argument(..., help="Version A (e.g. the champion)."),
    b: str = typer.Argument(..., help="Version B (the candidate); the report is attached to its MLflow run."),
    data: Path = typer.Option(None, "--data", help="Score both on this dataset (cases either trained on are left out); "
                                                   "default: the held-out test cases both were registered with."),
    out: Path = typer.Option(None, "--out", help="Report folder (default: ONCOSERVE_HOME/compare/TASK/vA-vB)."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=50, max=20000, help="Bootstrap resamples for the 95 % intervals."),
) -> None:
    """Two versions side by side: metrics with bootstrap intervals, per site, calibration, disagreeing cases."""
    from pipelines.compare import compare_versions

    settings = Settings()
    registry = Registry(settings.mlflow_url)
    out = out or settings.home / "compare" / task / f"v{a}-v{b}"
    with user_errors(*ERRORS, FileNotFoundError), console.status(f"comparing {task} v{a} and v{b}"):
        cli_identity(settings)
        report = compare_versions(registry, task, a, b, out, settings.home / "cache", data=data, n_boot=bootstrap)
    console.print(Markdown(report.markdown.read_text()))
    console.print(f"report: {report.markdown} (+ comparison.json, plots); attached to MLflow run {report.attached_to_run} "
                  f"under compare/v{a}-v{b}")  # fmt: skip


def compile_(
    task: str = typer.Argument(...),
    version: str = typer.Option(..., "--version"),
    gpu: bool = typer.Option(False, "--gpu", help="GPU instances (+ TensorRT plan where TensorRT and a GPU exist)."),
    max_batch: int = typer.Option(4, "--max-batch", min=1),
) -> None:
    """Write the version into the Triton model repository in S3 (model.onnx, config.pbtxt, sha256)."""
    from oncoserve.object_store import object_store
    from oncoserve.auth import require
    from serving.compile import CompileOptions, compile_version

    settings = Settings()
    with user_errors(*ERRORS):
        require(cli_identity(settings), "data-scientist", "compiling")
        result = compile_version(Registry(settings.mlflow_url), object_store(settings), settings.bucket_models,
                                 settings.triton_repo_prefix, task, version,
                                 CompileOptions(max_batch_size=max_batch, preferred_batch_sizes=[b for b in (2, 4) if b <= max_batch], gpu=gpu))  # fmt: skip
    for key, digest in result.files.items():
        console.print(f"s3://{settings.bucket_models}/{settings.triton_repo_prefix}/{key}  sha256 {digest[:16]}")
    console.print(f"TensorRT plan: {result.tensorrt}")
