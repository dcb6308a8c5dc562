"""Per-caller request rate limits for the gateway: a token bucket per caller (the token's name, else
the client address). Each gateway replica keeps its own buckets, so with N replicas a caller may get
up to N times the rate; on one machine there is one gateway replica by default."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    def __init__(self, per_minute: float, burst: int, clock=time.monotonic, max_callers: int = 10_000):
        self.rate = per_minute / 60.0
        self.burst = max(1, burst)
        self.enabled = per_minute > 0
        self.clock = clock
        self.max_callers = max_callers
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def acquire(self, caller: str) -> float:
        """0 when the request may go ahead, else the seconds until it could."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        with self._lock:
            bucket = self._buckets.get(caller)
            if bucket is None:
                if len(self._buckets) >= self.max_callers:  # bounded memory: forget the idlest callers
                    for key, _ in sorted(self._buckets.items(), key=lambda kv: kv[1].stamp)[: self.max_callers // 10]:
                        del self._buckets[key]
                bucket = self._buckets[caller] = _Bucket(float(self.burst), now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate
