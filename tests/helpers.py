"""Small test helpers."""

from __future__ import annotations

import io
import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll `condition` until it holds or `timeout_s` passes (bounded; returns the final answer)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval_s)
    return condition()


def study_files(case) -> dict:
    """A phantom case folder's modalities as httpx multipart files (those present; never the mask)."""
    present = [m for m in ("t1", "t1ce", "t2", "flair") if (case / f"{case.name}_{m}.nii.gz").exists()]
    return {m: (f"{case.name}_{m}.nii.gz", (case / f"{case.name}_{m}.nii.gz").read_bytes()) for m in present}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_triton_repo(settings, store, tasks, target):
    """Copy the compiled Triton repository of `tasks` from S3 to a folder (for a v2 server on disk)."""
    for task in tasks:
        prefix = f"{settings.triton_repo_prefix}/{task}/"
        for obj in store.list_objects(settings.bucket_models, prefix=prefix, recursive=True):
            path = target / obj.object_name.removeprefix(f"{settings.triton_repo_prefix}/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(store.get_object(settings.bucket_models, obj.object_name).read())
    return target


def start_v2_server(repo, log, probe_task: str, probe_version: str):
    """A KServe ModelServer (real OIP v2) in its own process serving `repo`; returns (grpc url, process)."""
    import subprocess
    import sys
    from pathlib import Path

    from serving.backends import TritonBackend

    http, grpc_port = free_port(), free_port()
    script = Path(__file__).parent / "external" / "kserve_onnx_server.py"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(script), str(repo), "--http-port", str(http), "--grpc-port", str(grpc_port)],
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"127.0.0.1:{grpc_port}"
    probe = TritonBackend(url, probe_task, probe_version)
    wait_until(lambda: probe.ready() or proc.poll() is not None, timeout_s=90)
    if proc.poll() is not None or not probe.ready():
        proc.kill()
        raise RuntimeError(f"the v2 server did not start: {Path(log).read_text()[-2000:]}")
    return url, proc


class MemoryStore:
    """Just the S3 calls the ledger makes, in memory."""

    def __init__(self):
        self.objects: dict[str, bytes] = {}

    def put_object(self, bucket, key, data, length, content_type=None):
        self.objects[key] = data.read()

    def get_object(self, bucket, key):
        from minio.error import S3Error

        if key not in self.objects:
            raise S3Error(None, "NoSuchKey", "missing", key, "r", "h")
        body = io.BytesIO(self.objects[key])
        body.release_conn = lambda: None
        return body

    def remove_object(self, bucket, key):
        self.objects.pop(key, None)

    def list_objects(self, bucket, prefix="", recursive=False):
        return [type("O", (), {"object_name": k, "is_dir": False, "size": len(v)}) for k, v in sorted(self.objects.items())
                if k.startswith(prefix)]  # fmt: skip
