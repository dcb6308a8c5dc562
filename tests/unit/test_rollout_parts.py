"""Rollouts' parts on their own: where a study falls in a policy, signed policies a replica follows or
refuses, agreement per task, the evidence report with intervals, a canary's limits, the shadow gate."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest

from imaging.study import CLASS_LABELS, Volume
from oncoserve.signing import Signer, UntrustedRecord, Verifier
from pipelines.gates import shadow_gate
from serving import promotion_ledger, rollout_ledger
from serving.rollout_report import breach, summarise, wilson
from serving.traffic import TrafficPolicy, study_fraction
from services.agreement import agreement
from services.rollout_follower import RolloutFollower
from tests.helpers import MemoryStore


def test_a_canary_share_is_sticky_per_study_and_its_weight_only_adds_studies():
    ids = [f"case-{i:05d}" for i in range(10_000)]
    fractions = [study_fraction(i) for i in ids]
    assert fractions == [study_fraction(i) for i in ids]  # the same study, the same place, every time
    at30 = TrafficPolicy("localization", "canary", "7", 0.3, 1)
    at50 = TrafficPolicy("localization", "canary", "7", 0.5, 2)
    on30 = {i for i, f in zip(ids, fractions) if at30.candidate_answers(f)}
    on50 = {i for i, f in zip(ids, fractions) if at50.candidate_answers(f)}
    assert 0.28 < len(on30) / len(ids) < 0.32 and 0.48 < len(on50) / len(ids) < 0.52
    assert on30 <= on50
    shadow = TrafficPolicy("localization", "shadow", "7", 1.0, 3)
    assert all(shadow.shadows(f) and not shadow.candidate_answers(f) for f in fractions[:100])
    champion = TrafficPolicy("localization")
    assert not any(champion.shadows(f) or champion.candidate_answers(f) for f in fractions[:100])
    assert not at30.candidate_answers(None)  # a study without a place (raw tensors) stays with the champion


@pytest.mark.parametrize("record, match", [
    ({"mode": "mirror"}, "mode"),
    ({"share": 1.5}, "share"),
])  # fmt: skip
def test_a_malformed_policy_is_refused(record, match):
    with pytest.raises(ValueError, match=match):
        TrafficPolicy.from_record({"task": "survival", "mode": "canary", "version": "2", "share": 0.2, "seq": 1, **record})


def _policy(seq, mode="shadow", version="5", share=1.0, task="localization"):
    return {"kind": "rollout", "task": task, "mode": mode, "version": version, "share": share, "seq": seq,
            "limits": {}, "artifact_sha256": {"model.onnx": "ab" * 32}}  # fmt: skip


def _put_head(store, task, signed):
    store.put_object("models", f"rollouts/{task}/head.json", io.BytesIO(json.dumps(signed).encode()), 0)


def test_a_replica_follows_only_signed_newer_rollout_records_for_its_task(tmp_path):
    signer = Signer.load_or_create(tmp_path / "k", tmp_path / "k.pub")
    store = MemoryStore()
    loads = []

    def load(version, record):
        loads.append((version, record["artifact_sha256"]))
        return SimpleNamespace(version=version)

    follower = RolloutFollower("localization", store, "models", Verifier(signer.public_pem), load)
    follower.poll_once("3")
    assert follower.current[0].mode == "champion" and follower.current[1] is None and loads == []

    rollout_ledger.publish(store, "models", signer.sign(_policy(1)))
    follower.poll_once("3")
    policy, candidate = follower.current
    assert (policy.mode, policy.version, policy.seq, candidate.version) == ("shadow", "5", 1, "5")
    assert loads == [("5", {"model.onnx": "ab" * 32})]  # loaded with the digests the signed record names

    edited = signer.sign(_policy(2, mode="canary", share=1.0))
    edited["record"]["version"] = "9"  # a policy edited after signing
    _put_head(store, "localization", edited)
    follower.poll_once("3")
    assert follower.current[0].seq == 1 and "does not verify" in follower.refused["reason"]

    promotion = signer.sign({"task": "localization", "alias": "champion", "version": "9", "seq": 7})
    _put_head(store, "localization", promotion)  # a genuine promotion record replayed as a policy
    follower.poll_once("3")
    assert follower.current[0].seq == 1 and "not a rollout record" in follower.refused["reason"]

    _put_head(store, "localization", signer.sign(_policy(4, task="survival")))
    follower.poll_once("3")
    assert follower.current[0].seq == 1 and "not a rollout record for localization" in follower.refused["reason"]

    rollout_ledger.publish(store, "models", signer.sign(_policy(2, mode="canary", share=0.3)))
    follower.poll_once("3")
    assert follower.current[0].mode == "canary" and follower.refused is None
    assert len(loads) == 1  # the same candidate: not loaded again for a new share

    _put_head(store, "localization", signer.sign(_policy(1)))  # an older policy put back
    follower.poll_once("3")
    assert follower.current[0].seq == 2 and "replayed" in follower.refused["reason"]

    rollout_ledger.publish(store, "models", signer.sign(_policy(3, version="3")))  # the candidate became champion
    follower.poll_once("3")
    assert follower.current[0].seq == 3 and follower.current[1] is None

    rollout_ledger.publish(store, "models", signer.sign(_policy(4, mode="champion", version=None, share=0.0)))
    follower.poll_once("3")
    assert follower.current == (TrafficPolicy("localization", "champion", None, 0.0, 4, {}), None)
    assert [s["record"]["seq"] for s in rollout_ledger.history(store, "models", "localization")] == [1, 2, 3, 4]


def test_a_candidate_that_fails_to_load_leaves_the_replica_on_the_champion(tmp_path):
    signer = Signer.load_or_create(tmp_path / "k", tmp_path / "k.pub")
    store = MemoryStore()

    def load(version, record):
        raise OSError("digest mismatch")

    follower = RolloutFollower("survival", store, "models", Verifier(signer.public_pem), load)
    rollout_ledger.publish(store, "models", signer.sign(_policy(1, task="survival", mode="canary", share=0.5)))
    follower.poll_once("1")
    assert follower.current[0].mode == "champion" and follower.current[1] is None


def _volume(labels):
    return Volume(labels.astype(np.uint8), np.eye(4))


def test_agreement_per_task():
    a = np.zeros((10, 10, 10), np.uint8)
    a[2:6, 2:6, 2:6] = 2
    a[3:5, 3:5, 3:5] = 4
    b = a.copy()
    b[2:6, 2:6, 6:8] = 2  # the candidate's oedema reaches further
    champion = {"section": {"volumes_ml": {"WT": 0.064, "TC": 0.008, "ET": 0.008}}, "mask": _volume(a)}
    candidate = {"section": {"volumes_ml": {"WT": 0.096, "TC": 0.008, "ET": 0.008}}, "mask": _volume(b)}
    seg = agreement("segmentation", champion, candidate)
    assert seg["dice_WT"] == pytest.approx(2 * 64 / (64 + 96), abs=1e-4) and seg["dice_ET"] == 1.0
    assert seg["agreement"] == seg["dice_WT"] and seg["volume_diff_ml_WT"] == pytest.approx(0.032)

    def cls(p):
        return {"section": {m: {"label": pos if p[i] >= 0.5 else neg, "probabilities": {neg: 1 - p[i], pos: p[i]}}
                            for i, (m, (neg, pos)) in enumerate(CLASS_LABELS.items())}}  # fmt: skip

    n = len(CLASS_LABELS)
    out = agreement("classification", cls([0.9] * n), cls([0.8] + [0.2] * (n - 1)))
    assert out["agreement"] == pytest.approx(1 / n)
    first = next(iter(CLASS_LABELS))
    assert out[f"{first}_agree"] == 1.0 and out[f"{first}_prob_diff"] == pytest.approx(-0.1)

    surv = agreement("survival", {"section": {"risk_group": "high", "risk_score": 0.4}}, {"section": {"risk_group": "low", "risk_score": -0.1}})
    assert surv["agreement"] == 0.0 and surv["risk_diff"] == pytest.approx(-0.5)

    def loc(found, centre):
        return {"section": {"found": found, "centroid_vox": centre}}

    assert agreement("localization", loc(True, [10, 10, 10]), loc(True, [13, 14, 10]))["agreement"] == 1.0
    assert agreement("localization", loc(True, [10, 10, 10]), loc(True, [30, 10, 10]))["agreement"] == 0.0
    assert agreement("localization", loc(True, [10, 10, 10]), loc(False, [0, 0, 0]))["found_agree"] == 0.0


def _entry(site, agree=1.0, error=None, ms=100.0):
    return {"site": site, "mode": "shadow", "error": error, "champion_ms": 80.0, "candidate_ms": None if error else ms,
            "agreement": None if error else {"agreement": agree, "found_agree": agree}}  # fmt: skip


def test_the_report_gives_intervals_overall_per_site_and_per_day():
    assert wilson(0, 10)[0] == 0.0 and 0.2 < wilson(0, 10)[1] < 0.35  # no errors in ten is not "0 % for sure"
    entries = [_entry("site-a")] * 8 + [_entry("site-b", 0.0)] * 2 + [_entry("site-b", error="RuntimeError: x")]
    report = summarise(entries)
    overall = report["overall"]
    assert overall["studies"] == 11 and overall["errors"] == 1
    assert overall["agreement"]["agreement"]["mean"] == 0.8 and overall["agreement"]["agreement"]["n"] == 10
    low, high = overall["agreement"]["found_agree"]["ci95"]
    assert low < 0.8 < high  # a Wilson interval for the 0/1 measure
    assert report["sites"]["site-a"]["agreement"]["agreement"]["mean"] == 1.0
    assert report["sites"]["site-b"]["errors"] == 1 and report["sites"]["site-b"]["studies"] == 3
    day = 86400.0 * 20000  # 2024-10-04 (UTC)
    timed = [{**_entry("a"), "time": day + 60}] * 3 + [{**_entry("a", 0.0), "time": day + 86400 + 60}] * 2
    over_time = summarise(timed)["days"]
    assert list(over_time) == ["2024-10-04", "2024-10-05"]
    assert over_time["2024-10-04"]["agreement"]["agreement"]["mean"] == 1.0 and over_time["2024-10-05"]["studies"] == 2


def test_a_canary_breaches_its_limits_only_with_enough_studies():
    limits = {"min_studies": 5, "max_error_rate": 0.1, "max_p95_ms": 1000}
    failing = [_entry("a", error="RuntimeError: boom")] * 3
    assert breach(failing, limits) is None  # three studies are not yet evidence
    assert "error rate 0.60" in breach(failing + [_entry("a")] * 2, limits)
    assert "p95 latency" in breach([_entry("a", ms=5000.0)] * 5, limits)
    assert breach([_entry("a")] * 5, limits) is None


def test_the_shadow_gate_needs_enough_studies_and_agreement():
    spec = {"min_studies": 5, "min_agreement": 0.9}
    few = shadow_gate(spec, [_entry("a")] * 4)
    assert not few.passed and "4 shadowed studies" in few.detail
    failed_ones_do_not_count = shadow_gate(spec, [_entry("a")] * 4 + [_entry("a", error="x")] * 3)
    assert not failed_ones_do_not_count.passed
    good = shadow_gate(spec, [_entry("a")] * 6)
    assert good.passed and good.value == 1.0 and "95 % CI" in good.detail
    poor = shadow_gate(spec, [_entry("a")] * 3 + [_entry("a", 0.0)] * 3)
    assert not poor.passed and poor.value == 0.5


def test_the_promotion_and_rollout_ledgers_stay_apart(tmp_path):
    signer = Signer.load_or_create(tmp_path / "k", tmp_path / "k.pub")
    store = MemoryStore()
    rollout_ledger.publish(store, "models", signer.sign(_policy(1)))
    assert promotion_ledger.history(store, "models", "localization") == []
    with pytest.raises(UntrustedRecord, match="not a rollout record"):
        rollout_ledger.verified_policy(Verifier(signer.public_pem), signer.sign({"task": "localization", "seq": 1}), "localization")
