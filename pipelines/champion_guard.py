"""After a champion swap, watch the new champion's error rate; roll back to `previous` when it breaches.

A canary is watched by its own evidence (pipelines.rollouts); a champion moved for all traffic at once is
watched here, on the platform's beat. The gateway records every analysed study (services.monitoring:
`model_versions`) and every study a task failed on (`failed: {task: version}`, the version the study was
pinned to by the version barrier). For each task whose signed champion record is a promotion younger
than `rollback_window_s`, the guard counts the studies since that record answered or failed by that
version; with at least `rollback_min_studies` of them and a failed share above
`rollback_max_error_rate`, it rolls the champion back to `previous` (Promoter.rollback: signed,
audited as `rollback` by `platform (automatic)` with the reason). Replicas follow the signed record as for
any swap. A rollback record is not watched again (no bouncing between two failing versions), and
`rollback_max_error_rate` unset turns the guard off.

Failures the gateway cannot attribute to a version (no barrier answered) are not counted, nor failures of
what runs the model (a backend unreachable, a replica lost: services.remote_errors.infrastructure), which a
rollback would not cure.
"""

from __future__ import annotations

import logging
import time

from oncoserve.auth import Identity
from oncoserve.signing import UntrustedRecord, Verifier
from serving import monitoring_store, promotion_ledger

log = logging.getLogger(__name__)
AUTOMATIC = Identity("platform (automatic)", "platform")


def error_rate(records: list[dict], task: str, version: str, since: float) -> tuple[int, int]:
    """(studies, failures) of `task` on `version` among the records written at or after `since`."""
    studies = failures = 0
    for record in records:
        if record.get("time", 0.0) < since:
            continue
        if str((record.get("failed") or {}).get(task)) == str(version):
            studies, failures = studies + 1, failures + 1
        elif str((record.get("model_versions") or {}).get(task)) == str(version):
            studies += 1
    return studies, failures


class ChampionGuard:
    def __init__(self, promoter, store, artifacts_bucket: str, max_error_rate: float | None, min_studies: int,
                 window_s: float):  # fmt: skip
        self.promoter, self.store, self.bucket = promoter, store, artifacts_bucket
        self.max_error_rate, self.min_studies, self.window_s = max_error_rate, min_studies, window_s
        self._records: dict[str, dict] = {}  # monitoring records already read (they never change)

    def watched(self, task: str, now: float) -> dict | None:
        """The signed champion record under watch for `task`, if any."""
        head = promotion_ledger.head(self.promoter.store, self.promoter.bucket, task)
        if head is None:
            return None
        try:
            record = Verifier(self.promoter.signer.public_pem).verify(head)  # only what the platform signed
        except UntrustedRecord:
            return None  # serving refuses it too; the alias reconcile reports it
        if record.get("action") == "rollback" or now - float(record.get("time", 0.0)) > self.window_s:
            return None
        return record

    def check(self, tasks, now: float | None = None) -> list[dict]:
        """Roll back every recently promoted champion over its error budget; returns what was rolled back."""
        if self.max_error_rate is None:
            return []
        now = time.time() if now is None else now
        watched = {task: r for task in tasks if (r := self.watched(task, now)) is not None}
        if not watched:
            return []  # the usual case: nothing read
        records = monitoring_store.records(self.store, self.bucket, self.window_s / 86400, now=now, cache=self._records)
        rolled = []
        for task, record in watched.items():
            version = str(record["version"])
            studies, failures = error_rate(records, task, version, float(record["time"]))
            if studies < self.min_studies or failures / studies <= self.max_error_rate:
                continue
            reason = (f"champion v{version} failed {failures} of {studies} studies since its promotion "
                      f"(error rate {failures / studies:.2f} > {self.max_error_rate})")  # fmt: skip
            try:
                old, new = self.promoter.rollback(AUTOMATIC, task, reason=reason)
            except Exception as exc:  # no `previous` to go back to: say so on every beat until someone acts
                log.error("%s: %s, and the rollback failed: %s", task, reason, exc)
                continue
            rolled.append({"task": task, "from": old, "to": new, "reason": reason})
        return rolled
