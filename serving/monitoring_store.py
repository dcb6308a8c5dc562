"""Where serving keeps what it saw, in the artifacts bucket (written by the gateway, read by the platform):

  monitoring/records/<YYYY-MM-DD>/<time_ns>-<id>.json     one per analysed study: site, input statistics,
                                                         QC flags, model versions and outputs (no image,
                                                         no identifier: the case only as a salted hash)
  monitoring/payloads/<YYYY-MM-DD>/<time_ns>-<id>/        opt-in (`payload_logging`): the de-identified input
                                                         volumes and the findings, deleted after
                                                         `payload_retention_days`
Dates are UTC days, so reading a window and deleting old payloads are prefix listings.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from datetime import datetime, timedelta, timezone

from serving.promotion_ledger import read_json

RECORDS, PAYLOADS = "monitoring/records", "monitoring/payloads"


def _day(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d")


def new_key(prefix: str, t: float) -> str:
    return f"{prefix}/{_day(t)}/{time.time_ns()}-{uuid.uuid4().hex[:8]}"


def put_json(store, bucket: str, key: str, data: dict) -> None:
    body = json.dumps(data, sort_keys=True).encode()
    store.put_object(bucket, key, io.BytesIO(body), len(body), content_type="application/json")


def put_bytes(store, bucket: str, key: str, data: bytes, content_type: str) -> None:
    store.put_object(bucket, key, io.BytesIO(data), len(data), content_type=content_type)


def _days(since: float, until: float) -> list[str]:
    first = datetime.fromtimestamp(since, timezone.utc).date()
    last = datetime.fromtimestamp(until, timezone.utc).date()
    return [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]


def records(store, bucket: str, days: float = 7.0, now: float | None = None, limit: int = 5000,
            cache: dict[str, dict] | None = None) -> list[dict]:  # fmt: skip
    """The monitoring records of the last `days` (newest `limit` of them), oldest first. `cache` (object
    name -> record; records never change) spares a periodic reader from fetching the same objects again."""
    now = time.time() if now is None else now
    names = []
    for day in _days(now - days * 86400, now):
        names += [o.object_name for o in store.list_objects(bucket, prefix=f"{RECORDS}/{day}/", recursive=True) if not o.is_dir]
    names = sorted(names)[-limit:]
    cache = {} if cache is None else cache
    for name in names:
        if name not in cache:
            cache[name] = read_json(store, bucket, name)
    for name in set(cache) - set(names):  # out of the window: forgotten
        del cache[name]
    out = [cache[n] for n in names if cache[n] is not None]
    return [r for r in out if r.get("time", now) >= now - days * 86400]


def prune_payloads(store, bucket: str, retention_days: float, now: float | None = None) -> int:
    """Delete stored payloads of days older than the retention; returns how many objects went."""
    now = time.time() if now is None else now
    cutoff = _day(now - retention_days * 86400)
    old = [o.object_name for o in store.list_objects(bucket, prefix=f"{PAYLOADS}/", recursive=True)
           if not o.is_dir and o.object_name[len(PAYLOADS) + 1:].split("/")[0] < cutoff]  # fmt: skip
    for name in old:
        store.remove_object(bucket, name)
    return len(old)
