"""API tokens and roles. Tokens are random, shown once, and stored only as SHA-256 hashes.

Roles, each including the ones before it:
  viewer          read the registry, status and audit
  data-scientist  register versions, promote to `candidate`
  platform        promote to `champion`, roll back
  admin           force a promotion (with a reason), manage tokens
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

ROLES = ("viewer", "data-scientist", "platform", "admin")
TOKEN_PREFIX = "osv_"


class AuthError(PermissionError):
    """`unauthenticated` (no or unknown token: HTTP 401) or `forbidden` (role too low: HTTP 403)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Identity:
    name: str
    role: str

    def at_least(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def require(identity: Identity | None, role: str, action: str) -> Identity:
    if identity is None:
        raise AuthError("unauthenticated", f"{action} needs a token with role {role} or higher (none given)")
    if not identity.at_least(role):
        raise AuthError("forbidden", f"{action} needs role {role} or higher; {identity.name} is {identity.role}")
    return identity


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Hashed tokens in a mode-600 JSON file under ONCOSERVE_HOME/auth."""

    def __init__(self, path: Path):
        self.path = path

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return json.loads(self.path.read_text())

    def _write(self, entries: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(entries, handle, indent=1)
        os.replace(tmp, self.path)

    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(self.path.with_suffix(".lock"), "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        return lock

    def create(self, name: str, role: str, by: Identity | None) -> str:
        """A new token for `name`; needs an admin, except for the very first token (bootstrap)."""
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        with self._locked():
            entries = self._read()
            if entries:
                require(by, "admin", "creating a token")
            elif role != "admin":
                raise ValueError("the first token must be an admin token (it manages the others)")
            if any(e["name"] == name for e in entries):
                raise ValueError(f"a token named {name!r} exists; revoke it first")
            token = TOKEN_PREFIX + secrets.token_urlsafe(32)
            entries.append({"name": name, "role": role, "sha256": _digest(token), "created": time.time()})
            self._write(entries)
        return token

    def revoke(self, name: str, by: Identity | None) -> None:
        require(by, "admin", "revoking a token")
        with self._locked():
            entries = self._read()
            kept = [e for e in entries if e["name"] != name]
            if len(kept) == len(entries):
                raise ValueError(f"no token named {name!r}")
            self._write(kept)

    def authenticate(self, token: str | None) -> Identity | None:
        if not token:
            return None
        digest = _digest(token.strip())
        for entry in self._read():
            if hmac.compare_digest(entry["sha256"], digest):
                return Identity(entry["name"], entry["role"])
        raise AuthError("unauthenticated", "the token is not valid (unknown or revoked)")

    def list(self) -> list[dict]:
        return [{"name": e["name"], "role": e["role"], "created": e["created"]} for e in self._read()]
