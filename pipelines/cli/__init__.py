"""The `oncoserve` command line (typer + rich). Domain errors become a message and exit code here."""

from __future__ import annotations

import typer

from pipelines.cli import auth, data, demo, models, pipeline, plan, platform, predict, reporting, serve, stack, train

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
app.add_typer(platform.app, name="platform")
app.add_typer(serve.app, name="serve")
app.add_typer(plan.app, name="plan")
app.add_typer(reporting.app, name="reporting")
app.add_typer(pipeline.app, name="pipeline")
app.command("compile")(models.compile_)
app.command("demo")(demo.demo)
app.command("train")(train.train)
app.command("predict")(predict.predict)
app.command("evaluate")(train.evaluate)
