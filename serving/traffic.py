"""A task's traffic policy: which version answers a study, and which studies a candidate shadows.

  champion  the champion answers every study (the default, and what `--off` returns to)
  shadow    the champion answers; the candidate also analyses a share of the studies (`share` = the
            sample) and its answers are recorded as agreement evidence, never returned
  canary    a share of the studies (`share` = the weight) is answered by the candidate

A study's place in [0, 1) is a fixed function of its case id, so the same study always goes to the
same version on every replica and after restarts, and raising a canary's weight only adds studies to
the candidate (a study already on it stays there).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

MODES = ("champion", "shadow", "canary")
# What withdraws a canary automatically unless the policy names its own limits (the platform API checks
# them on the recorded evidence; serving falls back to the champion for a study the candidate failed).
DEFAULT_LIMITS = {"min_studies": 5, "max_error_rate": 0.1, "max_p95_ms": None, "min_agreement": None}


def study_fraction(case_id: str) -> float:
    """The study's place in [0, 1): uniform over case ids, the same for the same id everywhere."""
    digest = hashlib.sha256(b"oncoserve-traffic:" + case_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True)
class TrafficPolicy:
    task: str
    mode: str = "champion"
    version: str | None = None  # the candidate (shadow or canary)
    share: float = 0.0  # shadow: the sampled share; canary: the weight
    seq: int = 0  # the signed record's sequence number (0: none was ever published)
    limits: dict = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: dict) -> "TrafficPolicy":
        mode = record.get("mode")
        if mode not in MODES:
            raise ValueError(f"traffic policy mode {mode!r}: expected one of {', '.join(MODES)}")
        share = float(record.get("share") or 0.0)
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"traffic policy share {share}: expected 0..1")
        return cls(record["task"], mode, record.get("version"), share, int(record["seq"]), dict(record.get("limits") or {}))

    def candidate_answers(self, fraction: float | None) -> bool:
        """Whether the candidate (not the champion) answers the study at `fraction`."""
        return self.mode == "canary" and fraction is not None and fraction < self.share

    def shadows(self, fraction: float | None) -> bool:
        """Whether the candidate also analyses the study at `fraction` (its answer only recorded)."""
        return self.mode == "shadow" and fraction is not None and fraction < self.share

    def describe(self) -> dict:
        return {"mode": self.mode, "version": self.version, "share": self.share, "seq": self.seq}
