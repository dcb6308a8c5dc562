"""API tokens and roles. Tokens are random, shown once, and stored only as SHA-256 hashes.

Roles, each including the ones before it:
  viewer          read the registry, status and audit
  app             analyse uploaded studies and run raw model inference (apps, scripts)
  clinician       also analyse studies stored in the data bucket (`s3_uri`) and fetch their images
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

ROLES = ("viewer", "app", "clinician", "data-scientist", "platform", "admin")
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
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(entries, handle, indent=1)
        os.replace(tmp, self.path)

    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = os.fdopen(os.open(self.path.with_suffix(".lock"), os.O_WRONLY | os.O_CREAT, 0o600), "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        return lock

    @property
    def _bootstrapped(self) -> Path:
        # Written with the first token and never removed: revoking every token does not reopen bootstrap.
        return self.path.with_name("bootstrapped")

    def create(self, name: str, role: str, by: Identity | None, expires_in_s: float | None = None) -> str:
        """A new token for `name`; needs an admin, except for the very first token of a home (bootstrap)."""
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if expires_in_s is not None and expires_in_s <= 0:
            raise ValueError("a token's lifetime must be positive")
        with self._locked():
            entries = self._read()
            if entries or self._bootstrapped.exists():
                require(by, "admin", "creating a token")
            elif role != "admin":
                raise ValueError("the first token must be an admin token (it manages the others)")
            if any(e["name"] == name for e in entries):
                raise ValueError(f"a token named {name!r} exists; revoke it first")
            token = TOKEN_PREFIX + secrets.token_urlsafe(32)
            now = time.time()
            entries.append({"name": name, "role": role, "sha256": _digest(token), "created": now,
                            "expires": now + expires_in_s if expires_in_s else None})  # fmt: skip
            self._write(entries)
            if not self._bootstrapped.exists():
                os.close(os.open(self._bootstrapped, os.O_WRONLY | os.O_CREAT, 0o600))
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
        try:
            entries = self._read()
        except (OSError, ValueError) as exc:
            raise AuthError("unauthenticated", f"the token store cannot be read ({type(exc).__name__})") from None
        for entry in entries:
            if hmac.compare_digest(entry["sha256"], digest):
                if entry.get("expires") and entry["expires"] < time.time():
                    raise AuthError("unauthenticated", f"the token {entry['name']!r} expired")
                if entry.get("role") not in ROLES:
                    raise AuthError("unauthenticated", f"the token {entry['name']!r} has an unknown role")
                return Identity(entry["name"], entry["role"])
        raise AuthError("unauthenticated", "the token is not valid (unknown or revoked)")

    def list(self) -> list[dict]:
        return [{"name": e["name"], "role": e["role"], "created": e["created"], "expires": e.get("expires")}
                for e in self._read()]  # fmt: skip
