"""A local dataset folder copied into the data bucket, so the platform API can read it (it accepts
evaluation data only from there, never a path on its own disk)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from oncoserve.settings import Settings


def upload_dataset(settings: Settings, folder: Path, prefix: str = "eval") -> str:
    """Upload every file under `folder` to s3://<data bucket>/<prefix>/<content hash>/; returns that URI."""
    from oncoserve.object_store import object_store

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: dataset directory not found")
    files = sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(folder).as_posix().encode() + hashlib.sha256(f.read_bytes()).digest())
    base = f"{prefix}/{digest.hexdigest()[:16]}"
    store = object_store(settings)
    for f in files:
        store.fput_object(settings.bucket_data, f"{base}/{f.relative_to(folder).as_posix()}", str(f))
    return f"s3://{settings.bucket_data}/{base}/"
