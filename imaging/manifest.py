"""A dataset's identity for lineage: a content-hashed manifest of every file in the layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def build(root: str | Path) -> dict:
    """{dataset_hash, files: [{path, sha256, bytes}]}; the hash covers paths and contents, not times."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset directory not found")
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue  # editor/OS droppings and staging dirs are not part of the dataset
        files.append({"path": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size})
    top = hashlib.sha256()
    for entry in files:
        top.update(f"{entry['path']}\0{entry['sha256']}\n".encode())
    cases = sorted({f["path"].split("/")[0] for f in files if "/" in f["path"]})
    return {"dataset_hash": top.hexdigest(), "n_cases": len(cases), "n_files": len(files), "files": files}


def write(root: str | Path) -> dict:
    manifest = build(root)
    (Path(root) / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
