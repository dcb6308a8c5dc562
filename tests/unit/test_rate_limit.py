"""The gateway's per-caller token bucket."""

from __future__ import annotations

import pytest

from services.rate_limit import RateLimiter


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_burst_then_the_rate_per_caller():
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(1.0)  # one token per second at 60/min
    assert limiter.acquire("b") == 0.0  # another caller has its own bucket
    clock.now += 0.5
    assert limiter.acquire("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.acquire("a") == 0.0
    clock.now += 3600
    assert [limiter.acquire("a") for _ in range(4)][:3] == [0.0] * 3  # refills to the burst, not beyond


def test_zero_disables_and_memory_is_bounded():
    assert all(RateLimiter(0, 1).acquire("x") == 0.0 for _ in range(1000))
    clock = Clock()
    limiter = RateLimiter(60, 1, clock=clock, max_callers=100)
    for i in range(1000):
        clock.now += 0.001
        limiter.acquire(f"ip:{i}")
    assert len(limiter._buckets) <= 100


def test_gateway_answers_429_with_retry_after_once_a_caller_is_over(tmp_path):
    """The gateway class itself (outside Serve): the limit applies per caller before any work."""
    import asyncio

    from starlette.requests import Request

    from oncoserve.settings import Settings
    from services.gateway import StudyGateway

    fields = Settings(home=tmp_path, serve_rate_limit_per_min=6, serve_rate_limit_burst=2).model_dump()
    # Serve wraps the class for its ingress; the class as written is the wrapper's base.
    plain = StudyGateway.func_or_class.__mro__[1]
    gateway = object.__new__(plain)
    plain.__init__(gateway, fields, None, None, None, None, None)

    def request(token: str | None) -> Request:
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        return Request({"type": "http", "method": "POST", "path": "/v1/reports", "headers": headers, "client": ("10.0.0.9", 5)})

    async def work():
        from fastapi.responses import JSONResponse

        return JSONResponse({"ok": True})

    async def call(token):
        return await gateway._guarded("/v1/reports", work, request(token))

    statuses = [asyncio.run(call("alice")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    refused = asyncio.run(call("alice"))
    assert refused.headers["retry-after"] == "10" and b"rate limit: 6 requests per minute" in refused.body
    assert asyncio.run(call("bob")).status_code == 200  # other callers are not affected
    assert asyncio.run(call(None)).status_code == 200  # no token: keyed by the client address
