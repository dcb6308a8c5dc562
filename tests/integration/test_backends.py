"""Inference backends: embedded (onnxruntime, OpenVINO) and Triton-over-tritonclient against a real OIP v2 server.

The v2 server is a KServe ModelServer in its own process (kserve and tritonclient.grpc cannot share
one) serving the same compiled ONNX files from a Triton-layout repository.
"""

from __future__ import annotations


import numpy as np
import pytest

from imaging.dataset import read_case
from imaging.preprocess import preprocess
from oncoserve.object_store import object_store
from serving.backends import BackendUnavailable, FallbackBackend, EmbeddedBackend, TritonBackend
from serving.compile import compile_version
from serving.registry import Registry
from tests.helpers import export_triton_repo, start_v2_server

pytestmark = pytest.mark.integration
TASKS = ("localization", "classification")


@pytest.fixture(scope="module")
def compiled(live_stack, trained, tmp_path_factory):
    """The two tasks compiled into S3, and the same repository copied to disk for the v2 server."""
    registry, store = Registry(live_stack.mlflow_url), object_store(live_stack)
    for task in TASKS:
        compile_version(registry, store, live_stack.bucket_models, live_stack.triton_repo_prefix, task, trained[task])
    return export_triton_repo(live_stack, store, TASKS, tmp_path_factory.mktemp("triton-repo"))


@pytest.fixture(scope="module")
def v2_server(compiled, trained, tmp_path_factory):
    url, proc = start_v2_server(compiled, tmp_path_factory.mktemp("kserve") / "server.log", "localization", trained["localization"])
    yield {"url": url, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def inputs(tiny_dataset):
    case = sorted(p.name for p in tiny_dataset.iterdir() if p.is_dir())[0]
    prepared = preprocess(read_case(tiny_dataset, case))
    return {"image": prepared.image[None].astype(np.float32), "presence": prepared.presence[None].astype(np.float32)}


def embedded(live_stack, trained, task) -> EmbeddedBackend:
    """onnxruntime in this process: what the v2 server runs, so outputs must agree to float rounding."""
    return EmbeddedBackend.from_version(Registry(live_stack.mlflow_url), object_store(live_stack), live_stack.bucket_models,
                                        live_stack.triton_repo_prefix, task, trained[task], runtime="onnxruntime")  # fmt: skip


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


def test_openvino_serves_the_compiled_versions_as_onnxruntime_does(live_stack, trained, compiled, inputs):
    """The OpenVINO path reads the same verified model.onnx and answers within the compile tolerance."""
    from serving.runtimes import DEFAULT_TOLERANCE, parity

    registry, store = Registry(live_stack.mlflow_url), object_store(live_stack)
    for task in TASKS:
        args = (registry, store, live_stack.bucket_models, live_stack.triton_repo_prefix, task, trained[task])
        ort_backend = EmbeddedBackend.from_version(*args, runtime="onnxruntime")
        ov_backend = EmbeddedBackend.from_version(*args, runtime="openvino")
        auto = EmbeddedBackend.from_version(*args)  # the runtime compile measured fastest for this version
        chosen = registry.version(task, trained[task]).tags["compiled_runtime"]
        assert ov_backend.name == "openvino" and auto.name == chosen in ("onnxruntime", "openvino")
        feeds = {k: v for k, v in inputs.items() if task == "classification" or k == "image"}
        ours, theirs = ort_backend.infer(feeds), ov_backend.infer(feeds)
        assert set(theirs) == set(ours) and parity(theirs, ours) <= DEFAULT_TOLERANCE, task
        assert ov_backend.metadata() == ort_backend.metadata()
