"""A task replica's side of a rollout: follow the signed traffic policy and hold its candidate.

The replica polls the rollout ledger's head (serving.rollout_ledger) at the alias watch interval. A
policy that verifies is followed: its candidate is loaded beside the champion (digests from the signed
record), and only then is the (policy, candidate) pair swapped in with one assignment, so a study sees
either the old pair or the new one, never a policy without its model. A policy that does not verify
(edited, unsigned, another task's, older than the one followed) is refused: the replica keeps what it
follows, logs it once and counts it in `oncoserve_untrusted_rollout_total{task}`.

A candidate that fails to load leaves the replica on the champion alone (logged; retried next poll).

Every replica of a task follows the same policy at once: a verified policy is first *prepared* (its
candidate loaded beside the pair in force), then `on_ready()` tells the version barrier
(services.version_barrier, slot `<task>/rollout`), which makes it active on all replicas only when all
have prepared it (`activate(seq)`). Studies arrive pinned to the active policy seq (`pair_for`).
Without a barrier (`on_ready` returns False) the replica activates what it prepared at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from oncoserve.signing import UntrustedRecord, Verifier
from serving import rollout_ledger
from serving.traffic import TrafficPolicy
from services import metrics

log = logging.getLogger("ray.serve")


class RolloutFollower:
    def __init__(self, task: str, store, bucket: str, verifier: Verifier, load: Callable[[str, dict], object],
                 on_ready: Callable[[], bool] = lambda: False):  # fmt: skip
        """`load(version, signed_record)`: the replica's own model loader (verified digests);
        `on_ready()`: a policy was prepared; True if a barrier will `activate` it, False to activate now."""
        self.task, self.store, self.bucket, self.verifier, self._load = task, store, bucket, verifier, load
        self.on_ready = on_ready
        self.current: tuple[TrafficPolicy, object | None] = (TrafficPolicy(task), None)
        self.pairs: dict[int, tuple[TrafficPolicy, object | None]] = {0: self.current}  # prepared, by seq
        self.wants = 0  # the newest policy prepared
        self.refused: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self, champion: str) -> None:
        """Follow the ledger's head now (`champion`: the version this replica serves as champion)."""
        try:
            signed = rollout_ledger.head(self.store, self.bucket, self.task)
        except UntrustedRecord as exc:  # a head that is not even JSON
            self._refuse(str(exc))
            return
        except Exception:  # the store briefly unreachable: keep following what we follow
            return
        policy, candidate = self.pairs.get(self.wants, self.current)
        if signed is None:
            if policy.mode != "champion":
                self._refuse("the rollout head is gone; keeping the policy followed")
            return
        try:
            new = rollout_ledger.verified_policy(self.verifier, signed, self.task)
        except UntrustedRecord as exc:
            self._refuse(str(exc))
            return
        if new.seq == policy.seq:
            return
        if new.seq < policy.seq:
            self._refuse(f"the rollout head (seq {new.seq}) is older than the policy followed (seq {policy.seq}): a replayed record")
            return
        if new.mode == "champion" or new.version is None or str(new.version) == str(champion):
            pair = (new, None)  # nothing to load: the champion answers everything
        elif candidate is not None and candidate.version == str(new.version):
            pair = (new, candidate)  # a new share or mode for the same candidate
        else:
            try:
                loaded = self._load(str(new.version), signed["record"])
            except Exception as exc:
                log.error("%s: cannot load candidate v%s for the %s policy (%s); champion only", self.task, new.version, new.mode, exc)
                return
            pair = (new, loaded)
        self.refused = None
        self.pairs[new.seq], self.wants = pair, new.seq
        if not self.on_ready():
            self.activate(new.seq)

    def activate(self, seq: int) -> None:
        """Follow prepared policy `seq` for unpinned studies (the barrier committed it)."""
        pair = self.pairs.get(int(seq))
        if pair is None or pair is self.current:
            return
        self.current = pair
        for held in [s for s in self.pairs if s not in (int(seq), self.wants)]:
            self.pairs.pop(held, None)
        new = pair[0]
        log.info("%s: following traffic policy seq %d (%s v%s, share %.2f)", self.task, new.seq, new.mode, new.version, new.share)

    def pair_for(self, seq) -> tuple[TrafficPolicy, object | None]:
        """The (policy, candidate) a study pinned to policy `seq` is routed by (the active one if not held)."""
        current = self.current
        if seq is None or int(seq) == current[0].seq:
            return current
        return self.pairs.get(int(seq), current)

    def held(self) -> tuple[list[str], str]:
        return [str(s) for s in list(self.pairs)], str(self.wants)

    def _refuse(self, reason: str) -> None:
        if self.refused is None or self.refused["reason"] != reason:
            metrics.UNTRUSTED_ROLLOUT.labels(self.task).inc()
            log.error("%s: refusing traffic policy: %s", self.task, reason)
        self.refused = {"reason": reason}

    def start(self, champion: Callable[[], str], interval_s: float) -> "RolloutFollower":
        self.poll_once(champion())

        def run() -> None:
            while not self._stop.wait(interval_s):
                self.poll_once(champion())

        self._thread = threading.Thread(target=run, name=f"rollout-follow-{self.task}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def describe(self) -> dict:
        policy, candidate = self.current
        return {**policy.describe(), "candidate_loaded": candidate is not None, "refused": self.refused, "prepared_seq": self.wants}
