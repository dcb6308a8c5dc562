"""The `oncoserve` command line (typer + rich). Domain errors become a message and exit code here."""

from __future__ import annotations

import typer

from pipelines.cli import data, demo, stack, train

app = typer.Typer(
    name="oncoserve",
    help="MLOps platform for neuro-oncology MRI models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(stack.app, name="stack")
app.add_typer(data.app, name="data")
app.command("demo")(demo.demo)
app.command("train")(train.train)
app.command("evaluate")(train.evaluate)
