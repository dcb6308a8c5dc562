"""The version barrier's rule (services.version_barrier): a swap commits on every replica or on none.
The served two-replica swap is in tests/integration/test_serving.py (hot-swap test)."""

from __future__ import annotations

import asyncio

import numpy as np

from services.batcher import AdaptiveBatcher
from services.version_barrier import STALE_INTERVALS, VersionBarrier, decide


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_swap_commits_only_when_every_replica_holds_the_new_version():
    barrier = VersionBarrier(interval_s=2.0, clock=Clock())
    assert barrier.report("a", {"seg": (["1"], "1")})["seg"] == "1"
    assert barrier.report("b", {"seg": (["1"], "1")})["seg"] == "1"
    # a moved alias: replica a has loaded 2 beside 1, b has not yet
    assert barrier.report("a", {"seg": (["1", "2"], "2")})["seg"] == "1"
    assert barrier.report("b", {"seg": (["1"], "1")})["seg"] == "1"
    # b wants 2 but its load failed (it still holds only 1): no commit anywhere
    assert barrier.report("b", {"seg": (["1"], "2")})["seg"] == "1"
    assert barrier.versions() == {"seg": "1"}
    assert barrier.report("b", {"seg": (["1", "2"], "2")})["seg"] == "2"  # both hold it: committed for both
    assert barrier.report("a", {"seg": (["1", "2"], "2")})["seg"] == "2"
    assert barrier.describe()["seg"] == {"active": "2", "replicas": 2, "commits": 2, "wanted": ["2"]}


def test_a_rollback_is_a_swap_like_any_other_and_tasks_are_independent():
    barrier = VersionBarrier(interval_s=2.0, clock=Clock())
    barrier.report("a", {"cls": (["4", "5"], "5")})["cls"]
    barrier.report("c", {"loc": (["9"], "9")})["loc"]
    assert barrier.report("a", {"cls": (["4", "5"], "4")})["cls"] == "4"  # back to the previous one, which is held
    assert barrier.versions() == {"cls": "4", "loc": "9"}


def test_a_replica_that_stops_reporting_no_longer_holds_a_swap_back():
    clock = Clock()
    barrier = VersionBarrier(interval_s=2.0, clock=clock)
    barrier.report("a", {"seg": (["1"], "1")})["seg"]
    barrier.report("b", {"seg": (["1"], "1")})["seg"]
    clock.now = 1.0
    assert barrier.report("a", {"seg": (["1", "2"], "2")})["seg"] == "1"  # b is alive and has not loaded 2
    clock.now = 1.0 + STALE_INTERVALS * 2.0 + 0.1  # b silent for longer than three intervals: gone
    assert barrier.report("a", {"seg": (["1", "2"], "2")})["seg"] == "2"
    assert barrier.describe()["seg"]["replicas"] == 1
    barrier.leave("a")
    assert barrier.describe()["seg"]["replicas"] == 0 and barrier.versions() == {"seg": "2"}


def test_the_champion_and_the_traffic_policy_are_slots_agreed_separately():
    barrier = VersionBarrier(interval_s=2.0, clock=Clock())
    first = barrier.report("a", {"loc": (["3"], "3"), "loc/rollout": (["0", "7"], "7")})
    assert first == {"loc": "3", "loc/rollout": "7"}
    barrier.report("b", {"loc": (["3"], "3"), "loc/rollout": (["0"], "0")})  # b has not prepared policy 7
    assert barrier.report("a", {"loc": (["3"], "3"), "loc/rollout": (["7"], "7")}) == {"loc": "3", "loc/rollout": "7"}
    assert barrier.report("b", {"loc": (["3"], "3"), "loc/rollout": (["0", "8"], "8")})["loc/rollout"] == "7"


def test_no_agreement_before_any_commit_leaves_studies_unpinned():
    assert decide(None, [{"ready": {"1"}, "wants": "1"}, {"ready": {"2"}, "wants": "2"}]) is None
    assert decide("1", []) == "1"


def test_the_batcher_never_shares_a_call_between_two_pinned_versions():
    calls: list[tuple[str, int]] = []

    def run(stacked, model):
        calls.append((model, len(stacked["x"])))
        return model, {"y": stacked["x"] * 2}

    async def go():
        batcher = AdaptiveBatcher(run, max_batch_size=8, wait_s=0.05)
        x = np.ones((1, 3), np.float32)
        return await asyncio.gather(*(batcher.submit({"x": x}, on=v) for v in ("1", "2", "1", "2", "1")))

    answers = asyncio.run(go())
    assert [label for label, _ in answers] == ["1", "2", "1", "2", "1"]
    assert all(model in ("1", "2") for model, _ in calls)
    assert sum(rows for model, rows in calls if model == "1") == 3 and sum(rows for model, rows in calls if model == "2") == 2
