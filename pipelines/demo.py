"""`make demo`: the platform's main job on the embedded stack.

Stack up -> a synthetic phantom dataset (its manifest stored in S3) -> the four tasks trained with Ray
Train, tracked and registered in MLflow -> a table of the registered versions and their held-out
metrics -> stack down. Later stages extend it to promotion, compilation and serving.
"""

from __future__ import annotations

import io
import json
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from oncoserve.object_store import object_store
from oncoserve.settings import Settings
from pipelines.stack import EmbeddedStack, StackError

# Demo-sized training: about 10 minutes for all four tasks on 2 CPU cores.
DEMO_EPOCHS = {"segmentation": 20, "localization": 30, "classification": 50, "survival": 40}
HEADLINE = {
    "segmentation": ["dice_WT", "dice_TC", "dice_ET", "hd95_WT"],
    "localization": ["hit_rate", "box_iou", "centre_distance_mm"],
    "classification": ["grade_auc", "idh_auc", "grade_ece", "idh_ece"],
    "survival": ["c_index", "logrank_p"],
}


def _store_manifest(settings: Settings, data_dir, console: Console) -> str:
    from imaging import manifest

    doc = manifest.write(data_dir)
    body = json.dumps(doc).encode()
    key = f"datasets/{doc['dataset_hash']}/manifest.json"
    store = object_store(settings)
    store.put_object(settings.bucket_data, key, io.BytesIO(body), len(body), content_type="application/json")
    if store.get_object(settings.bucket_data, key).read() != body:
        raise StackError("s3: the manifest read back differs from what was written")
    console.print(f"dataset {doc['dataset_hash'][:16]} ({doc['n_cases']} cases): manifest at s3://{settings.bucket_data}/{key}")
    return doc["dataset_hash"]


def _synthesise(data_dir, n: int, seed: int, console: Console) -> None:
    from imaging.phantoms import synthesise

    if data_dir.exists():
        console.print(f"using the phantom dataset at {data_dir}")
        return
    columns = (TextColumn("synthesising phantoms"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("cases", total=n)
        synthesise(data_dir, n, seed, sites=2, progress=lambda done, total: progress.update(bar, completed=done))


def demo_identity(settings: Settings, console: Console) -> str:
    """The demo acts as an admin; on a fresh home it creates that first token (saved to HOME/token, mode 600)."""
    import os

    from oncoserve.auth import TokenStore

    store = TokenStore(settings.tokens_file)
    if not store.list():
        token = store.create("demo-admin", "admin", None)
        fd = os.open(settings.home / "token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(token)
        console.print(f"created the first (admin) API token, saved to {settings.home / 'token'}")
    who = store.authenticate(settings.cli_token())
    if who is None or not who.at_least("data-scientist"):
        raise StackError("the demo needs a data-scientist (or higher) token in ONCOSERVE_TOKEN or ONCOSERVE_HOME/token")
    return who.name


def run(settings: Settings, console: Console, keep_up: bool = False, cases: int = 60, seed: int = 7,
        epochs: dict[str, int] | None = None) -> dict:  # fmt: skip
    from training.jobs import JobConfig, run_job

    epochs = epochs or DEMO_EPOCHS
    stack = EmbeddedStack(settings)
    t0 = time.monotonic()
    with console.status("bringing the embedded stack up") as spinner:
        parts = stack.up(on_event=lambda n, m: spinner.console.log(f"{n}: {m}"))
    for p in parts:
        console.print(f"  {p.name:<8} {'healthy' if p.healthy else 'DOWN':<8} {p.url:<24} log {p.log}")
    results: dict = {"stack_up_s": round(time.monotonic() - t0, 1), "versions": {}}
    try:
        actor = demo_identity(settings, console)
        data_dir = settings.home / "demo-data" / f"phantoms-n{cases}-seed{seed}"
        _synthesise(data_dir, cases, seed, console)
        results["dataset_hash"] = _store_manifest(settings, data_dir, console)
        table = Table(title="registered versions (metrics on held-out test cases)")
        for col in ("task", "version", "epochs", "train s", "metrics"):
            table.add_column(col)
        for task, n_epochs in epochs.items():
            started = time.monotonic()
            columns = (TextColumn(f"training {task}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.description}"), TimeElapsedColumn())  # fmt: skip
            with Progress(*columns, console=console) as progress:
                bar = progress.add_task("", total=n_epochs)
                cfg = JobConfig(task=task, data_dir=data_dir, tracking_uri=settings.mlflow_url,
                                ray_address=settings.ray_address, home=settings.home, epochs=n_epochs, seed=seed,
                                actor=actor, audit_file=settings.audit_file)  # fmt: skip
                result = run_job(cfg, log=progress.console.log,
                                 on_epoch=lambda d, t, v: progress.update(bar, completed=d, description=f"val_loss {v:.3f}"))  # fmt: skip
            seconds = round(time.monotonic() - started)
            shown = {k: result.metrics[k] for k in HEADLINE[task] if k in result.metrics}
            results["versions"][task] = {"version": result.version, "run_id": result.run_id, "seconds": seconds, "metrics": shown}
            table.add_row(task, result.version, str(n_epochs), str(seconds), ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))
        console.print(table)
        console.print(f"MLflow UI: {settings.mlflow_url} (experiments oncoserve-<task>, models <task>)")
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if not keep_up:
            with console.status("bringing the stack down"):
                stack.down()
            console.print("stack is down (data kept under " + str(settings.home) + ")")
    return results
