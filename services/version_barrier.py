"""Every replica of a task answers with the same champion during a swap: a version barrier.

Without it each replica polls the alias on its own and swaps when it notices, so for up to a watch
interval two replicas answer with different versions. With it a swap has two phases:
  prepare  a replica that sees the (signed) alias move loads the new version *beside* the one it
           serves and reports to the barrier which versions it holds ready and which one it wants;
  commit   the barrier makes the new version the task's active one only when every live replica of
           the task wants it and holds it; until then the old one stays active on all of them.
The gateway asks the barrier for the active versions once per study and passes each task its version
(`route["champion"]`) and its traffic policy (`route["rollout"]`, a policy seq: shadow and canary
candidates swap through the same barrier); a replica answers with exactly those, which it holds. So a study sees
one version per task whichever replica answers it, and a swap completes on all replicas or on none:
a replica that cannot load the new version keeps the old one active everywhere (it retries).

The barrier is one named Ray actor per Serve application (detached, no CPU, restarted if it dies;
`oncoserve serve down` removes it). Replicas report every watch interval and at once after a load; one
not heard from for `STALE_INTERVALS` intervals (a dead or scaled-down replica) no longer holds a swap
back, and a restarted barrier rebuilds its state from the next round of reports.

Not covered: a replica started during a swap loads only the new champion; a study pinned to the old
version that reaches it is answered by the version it holds and counted in
`oncoserve_version_mismatch_total{task}`. The barrier commits as soon as the other replicas hold the new
one, which is the swap that was under way. The raw OIP v2 path is not pinned: it uses the replica's
active version, which moves when the replica next reports (within a watch interval of the commit).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("ray.serve")

STALE_INTERVALS = 3
NAMESPACE = "serve"


def decide(active: str | None, replicas: list[dict]) -> str | None:
    """The task's active version given each live replica's {"ready": set, "wants": version}."""
    if not replicas:
        return active
    wanted = {r["wants"] for r in replicas}
    if len(wanted) == 1:
        (want,) = wanted
        if want is not None and all(want in r["ready"] for r in replicas):
            return want  # commit: every replica holds it
    return active  # a swap under way (or refused somewhere): the version all of them still hold


class VersionBarrier:
    """The actor's body (a plain class, so its rule is unit-tested without Ray).

    A slot is one thing every replica of a task must agree on: the champion (slot `<task>`) and the
    traffic policy followed (slot `<task>/rollout`, values are policy seqs)."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.interval_s, self._clock = interval_s, clock
        self.replicas: dict[str, dict[str, dict]] = {}  # slot -> replica id -> {"ready", "wants", "seen"}
        self.active: dict[str, str] = {}
        self.commits: dict[str, int] = {}

    def report(self, replica: str, states: dict[str, tuple[list[str], str | None]]) -> dict[str, str | None]:
        """A replica's {slot: (ready, wants)}; returns each slot's active value (what the replica applies)."""
        now = self._clock()
        answer = {}
        for slot, (ready, wants) in states.items():
            group = self.replicas.setdefault(slot, {})
            group[replica] = {"ready": {str(v) for v in ready}, "wants": None if wants is None else str(wants), "seen": now}
            for name in [n for n, r in group.items() if now - r["seen"] > STALE_INTERVALS * self.interval_s]:
                del group[name]  # gone: it no longer holds a swap back
            before = self.active.get(slot)
            after = decide(before, list(group.values()))
            if after is not None and after != before:
                self.active[slot] = after
                self.commits[slot] = self.commits.get(slot, 0) + 1
            answer[slot] = self.active.get(slot)
        return answer

    def leave(self, replica: str) -> None:
        for group in self.replicas.values():
            group.pop(replica, None)

    def versions(self) -> dict[str, str]:
        return dict(self.active)

    def describe(self) -> dict:
        return {slot: {"active": self.active.get(slot), "replicas": len(group), "commits": self.commits.get(slot, 0),
                       "wanted": sorted({str(r["wants"]) for r in group.values()})}
                for slot, group in self.replicas.items()}  # fmt: skip


def serve_app() -> str | None:
    """The Serve application this code runs in (None outside a Serve replica: no barrier to join)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().app_name
    except RayServeException:
        return None


def actor_name(app: str) -> str:
    return f"{app}:version-barrier"


def barrier(app: str, interval_s: float):
    """The application's barrier actor, created by whichever replica asks first. It runs one call at a
    time (a report is read-decide-write); each call is microseconds, one per study and per report."""
    import ray

    return (ray.remote(VersionBarrier)
            .options(name=actor_name(app), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                     num_cpus=0, max_restarts=-1)
            .remote(interval_s))  # fmt: skip


def remove_all(named: list[dict], namespace: str = NAMESPACE) -> int:
    """Kill every application's barrier among `named` (ray.util.list_named_actors(all_namespaces=True));
    `serve down` calls it from a connected driver. Returns how many were removed."""
    import ray

    removed = 0
    for actor in named:
        if actor.get("namespace") == namespace and str(actor.get("name", "")).endswith(":version-barrier"):
            try:
                ray.kill(ray.get_actor(actor["name"], namespace=namespace))
                removed += 1
            except ValueError:  # gone meanwhile
                pass
    return removed


class BarrierMember:
    """A replica's side: report every slot's (ready, wants) each interval, apply the active values it gets back."""

    def __init__(self, app: str, interval_s: float, state: Callable[[], dict[str, tuple[list[str], str | None]]],
                 on_active: Callable[[str, str], None]):  # fmt: skip
        import ray

        self.app, self.interval_s = app, interval_s
        self._state, self._on_active = state, on_active
        self.replica = ray.get_runtime_context().get_actor_id() or f"driver-{id(self)}"
        self._actor = barrier(app, interval_s)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.reachable = True

    def report(self) -> dict[str, str | None] | None:
        """Report now; the active value per slot (None: the barrier is unreachable)."""
        import ray

        with self._lock:  # the poll thread and a just-finished load must not interleave their reports
            states = self._state()
            try:
                active = ray.get(self._actor.report.remote(self.replica, states), timeout=10)
            except Exception as exc:
                if self.reachable:
                    log.error("version barrier unreachable (%s); each replica swaps on its own", exc)
                self.reachable = False
                return None
            self.reachable = True
            for slot, value in active.items():
                if value is not None:
                    self._on_active(slot, str(value))
            return active

    def start(self) -> "BarrierMember":
        def run() -> None:
            while not self._stop.wait(self.interval_s):
                self.report()

        threading.Thread(target=run, name="version-barrier", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._actor.leave.remote(self.replica)
        except Exception:  # the cluster is going away too
            pass


def rollout_slot(task: str) -> str:
    return f"{task}/rollout"


class BarrierReader:
    """The gateway's side: the active versions, once per study (empty when no barrier answers)."""

    def __init__(self, app: str, interval_s: float):
        self.app, self.interval_s = app, interval_s
        self._actor = None
        self._warned = False

    async def versions(self) -> dict[str, str]:
        try:
            if self._actor is None:
                self._actor = barrier(self.app, self.interval_s)
            return await self._actor.versions.remote()
        except Exception as exc:  # no pin: each replica answers with its own champion (logged once)
            if not self._warned:
                log.error("version barrier unreachable (%s): studies are not pinned to one version per task", exc)
                self._warned = True
            self._actor = None
            return {}

    async def describe(self) -> dict:
        try:
            if self._actor is None:
                self._actor = barrier(self.app, self.interval_s)
            return await self._actor.describe.remote()
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
