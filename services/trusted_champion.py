"""Which champion a serving replica may load: the alias, checked against the platform's signed record.

An alias moved by anything but the platform API (a direct MLflow client, a second home's own platform)
has no record signed with the platform's key for that version: the replica refuses it, keeps serving
its version, logs it once, counts it in `oncoserve_untrusted_alias_total{task}` and reports it in
`describe()` (hence `serve status` and the console).
"""

from __future__ import annotations

import logging
import time

from oncoserve.signing import UntrustedRecord, Verifier
from serving.promotion_ledger import ChampionTrust
from services import metrics

log = logging.getLogger("ray.serve")


class TrustedChampion:
    def __init__(self, settings, task: str, registry, store):
        self.task, self.registry = task, registry
        self.trust = ChampionTrust(store, settings.bucket_models, Verifier.from_file(settings.signing_public_key_file), task)
        self.seq = 0
        self.refused: dict | None = None

    def initial(self) -> dict | None:
        """The signed record to start with (None: nothing was ever promoted); the alias must agree."""
        try:
            record = self.trust.signed_champion()
        except UntrustedRecord:
            if self.registry.alias(self.task, "champion") is None:
                return None  # nothing promoted, nothing moved: the caller decides what "no champion" means
            raise
        alias = self.registry.alias(self.task, "champion")
        if str(alias) != str(record["version"]):
            self.refuse(alias, f"champion alias points at v{alias} but the signed record names v{record['version']}")
        self.seq = int(record["seq"])
        return record

    def admit(self, version: str) -> dict | None:
        """The signed record for `version` if the replica may load it, else None (refused and counted)."""
        decision = self.trust.decide(version, self.seq)
        if decision.trusted:
            self.refused = None
            self.seq = int(decision.record["seq"])
            return decision.record
        self.refuse(version, decision.reason)
        return None

    def settled(self, alias: str | None, serving: str) -> None:
        """The alias points at the version served again: a refused move was undone."""
        if self.refused is not None and str(alias) == str(serving):
            log.warning("%s: champion alias back on the served v%s", self.task, serving)
            self.refused = None

    def refuse(self, version, reason: str) -> None:
        if self.refused is None or self.refused["version"] != str(version):
            metrics.UNTRUSTED_ALIAS.labels(self.task).inc()
            log.error("%s: refusing champion v%s: %s", self.task, version, reason)
        self.refused = {"version": str(version), "reason": reason, "since": time.time()}
