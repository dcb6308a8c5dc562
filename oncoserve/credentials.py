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


# MLflow accounts of the embedded stack (MLflow's basic-auth app). The platform account is MLflow's
# admin (it alone should move aliases); training jobs create experiments, runs and versions; serving
# and read-only users read. Generated once per home, mode 600; on Kubernetes they come from Secrets
# as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in each pod's environment.
MLFLOW_ACCOUNTS = {"platform": "oncoserve-platform", "training": "oncoserve-training", "reader": "oncoserve-reader"}


def mlflow_accounts(path: Path, create: bool = True) -> dict | None:
    """{account: {"username", "password"}, "flask_secret": ...} from `path` (created the first time)."""
    if path.exists():
        return json.loads(path.read_text())
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = {name: {"username": user, "password": secrets.token_urlsafe(24)} for name, user in MLFLOW_ACCOUNTS.items()}
    data["flask_secret"] = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
    return data


def use_mlflow_account(path: Path, account: str) -> bool:
    """Make this process's MLflow client act as `account` (its env variables), when the home holds the
    accounts; otherwise leave the environment alone (a pod's Secret, or a registry without auth)."""
    data = mlflow_accounts(path, create=False)
    if not data:
        return False
    os.environ["MLFLOW_TRACKING_USERNAME"] = data[account]["username"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = data[account]["password"]
    return True
