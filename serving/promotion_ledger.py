"""The alias ledger: the platform's signed promotion records, kept in the models bucket.

MLflow keeps no alias history and lets any registry writer move an alias, so serving does not trust
the alias on its own. The platform API (the one writer) signs a record for every champion move and
publishes it here *before* it moves the alias:

  s3://<models>/promotions/<task>/<seq>.json   every record, in order (history)
  s3://<models>/promotions/<task>/head.json    the record in force now

A replica loads a champion only when the head verifies with the platform's public key, names exactly
the version the alias points at, and is not older than the record the replica already serves.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from oncoserve.signing import UntrustedRecord, Verifier

PREFIX = "promotions"


def _key(task: str, name: str) -> str:
    return f"{PREFIX}/{task}/{name}.json"


def read_json(store, bucket: str, key: str) -> dict | None:
    from minio.error import S3Error

    try:
        response = store.get_object(bucket, key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject"):
            return None
        raise
    try:
        return json.loads(response.read())
    except ValueError:
        raise UntrustedRecord(f"s3://{bucket}/{key} is not JSON") from None
    finally:
        response.close()
        response.release_conn()


def write_json(store, bucket: str, key: str, data: dict) -> None:
    body = json.dumps(data, sort_keys=True).encode()
    store.put_object(bucket, key, io.BytesIO(body), len(body), content_type="application/json")


def head(store, bucket: str, task: str) -> dict | None:
    return read_json(store, bucket, _key(task, "head"))


def publish(store, bucket: str, signed: dict) -> None:
    """Write a signed record to the history, then make it the head (the platform only)."""
    record = signed["record"]
    write_json(store, bucket, _key(record["task"], f"{int(record['seq']):06d}"), signed)
    write_json(store, bucket, _key(record["task"], "head"), signed)


def restore_head(store, bucket: str, task: str, signed: dict | None) -> None:
    """Put a previous head back (an alias move that failed after its record was published)."""
    if signed is None:
        store.remove_object(bucket, _key(task, "head"))
    else:
        write_json(store, bucket, _key(task, "head"), signed)


def history(store, bucket: str, task: str) -> list[dict]:
    names = sorted(o.object_name for o in store.list_objects(bucket, prefix=f"{PREFIX}/{task}/")
                   if not o.object_name.endswith("/head.json"))  # fmt: skip
    return [r for r in (read_json(store, bucket, n) for n in names) if r is not None]


def next_seq(store, bucket: str, task: str) -> int:
    current = head(store, bucket, task)
    return int(current["record"]["seq"]) + 1 if current else 1


@dataclass
class TrustDecision:
    trusted: bool
    record: dict | None
    reason: str = ""


class ChampionTrust:
    """What a serving replica believes about its task's champion."""

    def __init__(self, store, bucket: str, verifier: Verifier, task: str):
        self.store, self.bucket, self.verifier, self.task = store, bucket, verifier, task

    def signed_champion(self) -> dict:
        """The verified head record; UntrustedRecord when there is none or it does not verify."""
        signed = head(self.store, self.bucket, self.task)
        if signed is None:
            raise UntrustedRecord(f"{self.task}: no signed promotion record; promote through the platform "
                                  "(oncoserve models promote)")  # fmt: skip
        record = self.verifier.verify(signed)
        if record.get("task") != self.task or record.get("alias") != "champion":
            raise UntrustedRecord(f"{self.task}: the head record is for {record.get('task')}/{record.get('alias')}")
        return record

    def decide(self, alias_version: str | None, serving_seq: int = 0) -> TrustDecision:
        """May the replica load `alias_version` (where the champion alias points now)?"""
        try:
            record = self.signed_champion()
        except UntrustedRecord as exc:
            return TrustDecision(False, None, str(exc))
        if str(record["version"]) != str(alias_version):
            return TrustDecision(False, record, f"champion alias points at v{alias_version} but the platform's signed "
                                                f"record names v{record['version']}")  # fmt: skip
        if int(record["seq"]) < serving_seq:
            return TrustDecision(False, record, f"the signed record (seq {record['seq']}) is older than the one served "
                                                f"(seq {serving_seq}): a replayed record")  # fmt: skip
        return TrustDecision(True, record)
