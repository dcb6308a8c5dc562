"""Promotion, rollback and compile: gates, roles, signatures and the audit log around every alias move.

This runs inside the platform API only (the one writer of the registry's aliases); the CLI and the
pipeline are its clients. The gates file is the server's, loaded once at start; its sha256 goes with
every decision. A champion move is ordered so that no state is ever unrecorded or half-trusted:

  1. audit intent (fsync'd)      a crash after this shows the action as `incomplete`
  2. signed record published     the ledger head in S3 names the new version (serving checks it)
  3. aliases moved in MLflow     `previous` <- old champion, `champion` <- version
  4. audit outcome               `completed` (or `failed`, with the ledger head put back)
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from oncoserve.audit import AuditLog
from oncoserve.auth import Identity, require
from oncoserve.signing import Signer, UntrustedRecord
from pipelines.gates import DEFAULT_GATES, GateResult, load_gates, run_gates
from serving import promotion_ledger as ledger
from serving.registry import Registry, RegistryError

TARGET_ROLE = {"candidate": "data-scientist", "champion": "platform"}
DECISION_TTL_S = 600.0


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
    gates_sha256: str = ""


class Promoter:
    def __init__(self, registry: Registry, audit: AuditLog, cache_dir: Path, gates_file: Path | None = None,
                 signer: Signer | None = None, store=None, models_bucket: str = "", triton_prefix: str = "triton"):  # fmt: skip
        self.registry, self.audit, self.cache_dir = registry, audit, cache_dir
        path = Path(gates_file or DEFAULT_GATES)
        self.gates = load_gates(path)
        self.gates_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self.gates_file = path
        self.signer, self.store, self.bucket, self.prefix = signer, store, models_bucket, triton_prefix
        self._lock = threading.Lock()  # one alias move at a time per platform process
        # Gate results by (task, version, champion, data): the pipeline's gate, compile and promote steps
        # ask for the same decision within minutes; the second and third reuse it. The gates file is fixed
        # for the process, uploaded data is content-addressed, and a champion move changes the key.
        self._decisions: dict[tuple, tuple[float, list[GateResult]]] = {}

    # -- what serving trusts --------------------------------------------------------------------------
    def signed_champion(self, task: str) -> str | None:
        """The champion the platform signed last (None: never promoted)."""
        head = ledger.head(self.store, self.bucket, task) if self.store is not None else None
        return str(head["record"]["version"]) if head else None

    def artifact_digests(self, task: str, version: str) -> dict[str, str]:
        """What serving will verify before loading `version`, checked against the bytes now."""
        from serving.artifacts import TamperedArtifact, expected_digests, fetch_verified

        info = self.registry.version(task, version)
        if task == "reporting":
            from services.reporting import model as reporting_model

            recorded = info.tags.get(reporting_model.DIGEST_TAG)
            if not recorded:
                raise ValueError(f"reporting v{version} has no recorded sha256; register it again")
            digests = json.loads(recorded)
            reporting_model.download_verified(self.registry, version, self.cache_dir / "verify" / f"reporting-{version}-{time.time_ns()}", digests)
            return digests
        try:
            digests = expected_digests(self.registry, task, version)
        except TamperedArtifact as exc:
            raise ValueError(f"{exc}; a champion must be compiled first") from None
        fetch_verified(self.store, self.bucket, self.prefix, f"{task}/{version}/model.onnx", digests)
        return digests

    def _sign(self, who: Identity, task: str, version: str, action: str, forced: bool, intent_id: str) -> dict:
        record = {"task": task, "alias": "champion", "version": str(version), "action": action,
                  "artifact_sha256": self.artifact_digests(task, version), "gates_sha256": self.gates_sha256,
                  "gates_version": self.gates["version"], "actor": who.name, "role": who.role, "forced": forced,
                  "time": time.time(), "seq": ledger.next_seq(self.store, self.bucket, task), "audit_action_id": intent_id}  # fmt: skip
        return self.signer.sign(record)

    # -- gates ----------------------------------------------------------------------------------------
    def check(self, task: str, version: str, eval_data: Path | None = None,
              regression_data: list[Path] | None = None) -> list[GateResult]:  # fmt: skip
        champion = self.signed_champion(task) if self.store is not None else ...
        shadow = None
        if "shadow" in self.gates.get(task, {}) and self.store is not None:
            from serving.rollout_ledger import shadow_evidence

            shadow = shadow_evidence(self.store, self.bucket, task, version)
        # (more shadow evidence since the last decision is a different decision)
        key = (task, str(version), str(champion), str(eval_data), tuple(str(p) for p in regression_data or ()), len(shadow or ()))
        cached = self._decisions.get(key)
        if cached and time.monotonic() - cached[0] < DECISION_TTL_S:
            return cached[1]
        gates = run_gates(self.registry, self.registry.version(task, version), self.gates, eval_data, self.cache_dir,
                          champion, regression_data, shadow)  # fmt: skip
        self._decisions = {k: v for k, v in self._decisions.items() if time.monotonic() - v[0] < DECISION_TTL_S}
        self._decisions[key] = (time.monotonic(), gates)
        return gates

    def gate(self, who: Identity | None, task: str, version: str, eval_data: Path | None = None,
             eval_source: str | None = None, regression_data: list[Path] | None = None,
             regression_source: list[str] | None = None) -> list[GateResult]:  # fmt: skip
        """Run the server's gates on a version and record the decision (the pipeline's gate step)."""
        require(who, "data-scientist", "running the gates")
        gates = self.check(task, version, eval_data, regression_data)
        self.audit.event(who.name, who.role, "gates", task=task, version=version, passed=all(g.passed for g in gates),
                         gates=[g.to_json() for g in gates], gates_version=self.gates["version"],
                         gates_sha256=self.gates_sha256, eval_data=eval_source, regression_data=regression_source)  # fmt: skip
        return gates

    # -- promote / rollback ---------------------------------------------------------------------------
    def promote(self, who: Identity | None, task: str, version: str, to: str, reason: str | None = None,
                force: bool = False, eval_data: Path | None = None, eval_source: str | None = None,
                regression_data: list[Path] | None = None, regression_source: list[str] | None = None) -> PromotionResult:  # fmt: skip
        if to not in TARGET_ROLE:
            raise ValueError(f"--to must be candidate or champion, not {to!r}")
        require(who, TARGET_ROLE[to], f"promoting to {to}")
        if force:
            require(who, "admin", "a forced promotion")
            if not reason or not reason.strip():
                raise ValueError("a forced promotion needs --reason")
        self.registry.version(task, version)  # RegistryError if absent
        gates = self.check(task, version, eval_data, regression_data)
        passed = all(g.passed for g in gates)
        with self._lock:
            holder = self.registry.alias(task, to)
            action_id = self.audit.begin(
                who.name, who.role, "promote", task=task, version=version, to=to, from_version=holder,
                reason=reason, forced=force and not passed, gates=[g.to_json() for g in gates],
                gates_version=self.gates["version"], gates_sha256=self.gates_sha256, eval_data=eval_source,
                regression_data=regression_source,
            )  # fmt: skip
            if not passed and not force:
                self.audit.finish(action_id, "refused")
                raise PromotionRefused(task, version, to, gates)
            if to == "champion":
                holder = self.signed_champion(task) or holder  # the trusted holder becomes `previous`
                self._move_champion(who, task, version, holder, "promote", force and not passed, action_id)
            else:
                try:
                    self.registry.set_alias(task, to, version)
                except Exception as exc:
                    self.audit.finish(action_id, "failed", error=str(exc)[:300])
                    raise
                self.audit.finish(action_id, "completed")
        return PromotionResult(task, version, to, holder, force and not passed, gates, action_id, self.gates_sha256)

    def _move_champion(self, who: Identity, task: str, version: str, holder: str | None, action: str, forced: bool,
                       action_id: str, drop_previous: bool = False) -> None:  # fmt: skip
        old_head = ledger.head(self.store, self.bucket, task)
        try:
            signed = self._sign(who, task, version, action, forced, action_id)
            ledger.publish(self.store, self.bucket, signed)
        except Exception as exc:
            self.audit.finish(action_id, "failed", error=f"signing/publishing the record: {str(exc)[:300]}")
            raise
        try:
            if not drop_previous and holder is not None and holder != version:
                self.registry.set_alias(task, "previous", holder)
            self.registry.set_alias(task, "champion", version)
        except Exception as exc:
            try:
                ledger.restore_head(self.store, self.bucket, task, old_head)
            finally:
                self.audit.finish(action_id, "failed", error=str(exc)[:300])
            raise
        warning = None
        if drop_previous:
            try:
                self.registry.delete_alias(task, "previous")
            except Exception as exc:  # the champion moved: the action completed, say what was left behind
                warning = f"champion moved, but `previous` could not be removed: {str(exc)[:200]}"
        extra = {"warning": warning} if warning else {}
        self.audit.finish(action_id, "completed", signed_record=signed["record"]["seq"], **extra)

    def rollback(self, who: Identity | None, task: str, reason: str | None = None) -> tuple[str, str]:
        """champion <- previous; returns (from, to)."""
        require(who, "platform", "rollback")
        with self._lock:
            previous = self.registry.alias(task, "previous")
            current = self.signed_champion(task) or self.registry.alias(task, "champion")
            if previous is None:
                raise RegistryError(f"{task} has no `previous` version to roll back to")
            action_id = self.audit.begin(who.name, who.role, "rollback", task=task, version=previous,
                                         to="champion", from_version=current, reason=reason,
                                         gates_sha256=self.gates_sha256)  # fmt: skip
            self._move_champion(who, task, previous, current, "rollback", False, action_id, drop_previous=True)
        return current, previous

    # -- compile --------------------------------------------------------------------------------------
    def compile(self, who: Identity | None, task: str, version: str, options, force: bool = False, reason: str | None = None):
        """Compile into the Triton repository, only a version that passes the server's gates (or forced)."""
        from serving.compile import compile_version

        require(who, "data-scientist", "compiling")
        if force:
            require(who, "admin", "a forced compile")
            if not reason or not reason.strip():
                raise ValueError("a forced compile needs --reason")
        gates = self.check(task, version)
        passed = all(g.passed for g in gates)
        action_id = self.audit.begin(who.name, who.role, "compile", task=task, version=version, reason=reason,
                                     forced=force and not passed, gates=[g.to_json() for g in gates],
                                     gates_version=self.gates["version"], gates_sha256=self.gates_sha256)  # fmt: skip
        if not passed and not force:
            self.audit.finish(action_id, "refused")
            raise PromotionRefused(task, version, "compile", gates)
        try:
            result = compile_version(self.registry, self.store, self.bucket, self.prefix, task, version, options)
        except Exception as exc:
            self.audit.finish(action_id, "failed", error=str(exc)[:300])
            raise
        self.audit.finish(action_id, "completed", artifact_sha256=result.files)
        return result, gates

    # -- watching for moves the platform did not make -------------------------------------------------
    def reconcile(self, tasks, seen: dict[str, str]) -> list[dict]:
        """Audit every champion alias that differs from the signed record (once per version seen)."""
        found = []
        for task in tasks:
            try:
                signed = self.signed_champion(task)
                alias = self.registry.alias(task, "champion")
            except (RegistryError, UntrustedRecord, OSError, ValueError):
                continue
            if alias is None or alias == signed:
                seen.pop(task, None)
                continue
            if seen.get(task) == alias:
                continue
            seen[task] = alias
            detail = {"task": task, "version": alias, "signed_version": signed}
            self.audit.event("unknown (direct registry write)", "none", "untrusted_alias", to="champion", **detail,
                             detail="champion alias moved outside the platform API; serving keeps the signed version")  # fmt: skip
            found.append(detail)
        return found
