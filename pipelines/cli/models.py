"""`oncoserve models list | show | promote | rollback | audit | sync-triton` and `oncoserve compile`."""

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
from pipelines.platform_client import PlatformClient, PlatformUnavailable
from serving.registry import TASKS, Registry, RegistryError

app = typer.Typer(help="The model registry: versions, aliases, promotion with gates, rollback, audit.", no_args_is_help=True)
ERRORS = (RegistryError, AuthError, ValueError, PlatformUnavailable)


def eval_data_uri(settings: Settings, eval_data: str | None) -> str | None:
    """`--eval-data`: an s3:// prefix of the data bucket as it is, or a local dataset folder uploaded there
    first (the platform API reads evaluation data only from the data bucket)."""
    if not eval_data or eval_data.startswith("s3://"):
        return eval_data
    from pipelines.dataset_upload import upload_dataset

    return upload_dataset(settings, Path(eval_data))


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
    eval_data: str = typer.Option(None, "--eval-data", help="Recompute metrics for this version and the champion on one dataset "
                                                            "(a folder, uploaded to the data bucket, or s3://<data bucket>/prefix/)."),
) -> None:
    """Move an alias to VERSION if it passes the platform's gates (role: data-scientist for candidate,
    platform for champion). The platform API runs the gates with its own gates file and signs the move."""
    from pipelines.promotion import PromotionRefused

    settings = Settings()
    try:
        with user_errors(*ERRORS, FileNotFoundError), console.status(f"running gates for {task} v{version}"):
            result = PlatformClient(settings).promote(task, version, to, reason, force, eval_data_uri(settings, eval_data))
    except PromotionRefused as refused:
        console.print(_gate_table(refused.gates))
        err_console.print(f"[bold red]refused:[/] {refused}", highlight=False)
        raise typer.Exit(2) from None
    console.print(_gate_table(result.gates))
    forced = " [yellow](FORCED past failing gates)[/]" if result.forced else ""
    console.print(f"{task}: {to} -> v{result.version} (was {result.previous_holder or 'unset'}){forced}; "
                  f"gates sha256 {result.gates_sha256[:16]}")


@app.command()
def rollback(task: str = typer.Argument(...), reason: str = typer.Option(None, "--reason")) -> None:
    """Move champion back to the previous version (role: platform)."""
    settings = Settings()
    with user_errors(*ERRORS):
        old, new = PlatformClient(settings).rollback(task, reason)
    console.print(f"{task}: champion v{old} -> v{new}")


@app.command("sync-triton")
def sync_triton(
    dest: Path = typer.Option(..., "--dest", help="Local model repository Triton reads (--model-repository=DEST)."),
    every: float = typer.Option(0.0, "--every", min=0.0, help="Seconds between passes (a sidecar); 0: one pass."),
    report: Path = typer.Option(None, "--report", help="Write each pass's outcome here as JSON (outside DEST)."),
) -> None:
    """Build Triton's local repository from verified files only: champion and previous of every model task,
    each file checked against the sha256 recorded at compile, the versions named in config.pbtxt."""
    import time

    import urllib3
    from minio.error import S3Error

    from oncoserve.object_store import object_store
    from serving.triton_sync import sync_repository

    settings = Settings()
    # A registry or store that cannot be reached (or no credentials for it) is a message and exit code 1.
    failures = (*ERRORS, S3Error, urllib3.exceptions.HTTPError, FileNotFoundError)
    with user_errors(*failures):
        registry, store = Registry(settings.mlflow_url), object_store(settings)
    while True:
        with user_errors(*failures):
            reports = sync_repository(registry, store, settings.bucket_models, settings.triton_repo_prefix, dest,
                                      report_file=report)  # fmt: skip
        for r in reports:
            loaded = ", ".join(f"v{v}" for v in r.loaded) or "nothing"
            console.print(f"{r.task}: {loaded} ({r.platform or 'no config'})", highlight=False)
            for version, why in r.refused.items():
                err_console.print(f"[bold red]refused[/] {r.task} v{version}: {why}", highlight=False)
        if not every:
            return
        time.sleep(every)  # the sidecar's period, not a synchronisation


@app.command()
def history(task: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Which version held `champion` when: the platform's signed ledger, and alias moves it refused."""
    settings = Settings()
    with user_errors(*ERRORS):
        rows = sorted(PlatformClient(settings).history(task), key=lambda r: r["time"])
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    import datetime as dt

    table = Table(title=f"{task}: champion history")
    for col in ("when", "version", "action", "by", "signed", "gates sha256"):
        table.add_column(col)
    for r in rows:
        when = dt.datetime.fromtimestamp(r["time"]).strftime("%Y-%m-%d %H:%M:%S")
        signed = "yes" if r["signed"] else "[red]NO (refused by serving)[/]"
        action = r["action"] + (" (forced)" if r.get("forced") else "")
        table.add_row(when, str(r["version"]), action, str(r["actor"]), signed, (r.get("gates_sha256") or "")[:16])
    console.print(table)


@app.command()
def audit(task: str = typer.Option(None, "--task"), as_json: bool = typer.Option(False, "--json")) -> None:
    """The audit log: one row per action (registrations, promotions, refusals, rollbacks, forced actions)."""
    settings = Settings()
    with user_errors(*ERRORS):
        cli_identity(settings)
    log = AuditLog(settings.audit_file)
    for problem in log.read().problems:
        err_console.print(f"[yellow]warning:[/] audit log {problem}; run `oncoserve audit verify`", highlight=False)
    entries = [e for e in log.entries() if not task or e.get("task") == task]
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
    triton_backend: str = typer.Option("onnxruntime", "--triton-backend",
                                       help="Backend config.pbtxt names on CPU nodes: onnxruntime, openvino, or measured."),
    force: bool = typer.Option(False, "--force", help="Admin only: compile a version that fails its gates (audited)."),
    reason: str = typer.Option(None, "--reason", help="Why (required with --force)."),
) -> None:
    """Write the version into the Triton model repository in S3 (model.onnx, config.pbtxt, sha256), through
    the platform API: only a version that passes the platform's gates (exit 2 with the gates otherwise)."""
    from pipelines.promotion import PromotionRefused

    settings = Settings()
    try:
        with user_errors(*ERRORS), console.status(f"gates and compile for {task} v{version}"):
            result = PlatformClient(settings).compile(task, version, gpu, max_batch, force, reason, triton_backend)
    except PromotionRefused as refused:
        console.print(_gate_table(refused.gates))
        err_console.print(f"[bold red]refused:[/] {refused}", highlight=False)
        raise typer.Exit(2) from None
    for key, digest in result["files"].items():
        console.print(f"s3://{result['bucket']}/{result['prefix']}/{key}  sha256 {digest[:16]}")
    console.print(f"TensorRT plan: {result['tensorrt']}")
    runtime = result.get("runtime")
    if runtime:
        from serving.runtimes import RuntimeChoice

        choice = RuntimeChoice.from_json(json.dumps(runtime))
        if choice.trials:
            console.print(Markdown("\n".join(choice.table())))
        console.print(f"serving runtime: {choice.runtime}")
