"""Append-only audit log (JSON lines, fsync'd) of registry actions and analyses.

An action that changes state is written in two lines sharing an `action_id`: an `intent` line, flushed
to disk *before* the change, and an outcome line (`completed`, `refused` or `failed`) after it. A crash
in between leaves an intent without an outcome, which `entries()` reports as `incomplete`: there is
never a change without a record. Single-step events (a registration, an analysis) are one line.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from pathlib import Path

OUTCOMES = ("completed", "refused", "failed")


class AuditLog:
    def __init__(self, path: Path):
        self.path = path

    def _append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, default=str, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
            os.fsync(fd)  # durable before the caller goes on to change anything
        finally:
            os.close(fd)

    def begin(self, actor: str, role: str, action: str, **details) -> str:
        action_id = uuid.uuid4().hex
        self._append({"action_id": action_id, "phase": "intent", "time": time.time(), "actor": actor,
                      "role": role, "action": action, **details})  # fmt: skip
        return action_id

    def finish(self, action_id: str, outcome: str, **details) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
        self._append({"action_id": action_id, "phase": outcome, "time": time.time(), **details})

    def event(self, actor: str, role: str, action: str, **details) -> str:
        """A one-step action recorded as already completed (registration, analysis)."""
        action_id = uuid.uuid4().hex
        self._append({"action_id": action_id, "phase": "completed", "single": True, "time": time.time(),
                      "actor": actor, "role": role, "action": action, **details})  # fmt: skip
        return action_id

    def raw(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def entries(self) -> list[dict]:
        """One entry per action, in order, with `status` completed / refused / failed / incomplete."""
        merged: dict[str, dict] = {}
        for record in self.raw():
            entry = merged.setdefault(record["action_id"], {"status": "incomplete"})
            phase = record.pop("phase")
            if phase == "intent":
                entry.update(record)
            else:
                entry.update({k: v for k, v in record.items() if k not in ("time",)} | {"status": phase,
                             "finished": record["time"]})  # fmt: skip
                entry.setdefault("time", record["time"])
        return list(merged.values())
