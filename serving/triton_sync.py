"""Triton's model repository, built locally from verified files only.

Triton reading the repository straight from S3 would load whatever bytes are there. Instead a sync
(`oncoserve models sync-triton`: the Triton pod's init container, then a sidecar every N seconds) writes
a local repository that Triton polls:

    DEST/<task>/config.pbtxt        the served versions, named explicitly (champion and previous)
    DEST/<task>/<n>/model.onnx      or model.plan (TensorRT) when every served version has one

Each file is checked against the sha256 recorded at compile time on the registry version
(`compiled_sha256`) before it is written, and a version's config text (`compiled_config`) against the
digest recorded for it. A version whose files do not verify is left out (a copy verified earlier stays),
so Triton's poll can never pick up an unverified file. What a pass loaded, kept and refused, and why, is
returned (and written as JSON where asked, outside the repository: Triton reads every entry there). Files are written to a temporary name and renamed,
version folders before the config that names them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minio.error import S3Error

from serving.artifacts import TamperedArtifact, expected_digests, fetch_verified
from serving.compile import served_versions
from serving.registry import Registry
from serving.tasks import MODEL_TASKS

MODEL_FILES = ("model.onnx", "model.plan")


@dataclass
class TaskSync:
    task: str
    served: list[str] = field(default_factory=list)  # what the registry says should be loaded
    loaded: list[str] = field(default_factory=list)  # versions the written config names
    refused: dict[str, str] = field(default_factory=dict)  # version -> why it was left out
    platform: str = ""  # tensorrt_plan, onnxruntime_onnx, or the backend named (openvino)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _version_files(registry: Registry, store, bucket: str, prefix: str, task: str, version: str,
                   dest: Path) -> tuple[set[str], str]:  # fmt: skip
    """Bring one version's model files into DEST/task/version, verified; its verified config text."""
    digests = expected_digests(registry, task, version)
    config_text = registry.version(task, version).tags.get("compiled_config", "")
    config_key = f"{task}/config.pbtxt"
    if not config_text or hashlib.sha256(config_text.encode()).hexdigest() != digests.get(config_key):
        raise TamperedArtifact(f"{task} v{version}: no compiled config whose sha256 was recorded (re-run `oncoserve compile`)")
    present = set()
    for name in MODEL_FILES:
        key = f"{task}/{version}/{name}"
        if key not in digests:
            continue
        local = dest / task / version / name
        if not (local.exists() and _sha256(local) == digests[key]):  # fetched and verified before: keep
            _write_atomic(local, fetch_verified(store, bucket, prefix, key, digests))
        present.add(name)
    if "model.onnx" not in present:
        raise TamperedArtifact(f"{task} v{version}: no model.onnx recorded at compile")
    return present, config_text


def _local_copy_still_good(registry: Registry, task: str, version: str, dest: Path) -> set[str]:
    """Model files of a version verified on an earlier pass whose bytes still match the record."""
    try:
        digests = expected_digests(registry, task, version)
    except TamperedArtifact:
        return set()
    good = set()
    for name in MODEL_FILES:
        local, key = dest / task / version / name, f"{task}/{version}/{name}"
        if local.exists() and key in digests and _sha256(local) == digests[key]:
            good.add(name)
    return good


def sync_task(registry: Registry, store, bucket: str, prefix: str, task: str, dest: Path) -> TaskSync:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    report = TaskSync(task, served=served_versions(registry, task))
    files: dict[str, set[str]] = {}
    configs: dict[str, str] = {}
    for version in report.served:
        try:
            files[version], configs[version] = _version_files(registry, store, bucket, prefix, task, version, dest)
        except (TamperedArtifact, S3Error) as exc:  # wrong bytes, or a recorded file missing from S3
            report.refused[version] = str(exc)
            kept = _local_copy_still_good(registry, task, version, dest)
            if "model.onnx" in kept and (dest / task / "config.pbtxt").exists():
                files[version] = kept  # the copy verified before stays served
            else:
                shutil.rmtree(dest / task / version, ignore_errors=True)
    for stale in (p for p in (dest / task).glob("*") if p.is_dir() and p.name not in files):
        shutil.rmtree(stale, ignore_errors=True)  # no longer champion or previous: Triton unloads it
    report.loaded = sorted(files, key=int)
    if not report.loaded:
        (dest / task / "config.pbtxt").unlink(missing_ok=True)
        return report
    # The newest verified version's config, with every loaded version named, on one platform for all.
    newest = max((v for v in report.loaded if v in configs), key=int, default=None)
    if newest is None:  # only copies kept from earlier passes: their config stays as it was
        report.platform = "unchanged"
        return report
    config = text_format.Parse(configs[newest], mc.ModelConfig())
    del config.version_policy.specific.versions[:]
    config.version_policy.specific.versions.extend(int(v) for v in report.loaded)
    if all("model.plan" in files[v] for v in report.loaded):
        config.ClearField("backend")
        config.platform = "tensorrt_plan"
        config.default_model_filename = "model.plan"
        config.optimization.ClearField("execution_accelerators")  # the plan is TensorRT already
    report.platform = config.platform or config.backend
    _write_atomic(dest / task / "config.pbtxt", text_format.MessageToString(config).encode())
    return report


def sync_repository(registry: Registry, store, bucket: str, prefix: str, dest: Path,
                    tasks: tuple[str, ...] = MODEL_TASKS, report_file: Path | None = None) -> list[TaskSync]:  # fmt: skip
    dest.mkdir(parents=True, exist_ok=True)
    reports = [sync_task(registry, store, bucket, prefix, task, dest) for task in tasks]
    if report_file is not None:
        record = {"synced_at": time.time(), "repository": str(dest), "tasks": [asdict(r) for r in reports]}
        _write_atomic(report_file, json.dumps(record, indent=1).encode())
    return reports
