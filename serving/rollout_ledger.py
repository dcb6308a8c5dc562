"""The rollout ledger: the platform's signed traffic policies, kept in the models bucket beside the
alias ledger (serving.promotion_ledger), and the evidence serving records under each of them.

  s3://<models>/rollouts/<task>/<seq>.json                        every policy, in order (history)
  s3://<models>/rollouts/<task>/head.json                         the policy in force now
  s3://<models>/rollouts/<task>/evidence/<seq>/<time>-<id>.json   one object per shadowed or canaried study

Only the platform API signs a policy. A replica follows the head only when it verifies with the
platform's public key, is a rollout record for its task (a promotion record replayed here is refused),
and is not older than the policy it follows; the candidate it names is loaded with the digests the
record carries, as a champion is.
"""

from __future__ import annotations

import io
import json
import time
import uuid

from oncoserve.signing import UntrustedRecord, Verifier
from serving.promotion_ledger import read_json, write_json
from serving.traffic import TrafficPolicy

PREFIX = "rollouts"
KIND = "rollout"


def _key(task: str, name: str) -> str:
    return f"{PREFIX}/{task}/{name}.json"


def head(store, bucket: str, task: str) -> dict | None:
    return read_json(store, bucket, _key(task, "head"))


def next_seq(store, bucket: str, task: str) -> int:
    current = head(store, bucket, task)
    return int(current["record"]["seq"]) + 1 if current else 1


def publish(store, bucket: str, signed: dict) -> None:
    """Write a signed policy to the history, then make it the head (the platform only)."""
    record = signed["record"]
    write_json(store, bucket, _key(record["task"], f"{int(record['seq']):06d}"), signed)
    write_json(store, bucket, _key(record["task"], "head"), signed)


def history(store, bucket: str, task: str) -> list[dict]:
    names = sorted(o.object_name for o in store.list_objects(bucket, prefix=f"{PREFIX}/{task}/")
                   if not o.object_name.endswith("/head.json") and not o.is_dir)  # fmt: skip
    return [r for r in (read_json(store, bucket, n) for n in names) if r is not None]


def verified_policy(verifier: Verifier, signed: dict, task: str) -> TrafficPolicy:
    """The policy inside `signed`, if the platform signed it as a rollout record for `task`."""
    record = verifier.verify(signed)
    if record.get("kind") != KIND or record.get("task") != task:
        raise UntrustedRecord(f"{task}: the rollout head is not a rollout record for {task} "
                              f"(kind {record.get('kind')!r}, task {record.get('task')!r})")  # fmt: skip
    try:
        return TrafficPolicy.from_record(record)
    except (KeyError, TypeError, ValueError) as exc:
        raise UntrustedRecord(f"{task}: malformed rollout record ({exc})") from None


# -- evidence ----------------------------------------------------------------------------------------
def record_evidence(store, bucket: str, task: str, seq: int, entry: dict) -> str:
    """One study's evidence under policy `seq` (a shadow comparison, or a canary answer or failure)."""
    key = f"{PREFIX}/{task}/evidence/{int(seq):06d}/{time.time_ns()}-{uuid.uuid4().hex[:8]}.json"
    body = json.dumps(entry, sort_keys=True).encode()
    store.put_object(bucket, key, io.BytesIO(body), len(body), content_type="application/json")
    return key


def evidence(store, bucket: str, task: str, seq: int) -> list[dict]:
    prefix = f"{PREFIX}/{task}/evidence/{int(seq):06d}/"
    names = sorted(o.object_name for o in store.list_objects(bucket, prefix=prefix, recursive=True) if not o.is_dir)
    return [e for e in (read_json(store, bucket, n) for n in names) if e is not None]


def shadow_evidence(store, bucket: str, task: str, version: str) -> list[dict]:
    """Every shadow comparison recorded for `version` as the candidate, under any policy."""
    seqs = [int(s["record"]["seq"]) for s in history(store, bucket, task)
            if s["record"].get("mode") == "shadow" and str(s["record"].get("version")) == str(version)]  # fmt: skip
    return [e for seq in seqs for e in evidence(store, bucket, task, seq) if e.get("mode") == "shadow"]
