"""The platform's de-identification secret: one salt for every component that de-identifies DICOM (the
serving gateway, the DICOM receiver), so a study's pseudonymous UIDs are the same wherever it entered.
Kept under the home (mode 600) or given by the deployment (ONCOSERVE_DEID_SALT), never in the object store."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def deid_salt(home: Path, configured: str | None = None) -> str:
    """The configured salt (a cluster's Secret: pods share no home), else the one kept under HOME."""
    if configured:
        return configured
    path = Path(home) / "serve" / ".deid-salt"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # O_EXCL: two processes starting at once agree on the one salt written first
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(16))
    return path.read_text().strip()
