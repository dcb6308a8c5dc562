"""The `oncoserve` command line (typer + rich). Domain errors become a message and exit code here."""

from __future__ import annotations

import os
import sys

import typer

from pipelines.cli import audit, auth, data, demo, jobs, models, monitor, pacs, pipeline, plan, platform, predict, reporting, rollout, serve, stack, train

app = typer.Typer(
    name="oncoserve",
    help="MLOps platform for neuro-oncology MRI models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(stack.app, name="stack")
app.add_typer(data.app, name="data")
app.add_typer(models.app, name="models")
app.add_typer(auth.app, name="auth")
app.add_typer(audit.app, name="audit")
app.add_typer(platform.app, name="platform")
app.add_typer(serve.app, name="serve")
app.add_typer(plan.app, name="plan")
app.add_typer(reporting.app, name="reporting")
app.add_typer(pipeline.app, name="pipeline")
app.add_typer(jobs.app, name="jobs")
app.add_typer(pacs.app, name="pacs")
app.add_typer(rollout.app, name="rollout")
app.add_typer(monitor.app, name="monitor")
app.command("compile")(models.compile_)
app.command("demo")(demo.demo)
app.command("train")(train.train)
app.command("predict")(predict.predict)
app.command("evaluate")(train.evaluate)


# MLflow's client retries a failing request 7 times with exponential backoff (about four minutes) before
# it gives up; a person at a terminal whose registry or artifact store is down should hear it in seconds.
# Set the variables to restore MLflow's own behaviour (long jobs on a flaky network may want it).
REGISTRY_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def _mlflow_account() -> None:
    """The CLI talks to MLflow as the training account (runs, versions, reads); aliases are the platform's."""
    from oncoserve.credentials import use_mlflow_account
    from oncoserve.settings import Settings

    try:
        use_mlflow_account(Settings().mlflow_accounts_file, "training")
    except (OSError, ValueError):  # an unreadable home: commands say so themselves
        pass


def _backing_service_errors() -> tuple[type[BaseException], ...]:
    """The registry/object-store client errors, from the client libraries a command actually loaded: a
    command that never imported MLflow or boto cannot raise their errors, and importing them only to
    catch nothing would cost seconds on every command."""
    names = (("mlflow.exceptions", "MlflowException"), ("requests", "RequestException"),
             ("botocore.exceptions", "BotoCoreError"), ("botocore.exceptions", "ClientError"))  # fmt: skip
    return tuple(getattr(sys.modules[module], name) for module, name in names if module in sys.modules)


def main() -> None:
    """The console entry point: `app` with short registry retries, and the backing services' failures
    that no command expects (registry, object store) as one line and exit code 1 instead of a traceback."""
    from pipelines.cli._console import err_console

    for key, value in REGISTRY_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Studies, findings, tokens and logs are the owner's only: nothing the CLI writes is group/world readable.
    os.umask(0o077)
    _mlflow_account()
    try:
        app()
    except Exception as exc:
        if not isinstance(exc, _backing_service_errors()):
            raise
        message = str(getattr(exc, "message", exc)).splitlines()[0][:400]
        # The registry proxies artifacts: its 500s on mlflow-artifacts URLs mean the object store failed.
        which = "the artifact store behind the registry" if "mlflow-artifacts" in message else "a backing service"
        err_console.print(f"[bold red]error:[/] {which} failed: {message}\n"
                          "check the registry and object store (`oncoserve stack status`)", highlight=False)  # fmt: skip
        raise SystemExit(1) from None
