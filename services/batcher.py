"""Adaptive batching for a task replica: batch what is already waiting, never delay a lone request.

Serve's `@serve.batch` waits up to its timeout for every batch, so at low load each request pays the
window and gains nothing. Here a request that finds the model idle runs at once; requests that arrive
while a model call is running wait for that call anyway, and go together into the next one (up to
`max_batch_size`). Only when two or more are already waiting and the batch is not full does the
batcher wait, at most `wait_s`, for it to fill.

Requests share a model call only when their tensors have the same shapes and dtypes. When a shared
call fails, each request is retried alone, so one bad request fails only itself; errors in
`shared_errors` (the backend is down) fail the whole batch without retries.

Batching has to pay, and on a CPU it often does not: a 3D network already fills the cores with one
study, so a batch of N costs about N single calls, plus one copy of every request's tensor to assemble
it. The batcher therefore times its calls (seconds per row, assembly included) for single requests and
for shared ones; once both are known and shared calls are not at least `MARGIN` cheaper per row, it
stops forming batches (waiting requests run one by one, so the first is not held back by the others)
and tries a shared call again every `PROBE_EVERY` calls, in case the load or the model changed.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np


def split_rows(outputs: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """The batched outputs back per request, as views (no copy)."""
    bounds = np.cumsum([0, *sizes])
    return [{k: v[bounds[i] : bounds[i + 1]] for k, v in outputs.items()} for i in range(len(sizes))]


def batch_limit(configured: int, backend_limit: int | None) -> int:
    """Requests per model call: the deployment's `max_batch_size`, never above what the backend accepts
    (a Triton model config's max_batch_size, a graph with a fixed batch axis)."""
    return configured if backend_limit is None else max(1, min(configured, backend_limit))


MIN_SAMPLES = 3  # calls of each kind before the batcher judges whether sharing pays
MARGIN = 0.05  # a shared call must be this much cheaper per row than a single one
PROBE_EVERY = 32  # while batching does not pay, one shared call in this many re-measures it


class CallCosts:
    """Seconds per row of recent model calls, single-request vs shared (batch assembly included)."""

    def __init__(self, window: int = 16):
        self.single: deque[float] = deque(maxlen=window)
        self.shared: deque[float] = deque(maxlen=window)
        self._since_probe = 0

    def record(self, shared: bool, seconds: float, rows: int) -> None:
        (self.shared if shared else self.single).append(seconds / max(rows, 1))

    def sharing_pays(self) -> bool:
        """Whether the next call may carry several requests (False: one request per call)."""
        if len(self.shared) < MIN_SAMPLES:
            return True  # not known yet: share, as a batcher is asked to
        if len(self.single) < MIN_SAMPLES:
            return False  # under steady load lone requests are rare: make single calls to learn their cost
        if statistics.median(self.shared) < statistics.median(self.single) * (1 - MARGIN):
            return True
        self._since_probe += 1
        if self._since_probe >= PROBE_EVERY:
            self._since_probe = 0
            return True
        return False


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    future: asyncio.Future
    rows: int
    key: tuple
    on: object = None


class AdaptiveBatcher:
    """`await submit(inputs)` -> `run(batched inputs)`'s (label, outputs), this request's rows only.

    `run` is synchronous (a model call) and runs in a worker thread; `on_batch(n)` is told the size of
    every model call. `submit(inputs, on=x)` shares calls only with requests on the same `x` (a model
    version pinned by the caller) and calls `run(batched inputs, x)`."""

    def __init__(self, run: Callable[[dict], tuple[str, dict]], max_batch_size: int = 4, wait_s: float = 0.01,
                 on_batch: Callable[[int], None] | None = None, shared_errors: tuple[type[BaseException], ...] = ()):  # fmt: skip
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self._on_batch, self._shared_errors = on_batch, shared_errors
        self._waiting: list[_Pending] = []
        self._worker: asyncio.Task | None = None
        self._arrived: asyncio.Event | None = None
        self.costs = CallCosts()

    def reset_costs(self) -> None:
        """Forget the measured call costs (a new model version costs what it costs)."""
        self.costs = CallCosts()

    async def submit(self, inputs: dict[str, np.ndarray], on: object = None) -> tuple[str, dict[str, np.ndarray]]:
        loop = asyncio.get_running_loop()
        rows = len(next(iter(inputs.values())))
        key = (id(on), *((k, v.shape[1:], v.dtype.str) for k, v in sorted(inputs.items())))
        item = _Pending(inputs, loop.create_future(), rows, key, on)
        self._waiting.append(item)
        if self._arrived is not None:
            self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await item.future

    async def _drain(self) -> None:
        while self._waiting:
            limit = self.max_batch_size if len(self._waiting) == 1 or self.costs.sharing_pays() else 1
            if 1 < len(self._waiting) < limit and self.wait_s > 0:
                await self._fill()
            batch, self._waiting = self._waiting[:limit], self._waiting[limit:]
            await self._run_batch(batch)

    async def _fill(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(self._waiting) < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
            self._arrived = asyncio.Event()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
            finally:
                self._arrived = None

    async def _run_batch(self, batch: list[_Pending]) -> None:
        groups: dict[tuple, list[_Pending]] = {}
        for item in batch:
            if not item.future.done():  # a caller that went away needs no model call
                groups.setdefault(item.key, []).append(item)
        for members in groups.values():
            await self._call(members, retry_alone=len(members) > 1)

    async def _call(self, members: list[_Pending], retry_alone: bool) -> None:
        # A lone request goes in as it is: concatenating one array would copy it.
        first = members[0].inputs
        t0 = time.perf_counter()
        stacked = first if len(members) == 1 else {k: np.concatenate([m.inputs[k] for m in members]) for k in first}
        if self._on_batch is not None:
            self._on_batch(len(members))
        try:
            on = members[0].on
            label, outputs = await asyncio.to_thread(self._run, stacked, *(() if on is None else (on,)))
            self.costs.record(len(members) > 1, time.perf_counter() - t0, sum(m.rows for m in members))
        except Exception as exc:
            if retry_alone and not isinstance(exc, self._shared_errors):
                for member in members:  # find the request that broke the call; the others still answer
                    await self._call([member], retry_alone=False)
                return
            for member in members:
                if not member.future.done():
                    member.future.set_exception(exc)
            return
        for member, part in zip(members, split_rows(outputs, [m.rows for m in members])):
            if not member.future.done():
                member.future.set_result((label, part))
