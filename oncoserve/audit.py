"""Append-only, hash-chained audit log (JSON lines, fsync'd) of registry actions and analyses.

Every record stands alone and is never rewritten: an action that changes state is an `intent` record,
flushed to disk *before* the change, and a separate outcome record (`completed`, `refused` or `failed`)
after it, both carrying the same `action_id`. A crash in between leaves an intent without an outcome,
which `entries()` reports as `incomplete`: there is never a change without a record.

Tamper evidence: each record carries `seq` (1, 2, ...), `prev` (the `hash` of the record before it) and
its own `hash` (sha256 of its canonical JSON without `hash`). `verify()` recomputes the chain and names
the first record that was edited, removed, inserted or reordered. A line that is not a record (a torn
write, a hand edit) is reported by `read()` and skipped, never making the rest of the log unreadable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

OUTCOMES = ("completed", "refused", "failed")
GENESIS = "0" * 64
# Fields an outcome record may add to its action's entry; never the intent's actor, role or flags.
_OUTCOME_FIELDS = ("error", "warning", "signed_record", "artifact_sha256")


def record_hash(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, default=str, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class ReadResult:
    records: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "line N: ..." for lines that are not records


@dataclass
class VerifyResult:
    ok: bool
    records: int
    first_bad: int | None = None  # 1-based line number
    problem: str = ""


def _last_line(fd: int) -> bytes:
    """The file's last non-empty line, read backwards from the end (the log can be large)."""
    size = os.lseek(fd, 0, os.SEEK_END)
    chunk, data = 4096, b""
    pos = size
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        os.lseek(fd, pos, os.SEEK_SET)
        data = os.read(fd, step) + data
        stripped = data.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    return data.rstrip(b"\n")


class AuditLog:
    def __init__(self, path: Path):
        self.path = path

    def _append(self, record: dict) -> dict:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one writer at a time: the chain is read and extended atomically
            prev, seq = GENESIS, 1
            last = _last_line(fd)
            if last.strip():
                try:
                    tail = json.loads(last)
                    prev, seq = tail["hash"], int(tail["seq"]) + 1
                except (ValueError, KeyError, TypeError):
                    # A corrupt last line: chain on from its bytes, so verify() names it, not us.
                    prev = hashlib.sha256(last).hexdigest()
                    seq = sum(1 for line in Path(self.path).read_bytes().splitlines() if line.strip()) + 1
            record = {**record, "seq": seq, "prev": prev}
            record["hash"] = record_hash(record)
            os.write(fd, (json.dumps(record, default=str, sort_keys=True) + "\n").encode())
            os.fsync(fd)  # durable before the caller goes on to change anything
        finally:
            os.close(fd)
        return record

    def begin(self, actor: str, role: str, action: str, **details) -> str:
        action_id = uuid.uuid4().hex
        self._append({"action_id": action_id, "phase": "intent", "time": time.time(), "actor": actor,
                      "role": role, "action": action, **details})  # fmt: skip
        return action_id

    def finish(self, action_id: str, outcome: str, **details) -> dict:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
        return self._append({"action_id": action_id, "phase": outcome, "time": time.time(), **details})

    def event(self, actor: str, role: str, action: str, **details) -> str:
        """A one-step action recorded as already completed (registration, analysis, a refused alias)."""
        action_id = uuid.uuid4().hex
        self._append({"action_id": action_id, "phase": "completed", "single": True, "time": time.time(),
                      "actor": actor, "role": role, "action": action, **details})  # fmt: skip
        return action_id

    def read(self) -> ReadResult:
        out = ReadResult()
        if not self.path.exists():
            return out
        for n, line in enumerate(self.path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "action_id" not in record or "phase" not in record:
                    raise ValueError("not an audit record")
            except ValueError as exc:
                out.problems.append(f"line {n}: unreadable ({str(exc)[:80]})")
                continue
            out.records.append(record)
        return out

    def raw(self) -> list[dict]:
        return self.read().records

    def entries(self) -> list[dict]:
        """One entry per action, in order, with `status` completed / refused / failed / incomplete.

        The entry is the intent record as written; its outcome only adds `status`, `finished` and the
        outcome's own details (an error, a warning), never replacing a field the intent set."""
        merged: dict[str, dict] = {}
        for record in self.read().records:
            entry = merged.setdefault(record["action_id"], {"status": "incomplete"})
            phase = record["phase"]
            body = {k: v for k, v in record.items() if k not in ("phase", "prev", "hash")}
            if phase == "intent" or record.get("single"):
                for key, value in body.items():
                    entry.setdefault(key, value)
                if record.get("single"):
                    entry["status"] = phase
            elif "finished" not in entry:  # the first outcome counts; a second one cannot rewrite it
                entry["status"], entry["finished"] = phase, record["time"]
                entry["outcome_seq"] = record.get("seq")
                for key in _OUTCOME_FIELDS:
                    if key in record:
                        entry.setdefault(key, record[key])
                entry.setdefault("time", record["time"])
        return list(merged.values())

    def verify(self) -> VerifyResult:
        """Check every line: a record, its own hash, its `seq` and its link to the one before."""
        if not self.path.exists():
            return VerifyResult(True, 0)
        prev, count = GENESIS, 0
        for n, line in enumerate(self.path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            count += 1
            try:
                record = json.loads(line)
                stored = record["hash"]
            except (ValueError, KeyError, TypeError):
                return VerifyResult(False, count, n, f"line {n} is not an audit record")
            if record_hash(record) != stored:
                return VerifyResult(False, count, n, f"line {n} (seq {record.get('seq')}): its content does not match its hash (edited)")
            if record.get("seq") != count:
                return VerifyResult(False, count, n, f"line {n}: seq {record.get('seq')} where {count} was expected "
                                                     "(a record before it was removed, inserted or moved)")  # fmt: skip
            if record.get("prev") != prev:
                return VerifyResult(False, count, n, f"line {n} (seq {count}): does not follow the record before it "
                                                     "(that one was changed, removed or reordered)")  # fmt: skip
            prev = stored
        return VerifyResult(True, count)

    def head(self) -> str:
        records = self.read().records
        return records[-1]["hash"] if records else GENESIS
