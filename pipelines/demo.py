"""`make demo`: the platform's main job on the embedded stack.

At this stage it proves the foundation end to end: stack up -> status -> an S3 round trip -> an
MLflow run -> a Ray task -> stack down. Later stages extend it to the full train-to-serve flow.
"""

from __future__ import annotations

import io
import time

from rich.console import Console

from oncoserve.object_store import object_store
from oncoserve.settings import Settings
from pipelines.stack import EmbeddedStack, StackError


def _ray_square(x: int) -> int:
    return x * x


def run(settings: Settings, console: Console, keep_up: bool = False) -> dict:
    stack = EmbeddedStack(settings)
    results: dict = {}
    t0 = time.monotonic()
    with console.status("bringing the embedded stack up") as spinner:
        parts = stack.up(on_event=lambda n, m: spinner.console.log(f"{n}: {m}"))
    results["stack_up_s"] = round(time.monotonic() - t0, 1)
    for p in parts:
        console.print(f"  {p.name:<8} {'healthy' if p.healthy else 'DOWN':<8} {p.url:<24} log {p.log}")
    if not all(p.healthy for p in parts):
        raise StackError("stack came up unhealthy; see `oncoserve stack status`")

    try:
        # S3 round trip with the minio client.
        store = object_store(settings)
        payload = f"oncoserve demo object written at {time.time()}".encode()
        store.put_object(settings.bucket_data, "demo/hello.txt", io.BytesIO(payload), len(payload))
        back = store.get_object(settings.bucket_data, "demo/hello.txt").read()
        results["s3_round_trip"] = back == payload
        console.print(f"S3: wrote and read s3://{settings.bucket_data}/demo/hello.txt ({len(back)} bytes)")

        # An MLflow run; its artifact goes through the server to S3.
        import mlflow

        mlflow.set_tracking_uri(settings.mlflow_url)
        mlflow.set_experiment("oncoserve-demo")
        with mlflow.start_run(run_name="foundation-demo") as run_:
            mlflow.log_param("stage", "foundation")
            mlflow.log_metric("stack_up_s", results["stack_up_s"])
            mlflow.log_text("hello from the oncoserve demo", "notes/hello.txt")
        results["mlflow_run_id"] = run_.info.run_id
        console.print(f"MLflow: run {run_.info.run_id} at {settings.mlflow_url}/#/experiments")

        # A Ray task on the stack's head node.
        import ray

        ray.init(address=settings.ray_address, logging_level="ERROR", log_to_driver=False)
        try:
            squares = ray.get([ray.remote(_ray_square).remote(i) for i in range(4)])
        finally:
            ray.shutdown()
        results["ray_squares"] = squares
        console.print(f"Ray: 4 tasks on {settings.ray_address} returned {squares}")
    finally:
        if not keep_up:
            with console.status("bringing the stack down"):
                stack.down()
            console.print("stack is down")
    return results
