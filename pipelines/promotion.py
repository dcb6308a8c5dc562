"""Promotion and rollback: gates, roles and the audit log around every alias move.

The audit intent is written (fsync'd) before an alias moves and the outcome after, so a crash between
the two leaves an `incomplete` record, never an unrecorded move.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from oncoserve.audit import AuditLog
from oncoserve.auth import Identity, require
from pipelines.gates import GateResult, load_gates, run_gates
from serving.registry import Registry, RegistryError

TARGET_ROLE = {"candidate": "data-scientist", "champion": "platform"}


class PromotionRefused(RuntimeError):
    def __init__(self, task: str, version: str, to: str, gates: list[GateResult]):
        failed = [g for g in gates if not g.passed]
        lines = [f"{g.name}: {g.value} (needs {g.threshold})" for g in failed]
        super().__init__(f"{task} v{version} -> {to} refused by {len(failed)} gate(s): " + "; ".join(lines))
        self.gates = gates


@dataclass
class PromotionResult:
    task: str
    version: str
    to: str
    previous_holder: str | None
    forced: bool
    gates: list[GateResult]
    action_id: str


class Promoter:
    def __init__(self, registry: Registry, audit: AuditLog, cache_dir: Path, gates_file: Path | None = None):
        self.registry = registry
        self.audit = audit
        self.cache_dir = cache_dir
        self.gates = load_gates(gates_file)

    def check(self, task: str, version: str, eval_data: Path | None = None) -> list[GateResult]:
        return run_gates(self.registry, self.registry.version(task, version), self.gates, eval_data, self.cache_dir)

    def promote(self, who: Identity | None, task: str, version: str, to: str, reason: str | None = None,
                force: bool = False, eval_data: Path | None = None, gates: list[GateResult] | None = None) -> PromotionResult:  # fmt: skip
        """`gates`: results the caller has just computed for this version (the pipeline's gate step)."""
        if to not in TARGET_ROLE:
            raise ValueError(f"--to must be candidate or champion, not {to!r}")
        require(who, TARGET_ROLE[to], f"promoting to {to}")
        if force:
            require(who, "admin", "a forced promotion")
            if not reason or not reason.strip():
                raise ValueError("a forced promotion needs --reason")
        info = self.registry.version(task, version)  # RegistryError if absent
        if gates is None:
            gates = run_gates(self.registry, info, self.gates, eval_data, self.cache_dir)
        passed = all(g.passed for g in gates)
        holder = self.registry.alias(task, to)
        action_id = self.audit.begin(
            who.name, who.role, "promote", task=task, version=version, to=to, from_version=holder,
            reason=reason, forced=force and not passed, gates=[g.to_json() for g in gates],
            gates_version=self.gates["version"],
        )  # fmt: skip
        if not passed and not force:
            self.audit.finish(action_id, "refused")
            raise PromotionRefused(task, version, to, gates)
        try:
            if to == "champion" and holder is not None and holder != version:
                self.registry.set_alias(task, "previous", holder)
            self.registry.set_alias(task, to, version)
        except Exception as exc:
            self.audit.finish(action_id, "failed", error=str(exc)[:300])
            raise
        self.audit.finish(action_id, "completed")
        return PromotionResult(task, version, to, holder, force and not passed, gates, action_id)

    def rollback(self, who: Identity | None, task: str, reason: str | None = None) -> tuple[str, str]:
        """champion <- previous; returns (from, to)."""
        require(who, "platform", "rollback")
        previous = self.registry.alias(task, "previous")
        current = self.registry.alias(task, "champion")
        if previous is None:
            raise RegistryError(f"{task} has no `previous` version to roll back to")
        action_id = self.audit.begin(who.name, who.role, "rollback", task=task, version=previous,
                                     to="champion", from_version=current, reason=reason)  # fmt: skip
        try:
            self.registry.set_alias(task, "champion", previous)
            self.registry.delete_alias(task, "previous")
        except Exception as exc:
            self.audit.finish(action_id, "failed", error=str(exc)[:300])
            raise
        self.audit.finish(action_id, "completed")
        return current, previous
