"""The durable job table: one SQLite file under the platform's protected state (HOME/jobs, mode 0600).

A job is one study analysis that runs asynchronously. Its row is the whole truth about it (state,
progress, what failed, where the artifacts are, the review and the delivery); the artifacts themselves
live in the object store. Several processes share the file (the platform API that runs jobs, the DICOM
receiver that queues them): SQLite's WAL mode and short transactions make that safe, and a job is
claimed by one compare-and-set UPDATE, so two runners never run the same job.

The same file holds the re-identification map of studies that came from a PACS (`identities`): the
original patient and study attributes and the pseudonymous -> original UID map. It never leaves this
file: not in the object store, the logs, the audit log or any API answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

# The states a job passes through, in order; `failed` and `rejected` can end it at any step.
STATES = ("queued", "preprocessing", "inferring", "reporting", "awaiting review", "accepted", "exporting",
          "exported", "completed", "rejected", "failed")  # fmt: skip
RUNNING = ("preprocessing", "inferring", "reporting", "exporting")  # a runner holds the job
FINAL = ("exported", "completed", "rejected", "failed")
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    source TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    state TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '',
    input TEXT NOT NULL,
    result TEXT,
    review TEXT,
    delivery TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS identities (
    job_id TEXT PRIMARY KEY,
    patient TEXT NOT NULL,
    uids TEXT NOT NULL
);
"""


class JobNotFound(KeyError):
    """No such job (or not one this caller may see: the API answers both with 404)."""


@dataclass
class Job:
    id: str
    owner: str
    source: str
    state: str
    progress: float
    detail: str
    input: dict
    created: float
    updated: float
    result: dict | None = None
    review: dict | None = None
    delivery: dict | None = None
    error: str | None = None
    attempts: int = 0
    idempotency_key: str | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        """What the API shows: everything but the idempotency key (a caller's secret-ish handle)."""
        return {"id": self.id, "owner": self.owner, "source": self.source, "state": self.state,
                "progress": round(self.progress, 3), "detail": self.detail, "input": self.input,
                "result": self.result, "review": self.review, "delivery": self.delivery, "error": self.error,
                "attempts": self.attempts, "created": self.created, "updated": self.updated}  # fmt: skip


def _row(row: sqlite3.Row) -> Job:
    loads = lambda v: json.loads(v) if v else None  # noqa: E731
    return Job(id=row["id"], owner=row["owner"], source=row["source"], state=row["state"], progress=row["progress"],
               detail=row["detail"], input=json.loads(row["input"]), created=row["created"], updated=row["updated"],
               result=loads(row["result"]), review=loads(row["review"]), delivery=loads(row["delivery"]),
               error=row["error"], attempts=row["attempts"], idempotency_key=row["idempotency_key"])  # fmt: skip


class JobStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        if not self.path.exists():
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _db(self):
        # One connection per operation: the store is used from threads and from other processes.
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    # -- creating and reading ---------------------------------------------------------------------
    def create(self, owner: str, source: str, input: dict, idempotency_key: str | None = None) -> tuple[Job, bool]:
        """A new queued job, or the existing one with the same idempotency key (created False)."""
        now = time.time()
        job_id = f"job-{time.strftime('%Y%m%d', time.gmtime(now))}-{secrets.token_hex(6)}"
        with self._db() as db:
            try:
                db.execute("INSERT INTO jobs (id, owner, source, idempotency_key, state, input, created, updated) "
                           "VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                           (job_id, owner, source, idempotency_key, json.dumps(input), now, now))  # fmt: skip
            except sqlite3.IntegrityError:
                row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                return _row(row), False
        return self.get(job_id), True

    def by_key(self, idempotency_key: str) -> Job | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
        return _row(row) if row else None

    def get(self, job_id: str) -> Job:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return _row(row)

    def list(self, owner: str | None = None, state: str | None = None, limit: int = 100) -> list[Job]:
        query, args = "SELECT * FROM jobs WHERE 1=1", []
        if owner is not None:
            query, args = query + " AND owner = ?", [*args, owner]
        if state is not None:
            query, args = query + " AND state = ?", [*args, state]
        with self._db() as db:
            rows = db.execute(query + " ORDER BY created DESC LIMIT ?", (*args, limit)).fetchall()
        return [_row(r) for r in rows]

    # -- moving a job -----------------------------------------------------------------------------
    def claim(self) -> Job | None:
        """Take the oldest queued (or accepted, to export) job for this runner; None when there is none."""
        with self._db() as db:
            for _ in range(5):
                # A job whose last try failed (serving unreachable, a delivery refused) waits for its next one.
                row = db.execute("SELECT id, state FROM jobs WHERE state IN ('queued', 'accepted') AND not_before <= ? "
                                 "ORDER BY created LIMIT 1", (time.time(),)).fetchone()  # fmt: skip
                if row is None:
                    return None
                nxt = "preprocessing" if row["state"] == "queued" else "exporting"
                taken = db.execute("UPDATE jobs SET state = ?, attempts = attempts + 1, updated = ? WHERE id = ? AND state = ?",
                                   (nxt, time.time(), row["id"], row["state"])).rowcount  # fmt: skip
                if taken:
                    return self.get(row["id"])
        return None

    def update(self, job_id: str, **fields) -> Job:
        allowed = {"state", "progress", "detail", "input", "result", "review", "delivery", "error", "not_before"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"job fields {sorted(set(fields) - allowed)} cannot be set")
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown job state {fields['state']!r}")
        values = {k: json.dumps(v) if k in ("input", "result", "review", "delivery") and v is not None else v for k, v in fields.items()}
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._db() as db:
            if not db.execute(f"UPDATE jobs SET {sets}, updated = ? WHERE id = ?", (*values.values(), time.time(), job_id)).rowcount:
                raise JobNotFound(job_id)
        return self.get(job_id)

    def transition(self, job_id: str, expected: tuple[str, ...], **fields) -> Job | None:
        """Set fields only if the job is in one of `expected` states (a review racing a retry); None if not."""
        values = {k: json.dumps(v) if k in ("result", "review", "delivery") and v is not None else v for k, v in fields.items()}
        sets = ", ".join(f"{k} = ?" for k in values)
        marks = ", ".join("?" for _ in expected)
        with self._db() as db:
            done = db.execute(f"UPDATE jobs SET {sets}, updated = ? WHERE id = ? AND state IN ({marks})",
                              (*values.values(), time.time(), job_id, *expected)).rowcount  # fmt: skip
        return self.get(job_id) if done else None

    def requeue_interrupted(self) -> list[str]:
        """Jobs a runner held when its process died go back to where they can be taken up again: an
        analysis restarts from the stored input (idempotent: its artifacts are overwritten), an export
        from the stored artifacts."""
        with self._db() as db:
            rows = db.execute(f"SELECT id, state FROM jobs WHERE state IN ({', '.join('?' for _ in RUNNING)})", RUNNING).fetchall()
            for row in rows:
                back = "accepted" if row["state"] == "exporting" else "queued"
                db.execute("UPDATE jobs SET state = ?, detail = ?, updated = ? WHERE id = ? AND state = ?",
                           (back, f"resumed after an interruption during {row['state']}", time.time(), row["id"], row["state"]))  # fmt: skip
        return [r["id"] for r in rows]

    # -- the re-identification map (never leaves this file) ---------------------------------------
    def save_identity(self, job_id: str, patient: dict, uids: dict[str, str]) -> None:
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO identities (job_id, patient, uids) VALUES (?, ?, ?)",
                       (job_id, json.dumps(patient), json.dumps(uids)))  # fmt: skip

    def identity(self, job_id: str) -> tuple[dict, dict[str, str]] | None:
        with self._db() as db:
            row = db.execute("SELECT patient, uids FROM identities WHERE job_id = ?", (job_id,)).fetchone()
        return (json.loads(row["patient"]), json.loads(row["uids"])) if row else None
