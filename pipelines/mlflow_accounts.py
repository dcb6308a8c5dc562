"""MLflow's accounts for the platform (MLflow's basic-auth app): the platform account is MLflow's admin;
it creates the training account (runs, versions) and the read-only account (serving, viewers).

`python -m pipelines.mlflow_accounts` does the same on Kubernetes (a Helm hook Job) from the
environment: MLFLOW_TRACKING_URI, MLFLOW_AUTH_ADMIN_USERNAME/_PASSWORD and, per account,
ONCOSERVE_MLFLOW_<NAME>_USERNAME/_PASSWORD (all from Secrets).
"""

from __future__ import annotations

import os
import sys

import requests


class AccountError(RuntimeError):
    """MLflow's user API refused the platform account."""


def ensure_users(mlflow_url: str, admin: tuple[str, str], users: list[tuple[str, str]]) -> list[str]:
    """Create the users that do not exist yet (idempotent); returns the names created."""
    base = f"{mlflow_url.rstrip('/')}/api/2.0/mlflow/users"
    created = []
    for username, password in users:
        got = requests.get(f"{base}/get", params={"username": username}, auth=admin, timeout=10)
        if got.status_code == 200:
            continue
        if got.status_code in (401, 403):
            raise AccountError(f"MLflow refused the platform account {admin[0]!r} (HTTP {got.status_code}): it must be MLflow's admin")
        made = requests.post(f"{base}/create", json={"username": username, "password": password}, auth=admin, timeout=10)
        if made.status_code != 200:
            raise AccountError(f"creating MLflow user {username}: HTTP {made.status_code} {made.text[:100]}")
        created.append(username)
    return created


def main() -> int:
    env = os.environ
    try:
        admin = (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"])
        users = [(env[f"ONCOSERVE_MLFLOW_{n}_USERNAME"], env[f"ONCOSERVE_MLFLOW_{n}_PASSWORD"]) for n in ("TRAINING", "READER")]
        created = ensure_users(env["MLFLOW_TRACKING_URI"], admin, users)
    except KeyError as exc:
        print(f"error: {exc.args[0]} is not set", file=sys.stderr)
        return 1
    except (AccountError, requests.RequestException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"MLflow accounts ready ({', '.join(created) or 'nothing to create'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
