"""The verified Triton repository's choices that need no server: the TensorRT plan is served only when
every served version has one (else the ONNX), and a config text that is not the compiled one is refused.
The S3 and registry here are in-memory stand-ins at the seam; tests/integration/test_registry.py runs the
same sync against the real object store and registry. Triton itself is GPU-verified-only."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from serving.compile import CompileOptions, model_config
from serving.triton_sync import sync_task

TASK = "segmentation"
SIGNATURE = {"inputs": [{"name": "image", "datatype": "FLOAT", "shape": [-1, 4, 64, 64, 64]}],
             "outputs": [{"name": "probabilities", "datatype": "FLOAT", "shape": [-1, 4, 64, 64, 64]}]}  # fmt: skip


class _Body(io.BytesIO):
    def release_conn(self) -> None:
        pass


@dataclass
class Bucket:
    objects: dict[str, bytes] = field(default_factory=dict)

    def get_object(self, bucket: str, key: str):
        return _Body(self.objects[key])


@dataclass
class Version:
    tags: dict[str, str]


@dataclass
class Registry:
    alias_map: dict[str, str]
    versions: dict[str, Version] = field(default_factory=dict)

    def aliases(self, task: str) -> dict[str, str]:
        return self.alias_map

    def version(self, task: str, version: str) -> Version:
        return self.versions[version]


def compiled(store: Bucket, registry: Registry, version: str, plan: bool) -> None:
    """What serving.compile writes for a version (files under the prefix, digests and config tags)."""
    files = {f"{TASK}/{version}/model.onnx": f"onnx-{version}".encode()}
    if plan:
        files[f"{TASK}/{version}/model.plan"] = f"plan-{version}".encode()
    options = CompileOptions(gpu=True, tensorrt_accelerator=True)
    config = text_format.MessageToString(model_config(TASK, SIGNATURE, options, "onnxruntime", [version]))
    files[f"{TASK}/config.pbtxt"] = config.encode()
    for key, data in files.items():
        store.objects[f"triton/{key}"] = data
    digests = {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    registry.versions[version] = Version({"compiled_sha256": json.dumps(digests), "compiled_config": config})


def read_config(path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_the_plan_is_served_only_when_every_served_version_has_one(tmp_path):
    store, registry = Bucket(), Registry({"champion": "3", "previous": "2", "candidate": "4"})
    for version in ("2", "3", "4"):
        compiled(store, registry, version, plan=True)
    report = sync_task(registry, store, "models", "triton", TASK, tmp_path)
    config = read_config(tmp_path / TASK / "config.pbtxt")
    assert report.loaded == ["2", "3"] and report.refused == {}  # the candidate is not loaded
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan" and not config.backend
    assert list(config.version_policy.specific.versions) == [2, 3]
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator  # the plan is TensorRT already
    assert (tmp_path / TASK / "3" / "model.plan").read_bytes() == b"plan-3" and not (tmp_path / TASK / "4").exists()
    # A new champion built without a plan (no TensorRT on that node): the ONNX serves both, the fallback.
    compiled(store, registry, "5", plan=False)
    registry.alias_map.update({"champion": "5", "previous": "3"})
    report = sync_task(registry, store, "models", "triton", TASK, tmp_path)
    config = read_config(tmp_path / TASK / "config.pbtxt")
    assert report.loaded == ["3", "5"] and config.platform == "onnxruntime_onnx" and report.platform == "onnxruntime_onnx"
    assert list(config.version_policy.specific.versions) == [3, 5] and not (tmp_path / TASK / "2").exists()


def test_a_config_that_is_not_the_compiled_one_is_refused(tmp_path):
    store, registry = Bucket(), Registry({"champion": "2", "previous": "1"})
    for version in ("1", "2"):
        compiled(store, registry, version, plan=False)
    registry.versions["2"].tags["compiled_config"] += "\nmax_batch_size: 64"  # edited after compile
    report = sync_task(registry, store, "models", "triton", TASK, tmp_path)
    assert report.loaded == ["1"] and "no compiled config whose sha256 was recorded" in report.refused["2"]
    assert list(read_config(tmp_path / TASK / "config.pbtxt").version_policy.specific.versions) == [1]
    assert not (tmp_path / TASK / "2").exists()


def test_the_cli_says_what_is_missing_instead_of_a_traceback(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "ONCOSERVE_HOME": str(tmp_path), "ONCOSERVE_MLFLOW_URI": "http://127.0.0.1:9"}
    exe = str(Path(sys.executable).parent / "oncoserve")
    run = subprocess.run([exe, "models", "sync-triton", "--dest", str(tmp_path / "models")], capture_output=True, text=True,
                         env=env, timeout=120)  # fmt: skip
    assert run.returncode == 1 and "no credentials" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "models").exists()  # nothing written without a verified source
