"""Signed promotion records: Ed25519, private key held by the platform API only.

The platform signs every alias move it makes (task, alias, version, artifact sha256, gates digest,
actor, time, a per-task sequence number); serving replicas hold only the public key and load a
champion only when a record for exactly that version verifies. A record is signed over its canonical
JSON (sorted keys, no spaces), so any edited field breaks the signature.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class UntrustedRecord(ValueError):
    """A promotion record that is missing, malformed or not signed by the platform's key."""


def canonical(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str).encode()


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, even briefly
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


class Signer:
    def __init__(self, key: Ed25519PrivateKey):
        self._key = key
        self.public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
        self.key_id = hashlib.sha256(self.public_pem).hexdigest()[:16]

    @classmethod
    def load_or_create(cls, key_file: Path, public_file: Path) -> "Signer":
        """The platform's signing key (created once, mode 600) and its public half beside it."""
        if not key_file.exists():
            key = Ed25519PrivateKey.generate()
            _write_private(key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))  # fmt: skip
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{key_file}: not an Ed25519 private key")
        signer = cls(key)
        if not public_file.exists() or public_file.read_bytes() != signer.public_pem:
            tmp = public_file.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            _write_private(tmp, signer.public_pem)
            os.replace(tmp, public_file)
        return signer

    def sign(self, record: dict) -> dict:
        return {"record": record, "key_id": self.key_id,
                "signature": base64.b64encode(self._key.sign(canonical(record))).decode()}  # fmt: skip


class Verifier:
    def __init__(self, public_pem: bytes):
        key = serialization.load_pem_public_key(public_pem)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        self._key = key
        self.key_id = hashlib.sha256(public_pem).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: Path) -> "Verifier":
        if not Path(path).exists():
            raise UntrustedRecord(f"no platform public key at {path}: start the platform API first (`oncoserve stack up`)")
        return cls(Path(path).read_bytes())

    def verify(self, signed: object) -> dict:
        """The record inside `signed` if the platform's key signed it; UntrustedRecord otherwise."""
        if not isinstance(signed, dict) or not isinstance(signed.get("record"), dict) or not isinstance(signed.get("signature"), str):
            raise UntrustedRecord("not a signed promotion record")
        try:
            self._key.verify(base64.b64decode(signed["signature"], validate=True), canonical(signed["record"]))
        except (InvalidSignature, ValueError):
            raise UntrustedRecord("the promotion record's signature does not verify with the platform's key") from None
        return signed["record"]
