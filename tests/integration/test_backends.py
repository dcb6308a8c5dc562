"""Inference backends: embedded onnxruntime and Triton-over-tritonclient against a real OIP v2 server.

The v2 server is a KServe ModelServer in its own process (kserve and tritonclient.grpc cannot share
one) serving the same compiled ONNX files from a Triton-layout repository.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imaging.dataset import read_case
from imaging.preprocess import preprocess
from oncoserve.object_store import object_store
from serving.backends import BackendUnavailable, FallbackBackend, OnnxRuntimeBackend, TritonBackend
from serving.compile import compile_version
from serving.registry import Registry
from tests.helpers import wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TASKS = ("localization", "classification")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def compiled(live_stack, trained, tmp_path_factory):
    """The two tasks compiled into S3, and the same repository copied to disk for the v2 server."""
    registry, store = Registry(live_stack.mlflow_url), object_store(live_stack)
    repo = tmp_path_factory.mktemp("triton-repo")
    for task in TASKS:
        compile_version(registry, store, live_stack.bucket_models, live_stack.triton_repo_prefix, task, trained[task])
        prefix = f"{live_stack.triton_repo_prefix}/{task}/"
        for obj in store.list_objects(live_stack.bucket_models, prefix=prefix, recursive=True):
            target = repo / obj.object_name.removeprefix(f"{live_stack.triton_repo_prefix}/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(store.get_object(live_stack.bucket_models, obj.object_name).read())
    return repo


@pytest.fixture(scope="module")
def v2_server(compiled, tmp_path_factory):
    http, grpc_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("kserve") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests/external/kserve_onnx_server.py"), str(compiled),
                                 "--http-port", str(http), "--grpc-port", str(grpc_port)], stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"127.0.0.1:{grpc_port}"
    probe = TritonBackend(url, "localization", "1")
    assert wait_until(lambda: probe.ready() or proc.poll() is not None, timeout_s=90), log.read_text()[-2000:]
    assert proc.poll() is None, log.read_text()[-2000:]
    yield {"url": url, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def inputs(tiny_dataset):
    case = sorted(p.name for p in tiny_dataset.iterdir() if p.is_dir())[0]
    prepared = preprocess(read_case(tiny_dataset, case))
    return {"image": prepared.image[None].astype(np.float32), "presence": prepared.presence[None].astype(np.float32)}


def embedded(live_stack, trained, task) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend.from_version(Registry(live_stack.mlflow_url), object_store(live_stack), live_stack.bucket_models,
                                           live_stack.triton_repo_prefix, task, trained[task])  # fmt: skip


def test_triton_backend_matches_onnxruntime(live_stack, trained, v2_server, inputs):
    for task in TASKS:
        local = embedded(live_stack, trained, task)
        remote = TritonBackend(v2_server["url"], task, trained[task])
        feeds = {k: v for k, v in inputs.items() if task == "classification" or k == "image"}
        ours, theirs = local.infer(feeds), remote.infer(feeds)
        deterministic = "heatmap" if task == "localization" else "probabilities"
        np.testing.assert_allclose(theirs[deterministic], ours[deterministic], atol=1e-5)
        assert set(theirs) == set(ours)


def test_backend_down_is_named_and_fallback_answers(live_stack, trained, v2_server, inputs):
    v2_server["proc"].terminate()
    v2_server["proc"].wait(timeout=30)
    remote = TritonBackend(v2_server["url"], "localization", trained["localization"], timeout_s=5)
    with pytest.raises(BackendUnavailable, match=f"triton at {v2_server['url']}"):
        remote.infer({"image": inputs["image"]})
    assert remote.ready() is False
    fallback = FallbackBackend(remote, embedded(live_stack, trained, "localization"))
    out = fallback.infer({"image": inputs["image"]})
    assert out["heatmap"].shape == (1, 1, 48, 56, 48) and fallback.fallbacks == 1
