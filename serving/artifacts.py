"""Compiled artifacts are verified against the sha256 recorded at compile time before anything loads them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from serving.registry import Registry


class TamperedArtifact(RuntimeError):
    """An artifact whose bytes differ from what was compiled (or that was never compiled)."""


def expected_digests(registry: Registry, task: str, version: str) -> dict[str, str]:
    tag = registry.version(task, version).tags.get("compiled_sha256")
    if not tag:
        raise TamperedArtifact(f"{task} v{version} was never compiled: no recorded sha256 (run `oncoserve compile`)")
    return json.loads(tag)


def fetch_verified(store, bucket: str, prefix: str, key: str, expected: dict[str, str]) -> bytes:
    """Read `<prefix>/<key>` from S3 and return it only if its sha256 is the recorded one."""
    if key not in expected:
        raise TamperedArtifact(f"{key}: no recorded sha256")
    response = store.get_object(bucket, f"{prefix}/{key}")
    try:
        data = response.read()
    finally:
        response.close()
        response.release_conn()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected[key]:
        raise TamperedArtifact(f"{key}: sha256 {digest[:12]}... differs from the compiled {expected[key][:12]}...; refusing to load")
    return data


def verify_file(path: Path, expected_sha256: str) -> Path:
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if digest != expected_sha256:
        raise TamperedArtifact(f"{path.name}: sha256 {digest[:12]}... differs from the compiled {expected_sha256[:12]}...")
    return path


def tree_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by its POSIX path relative to `root`."""
    root = Path(root)
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}  # fmt: skip


def verify_tree(root: Path, expected: dict[str, str]) -> Path:
    """`root` only if it holds exactly the recorded files with the recorded bytes (none added, none missing)."""
    found = tree_digests(root)
    problems = [f"{name}: not recorded" for name in sorted(found.keys() - expected.keys())]
    problems += [f"{name}: missing" for name in sorted(expected.keys() - found.keys())]
    problems += [f"{name}: sha256 {found[name][:12]}... differs from the recorded {expected[name][:12]}..."
                 for name in sorted(found.keys() & expected.keys()) if found[name] != expected[name]]  # fmt: skip
    if problems:
        raise TamperedArtifact("; ".join(problems[:5]) + "; refusing to load")
    return Path(root)


def load_compiled_onnx(registry: Registry, store, bucket: str, prefix: str, task: str, version: str, dst: Path,
                       expected: dict[str, str] | None = None) -> Path:  # fmt: skip
    """The compiled model.onnx of a version, verified, written to `dst` (what backends load).

    `expected`: the digests of a signed promotion record (serving passes them, so a registry tag
    rewritten after the promotion changes nothing); default: the version's `compiled_sha256` tag."""
    expected = expected if expected is not None else expected_digests(registry, task, version)
    data = fetch_verified(store, bucket, prefix, f"{task}/{version}/model.onnx", expected)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)
    return dst


def compiled_runtime(registry: Registry, store, bucket: str, prefix: str, task: str, version: str,
                     expected: dict[str, str] | None = None) -> str:  # fmt: skip
    """The CPU runtime `oncoserve compile` measured fastest for this version (verified runtime.json).

    A version compiled before runtimes were measured has no runtime.json: onnxruntime, as it was served."""
    expected = expected if expected is not None else expected_digests(registry, task, version)
    key = f"{task}/{version}/runtime.json"
    if key not in expected:
        return "onnxruntime"
    chosen = json.loads(fetch_verified(store, bucket, prefix, key, expected))["runtime"]
    if not chosen:
        raise TamperedArtifact(f"{key}: names no runtime")
    return chosen
