"""The platform's watch on a freshly promoted champion (pipelines.champion_guard): what it counts, when it
rolls back, and when it leaves a champion alone. The served rollback is in
tests/integration/test_serving_rollouts.py."""

from __future__ import annotations

import time

from oncoserve.signing import Signer
from pipelines.champion_guard import ChampionGuard, error_rate
from serving import monitoring_store, promotion_ledger
from tests.helpers import MemoryStore

MODELS, ARTIFACTS = "models", "artifacts"


class Promoter:
    """What the guard uses of pipelines.promotion.Promoter: its ledger, signer and rollback."""

    def __init__(self, tmp_path, store):
        self.store, self.bucket = store, MODELS
        self.signer = Signer.load_or_create(tmp_path / "k", tmp_path / "k.pub")
        self.rollbacks: list[tuple] = []

    def publish(self, task: str, version: str, action: str, at: float, signer=None) -> None:
        record = {"task": task, "alias": "champion", "version": version, "action": action, "time": at,
                  "seq": promotion_ledger.next_seq(self.store, MODELS, task)}  # fmt: skip
        promotion_ledger.publish(self.store, MODELS, (signer or self.signer).sign(record))

    def rollback(self, who, task: str, reason: str | None = None):
        self.rollbacks.append((who.name, task, reason))
        return "9", "8"


def study(store, at: float, task: str, version: str, failed: bool) -> None:
    record = {"time": at, "site": "a", "failed": {task: version}} if failed else {"time": at, "site": "a", "model_versions": {task: version}}
    monitoring_store.put_json(store, ARTIFACTS, monitoring_store.new_key(monitoring_store.RECORDS, at) + ".json", record)


def test_error_rate_counts_only_the_version_since_its_promotion():
    records = [{"time": 5, "failed": {"seg": "9"}}, {"time": 20, "failed": {"seg": "9"}}, {"time": 21, "model_versions": {"seg": "9"}},
               {"time": 22, "model_versions": {"seg": "8"}}, {"time": 23, "failed": {"cls": "9"}}, {"time": 24, "model_versions": {"cls": "3"}}]  # fmt: skip
    assert error_rate(records, "seg", "9", since=10) == (2, 1)


def test_a_new_champion_over_its_error_budget_is_rolled_back_once_judged(tmp_path):
    store, now = MemoryStore(), time.time()
    promoter = Promoter(tmp_path, store)
    promoter.publish("seg", "9", "promote", now - 60)
    guard = ChampionGuard(promoter, store, ARTIFACTS, max_error_rate=0.2, min_studies=5, window_s=3600)
    study(store, now - 120, "seg", "9", failed=True)  # before the promotion: not counted
    for i in range(3):
        study(store, now - 50 + i, "seg", "9", failed=True)
    assert guard.check(["seg"], now=now) == []  # 3 studies: not judged yet
    study(store, now - 40, "seg", "9", failed=False)
    study(store, now - 39, "seg", "9", failed=False)
    rolled = guard.check(["seg"], now=now)
    assert rolled == [{"task": "seg", "from": "9", "to": "8", "reason": "champion v9 failed 3 of 5 studies since its promotion (error rate 0.60 > 0.2)"}]
    assert promoter.rollbacks[0][:2] == ("platform (automatic)", "seg")


def test_a_healthy_champion_an_old_promotion_a_rollback_or_a_forged_record_is_left_alone(tmp_path):
    store, now = MemoryStore(), time.time()
    promoter = Promoter(tmp_path, store)
    guard = ChampionGuard(promoter, store, ARTIFACTS, max_error_rate=0.2, min_studies=5, window_s=3600)
    promoter.publish("seg", "9", "promote", now - 60)
    for i in range(10):
        study(store, now - 50 + i, "seg", "9", failed=i == 0)  # 1 in 10: within the budget
    assert guard.check(["seg"], now=now) == []
    for i in range(10):
        study(store, now - 30 + i, "seg", "9", failed=True)
    assert guard.check(["seg"], now=now + 4000) == []  # the promotion is older than the window
    promoter.publish("seg", "9", "rollback", now - 10)
    assert guard.check(["seg"], now=now) == []  # a rollback is not watched (no bouncing)
    other = Signer.load_or_create(tmp_path / "other", tmp_path / "other.pub")
    promoter.publish("seg", "9", "promote", now - 5, signer=other)
    study(store, now - 4, "seg", "9", failed=True)
    assert guard.check(["seg"], now=now) == []  # not signed by this platform
    off = ChampionGuard(promoter, store, ARTIFACTS, max_error_rate=None, min_studies=5, window_s=3600)
    promoter.publish("seg", "9", "promote", now - 3)
    for i in range(5):
        study(store, now - 2 + i * 0.1, "seg", "9", failed=True)
    assert off.check(["seg"], now=now) == [] and promoter.rollbacks == []
    assert guard.check(["seg"], now=now)[0]["from"] == "9"  # the same records, the guard on
