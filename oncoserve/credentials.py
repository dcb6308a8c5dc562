"""Object-store credentials for the embedded stack: generated once, kept in ONCOSERVE_HOME (mode 600)."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str


def load_or_create(path: Path) -> S3Credentials:
    """Read the credentials file, creating it with fresh random keys the first time."""
    if path.exists():
        data = json.loads(path.read_text())
        return S3Credentials(data["access_key"], data["secret_key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    creds = S3Credentials("oncoserve-" + secrets.token_hex(6), secrets.token_urlsafe(30))
    # Create with 600 from the start: the secret is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"access_key": creds.access_key, "secret_key": creds.secret_key}, handle)
    return creds


def load(path: Path) -> S3Credentials:
    if not path.exists():
        raise FileNotFoundError(f"no credentials at {path}: run `oncoserve stack up` first")
    return load_or_create(path)
