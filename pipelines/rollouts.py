"""Rollouts, platform side: set a task's traffic policy (shadow, canary, off), watch canaries, report.

Runs inside the platform API (the one signer). Setting a policy is ordered like a champion move:
audit intent -> signed policy published (the candidate's digests checked against its bytes now, as a
champion's are) -> audit outcome. Replicas follow the new head within their watch interval
(services.rollout_follower).

A canary is watched: every `check()` reads the evidence recorded under the policy in force and, when it
breaches the policy's limits (serving.rollout_report.breach: error rate, p95 latency, agreement), the
platform publishes the champion-only policy itself, audited as `rollout_withdraw` by `platform
(automatic)` with the reason. Serving answers a study the candidate failed with the champion, so a
failing canary costs latency, not errors.
"""

from __future__ import annotations

import threading
import time

from oncoserve.auth import Identity, require
from oncoserve.signing import Verifier
from serving import rollout_ledger
from serving.rollout_report import breach, summarise
from serving.traffic import DEFAULT_LIMITS, MODES, TrafficPolicy

ROLE = "platform"  # the role that moves the champion also decides who else answers studies


class Rollouts:
    def __init__(self, promoter, store, bucket: str, audit):
        self.promoter, self.store, self.bucket, self.audit = promoter, store, bucket, audit
        self._lock = threading.Lock()

    def policy(self, task: str) -> TrafficPolicy:
        signed = rollout_ledger.head(self.store, self.bucket, task)
        if signed is None:
            return TrafficPolicy(task)
        return rollout_ledger.verified_policy(Verifier(self.promoter.signer.public_pem), signed, task)

    def set(self, who: Identity | None, task: str, mode: str | None, version: str | None = None, share: float = 0.0,
            reason: str | None = None, limits: dict | None = None, actor_action: str = "rollout_set") -> TrafficPolicy:  # fmt: skip
        require(who, ROLE, "setting a traffic policy")
        if mode is None:
            raise ValueError(f"a traffic policy needs a mode: one of {', '.join(MODES)}")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        if mode == "champion":
            version, share = None, 0.0
        else:
            if not version:
                raise ValueError(f"a {mode} policy needs a candidate version")
            if not 0.0 < share <= 1.0:
                raise ValueError(f"{'--sample' if mode == 'shadow' else '--weight'} must be in (0, 1], not {share}")
            champion = self.promoter.signed_champion(task)
            if champion is None:
                raise ValueError(f"{task} has no champion to compare a {mode} candidate with; promote one first")
            if str(version) == str(champion):
                raise ValueError(f"v{version} is {task}'s champion already; a {mode} candidate must be another version")
        unknown = set(limits or {}) - set(DEFAULT_LIMITS)
        if unknown:
            raise ValueError(f"unknown rollout limit(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULT_LIMITS)}")
        with self._lock:
            current = self.policy_or_none(task)
            action_id = self.audit.begin(who.name, who.role, actor_action, task=task, mode=mode, version=version, share=share,
                                         reason=reason, from_policy=current.describe() if current else None)  # fmt: skip
            try:
                digests = self.promoter.artifact_digests(task, str(version)) if version else {}
                record = {"kind": rollout_ledger.KIND, "task": task, "mode": mode, "version": str(version) if version else None,
                          "share": share, "limits": {**DEFAULT_LIMITS, **(limits or {})}, "artifact_sha256": digests,
                          "actor": who.name, "role": who.role, "reason": reason, "time": time.time(),
                          "seq": rollout_ledger.next_seq(self.store, self.bucket, task), "audit_action_id": action_id}  # fmt: skip
                rollout_ledger.publish(self.store, self.bucket, self.promoter.signer.sign(record))
            except Exception as exc:
                self.audit.finish(action_id, "failed", error=str(exc)[:300])
                raise
            self.audit.finish(action_id, "completed", seq=record["seq"])
        return TrafficPolicy.from_record(record)

    def policy_or_none(self, task: str) -> TrafficPolicy | None:
        try:
            return self.policy(task)
        except Exception:  # an unreadable head is replaced by the next signed one (and the audit says from what)
            return None

    def report(self, task: str, seq: int | None = None) -> dict:
        """The evidence under policy `seq` (default: the one in force, else the latest that had a candidate)."""
        records = [s["record"] for s in rollout_ledger.history(self.store, self.bucket, task)]
        if seq is None:
            with_candidate = [r for r in records if r.get("mode") in ("shadow", "canary")]
            if not with_candidate:
                raise ValueError(f"{task} has had no shadow or canary policy")
            chosen = with_candidate[-1]
        else:
            chosen = next((r for r in records if int(r["seq"]) == int(seq)), None)
            if chosen is None:
                raise ValueError(f"{task} has no rollout policy seq {seq}")
        entries = rollout_ledger.evidence(self.store, self.bucket, task, int(chosen["seq"]))
        in_force = records[-1]["seq"] == chosen["seq"] if records else False
        return {"task": task, "policy": {k: chosen.get(k) for k in ("seq", "mode", "version", "share", "limits", "actor", "time")},
                "in_force": in_force, **summarise(entries)}  # fmt: skip

    def check(self, tasks) -> list[dict]:
        """Withdraw every canary in force that breaches its limits; returns what was withdrawn."""
        withdrawn = []
        for task in tasks:
            policy = self.policy_or_none(task)
            if policy is None or policy.mode != "canary":
                continue
            entries = rollout_ledger.evidence(self.store, self.bucket, task, policy.seq)
            reason = breach(entries, policy.limits)
            if reason is None:
                continue
            self.set(Identity("platform (automatic)", "platform"), task, "champion",
                     reason=f"canary v{policy.version} withdrawn: {reason}", actor_action="rollout_withdraw")  # fmt: skip
            withdrawn.append({"task": task, "version": policy.version, "reason": reason})
        return withdrawn
