"""The adaptive batcher: a lone request is not delayed, waiting ones share a call, a bad one fails alone."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from services.batcher import AdaptiveBatcher, split_rows


class _Model:
    """Doubles its input; records every call's batch; `gate` holds a call until released."""

    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[int] = []
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, inputs):
        self.calls.append(len(inputs["x"]))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if np.isnan(inputs["x"]).any():
            raise ValueError("NaN in the input")
        return "v1", {"y": inputs["x"] * 2}


def _x(value: float, rows: int = 1, width: int = 3) -> dict:
    return {"x": np.full((rows, width), value, np.float32)}


def test_a_lone_request_runs_at_once_even_with_a_long_batch_window():
    model = _Model()
    batcher = AdaptiveBatcher(model, max_batch_size=8, wait_s=30.0)

    async def one():
        return await asyncio.wait_for(batcher.submit(_x(1.0)), 5)  # a 30 s wait would time out here

    label, out = asyncio.run(one())
    assert label == "v1" and np.array_equal(out["y"], np.full((1, 3), 2.0)) and model.calls == [1]


def test_requests_that_arrive_during_a_call_share_the_next_one():
    gate = threading.Event()
    model = _Model(gate)
    sizes = []
    batcher = AdaptiveBatcher(model, max_batch_size=4, wait_s=0.0, on_batch=sizes.append)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(_x(0.0)))
        await asyncio.to_thread(model.started.wait, 5)  # the first call is running ...
        rest = [asyncio.ensure_future(batcher.submit(_x(float(i)))) for i in range(1, 6)]  # ... five arrive
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(first, *rest)

    results = asyncio.run(scenario())
    assert model.calls == [1, 4, 1] and sizes == [1, 4, 1]  # up to max_batch_size per call
    for i, (_, out) in enumerate(results):  # each gets its own rows back
        assert np.array_equal(out["y"], np.full((1, 3), 2.0 * i))


def test_one_bad_request_fails_alone_and_the_others_answer():
    gate = threading.Event()
    model = _Model(gate)
    batcher = AdaptiveBatcher(model, max_batch_size=4, wait_s=0.0)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(_x(0.0)))
        await asyncio.to_thread(model.started.wait, 5)
        good = asyncio.ensure_future(batcher.submit(_x(1.0)))
        bad = asyncio.ensure_future(batcher.submit(_x(float("nan"))))
        also = asyncio.ensure_future(batcher.submit(_x(3.0)))
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(first, good, bad, also, return_exceptions=True)

    first, good, bad, also = asyncio.run(scenario())
    assert isinstance(bad, ValueError) and "NaN" in str(bad)
    assert np.array_equal(good[1]["y"], np.full((1, 3), 2.0)) and np.array_equal(also[1]["y"], np.full((1, 3), 6.0))
    assert model.calls == [1, 3, 1, 1, 1]  # the shared call failed; each was retried alone


class _Down(RuntimeError):
    pass


def test_a_shared_error_fails_the_batch_without_retries():
    gate = threading.Event()
    calls = []

    def down(inputs):
        calls.append(len(inputs["x"]))
        gate.wait(10)
        raise _Down("backend down")

    batcher = AdaptiveBatcher(down, max_batch_size=4, wait_s=0.0, shared_errors=(_Down,))

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(_x(0.0)))
        while not calls:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.submit(_x(1.0))) for _ in range(3)]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(scenario())
    assert all(isinstance(r, _Down) for r in results) and calls == [1, 3]


def test_requests_of_different_shapes_never_share_a_call():
    gate = threading.Event()
    model = _Model(gate)
    batcher = AdaptiveBatcher(model, max_batch_size=4, wait_s=0.0)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(_x(0.0)))
        await asyncio.to_thread(model.started.wait, 5)
        others = [asyncio.ensure_future(batcher.submit(_x(1.0, width=w))) for w in (3, 5, 3)]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(first, *others)

    results = asyncio.run(scenario())
    assert sorted(model.calls[1:]) == [1, 2]
    assert [out["y"].shape for _, out in results] == [(1, 3), (1, 3), (1, 5), (1, 3)]


def test_split_rows_returns_views_per_request():
    out = {"y": np.arange(12.0).reshape(6, 2)}
    parts = split_rows(out, [1, 3, 2])
    assert [p["y"].shape[0] for p in parts] == [1, 3, 2]
    assert all(np.shares_memory(p["y"], out["y"]) for p in parts)


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        AdaptiveBatcher(lambda x: ("v", x), max_batch_size=0)


def test_the_batch_size_never_exceeds_what_the_backend_accepts():
    from services.batcher import batch_limit

    assert batch_limit(8, None) == 8  # no limit from the backend: the deployment's setting
    assert batch_limit(8, 4) == 4  # a Triton config compiled with max_batch_size 4
    assert batch_limit(2, 4) == 2
    assert batch_limit(4, 0) == 1  # never zero


class _LinearModel:
    """A CPU-bound network: a call costs the same per row whatever the batch (plus nothing for sharing)."""

    def __init__(self, seconds_per_row: float, shared_overhead_s: float = 0.0):
        self.calls: list[int] = []
        self.seconds_per_row, self.shared_overhead_s = seconds_per_row, shared_overhead_s

    def __call__(self, inputs):
        rows = len(inputs["x"])
        self.calls.append(rows)
        import time

        time.sleep(self.seconds_per_row * rows + (self.shared_overhead_s if rows > 1 else 0.0))
        return "v1", {"y": inputs["x"] * 2}


async def _waves(batcher, waves: int, per_wave: int) -> list:
    results = []
    for w in range(waves):
        results += await asyncio.gather(*(batcher.submit(_x(float(w * per_wave + i))) for i in range(per_wave)))
    return results


def test_batching_stops_when_a_shared_call_costs_as_much_per_row_and_answers_stay_right():
    """Measured, not assumed: on a model whose cost is linear in the batch (a 3D net on a CPU) plus an
    assembly cost, the batcher falls back to one request per call after a few shared calls."""
    model = _LinearModel(0.004, shared_overhead_s=0.02)  # shared: 9 ms per row vs 4 ms alone
    batcher = AdaptiveBatcher(model, max_batch_size=4, wait_s=0.0)
    results = asyncio.run(_waves(batcher, waves=12, per_wave=4))
    for i, (label, out) in enumerate(results):
        assert label == "v1" and np.array_equal(out["y"], _x(float(i))["x"] * 2)
    assert max(model.calls[:4]) > 1  # it tried sharing first
    assert len(batcher.costs.single) >= 3
    assert sum(1 for rows in model.calls[-16:] if rows > 1) <= 1  # then stayed out of the way (one re-probe at most)


def test_batching_continues_when_a_shared_call_is_cheaper_per_row():
    model = _LinearModel(0.0, shared_overhead_s=0.0)
    model.seconds_per_row = 0.0

    def gpu_like(inputs):  # a fixed cost per call, whatever its rows: sharing pays
        import time

        model.calls.append(len(inputs["x"]))
        time.sleep(0.01)
        return "v1", {"y": inputs["x"] * 2}

    batcher = AdaptiveBatcher(gpu_like, max_batch_size=4, wait_s=0.0)
    asyncio.run(_waves(batcher, waves=12, per_wave=4))
    assert batcher.costs.sharing_pays()
    assert sum(1 for rows in model.calls[-6:] if rows > 1) >= 4
