"""The grounding guard: every checkable claim in a report's text must be backed by the findings.

Extracted and checked: volumes (mL), percentages, durations (days, months, years), probabilities,
laterality, anatomical regions (the findings name none), marker statuses (IDH, 1p/19q, MGMT),
tumour types, and grades. Anything absent from the findings or contradicting them is a problem; so is
a missing required section (format compliance). Durations may also come from the cited
knowledge-base passages (published prognosis figures).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from services.reporting.facts import Facts
from services.reporting.template import DISCLAIMER, SECTIONS

NUM = r"(\d+(?:\.\d+)?)"
VOLUME = re.compile(NUM + r"\s*(?:mL|ml|cc|cm3|cm³)\b")
PERCENT = re.compile(NUM + r"\s*(?:%|percent\b)")
DURATION = re.compile(NUM + r"\s*(days?|months?|years?)\b", re.IGNORECASE)
PROBABILITY = re.compile(r"\bp\s*=\s*(0?\.\d+|1\.0+|0|1)\b")
GRADE = re.compile(r"\bgrade\s*(\d|I{1,3}V?|IV)\b", re.IGNORECASE)
SIDE = re.compile(r"\b(left|right|bilateral|midline)\b", re.IGNORECASE)
REGION = re.compile(r"\b(frontal|temporal|parietal|occipital|insular?|thalam\w*|cerebell\w*|brainstem|brain stem|"
                    r"corpus callosum|basal ganglia|periventricular)\b", re.IGNORECASE)  # fmt: skip
IDH = re.compile(r"\bIDH[\s-]*(?:1/2[\s-]*)?(mutant|mutated|mutation|wild[\s-]*type)\b", re.IGNORECASE)
CODEL = re.compile(r"\b(non[\s-]*codeleted|codeleted|codeletion|intact)\b", re.IGNORECASE)
MGMT = re.compile(r"\b(unmethylated|methylated)\b", re.IGNORECASE)
TYPES = re.compile(r"\b(glioblastoma|astrocytoma|oligodendroglioma)s?\b", re.IGNORECASE)
ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4}


@dataclass
class GuardResult:
    passed: bool
    problems: list[str] = field(default_factory=list)
    format_ok: bool = True

    def to_json(self) -> dict:
        return {"passed": self.passed, "format_ok": self.format_ok, "problems": self.problems}


def _close(value: float, allowed: set[float], tolerance: float) -> bool:
    return any(abs(value - a) <= tolerance for a in allowed)


def check(text: str, facts: Facts, cited_passages: list[str] = (), reference_lines: list[str] = (),
          require_format: bool = True) -> GuardResult:  # fmt: skip
    """Problems with `text` (a whole report) given the facts. Only the exact bibliography lines the
    composer wrote are exempt (titles of sources name tumour types); any other text is checked."""
    exempt = {line.strip() for line in reference_lines}
    full = text
    text = "\n".join(line for line in text.splitlines() if line.strip() not in exempt)
    problems: list[str] = []
    numbers = facts.numbers()
    volumes = {round(v, 1) for v in facts.volumes.values()}
    kb_numbers = {float(n) for passage in cited_passages for n in re.findall(NUM, passage)}

    for m in VOLUME.finditer(text):
        if not _close(float(m.group(1)), volumes, 0.051):
            problems.append(f"volume {m.group(0)!r} is not in the findings")
    for m in PERCENT.finditer(text):
        if not _close(float(m.group(1)), numbers, 0.51):
            problems.append(f"percentage {m.group(0)!r} is not in the findings")
    for m in DURATION.finditer(text):
        if not _close(float(m.group(1)), numbers | kb_numbers, 0.051):
            problems.append(f"duration {m.group(0)!r} is neither in the findings nor in a cited source")
    for m in PROBABILITY.finditer(text):
        allowed = {round(mk.probability, 2) for mk in facts.markers.values()}
        if not _close(float(m.group(1)), allowed, 0.006):
            problems.append(f"probability {m.group(0)!r} is not in the findings")
    for m in GRADE.finditer(text):
        raw = m.group(1).upper()
        number = int(raw) if raw.isdigit() else ROMAN.get(raw)
        if number not in facts.grade_numbers:
            problems.append(f"{m.group(0)!r} contradicts the predicted grade ({facts.diagnosis.grade})")
    for m in SIDE.finditer(text):
        side = m.group(1).lower()
        if side != facts.hemisphere:
            problems.append(f"laterality {m.group(0)!r} contradicts the findings ({facts.hemisphere or 'none'})")
    for m in REGION.finditer(text):
        problems.append(f"region {m.group(0)!r} is not in the findings (no anatomical region is predicted)")
    idh = facts.markers["idh"].label
    for m in IDH.finditer(text):
        said = "wildtype" if "wild" in m.group(1).lower() else "mutant"
        if said != idh:
            problems.append(f"{m.group(0)!r} contradicts the predicted IDH status ({idh})")
    codel = facts.markers["codeletion_1p19q"].label
    for m in CODEL.finditer(text):
        word = m.group(1).lower().replace(" ", "").replace("-", "")
        said = "intact" if word in ("intact", "noncodeleted") else "codeleted"
        if said != codel:
            problems.append(f"{m.group(0)!r} contradicts the predicted 1p/19q status ({codel})")
    mgmt = facts.markers["mgmt"].label
    for m in MGMT.finditer(text):
        if m.group(1).lower() != mgmt:
            problems.append(f"{m.group(0)!r} contradicts the predicted MGMT status ({mgmt})")
    for m in TYPES.finditer(text):
        if m.group(1).lower() not in facts.diagnosis.integrated.lower():
            problems.append(f"tumour type {m.group(0)!r} contradicts the integrated diagnosis ({facts.diagnosis.integrated})")

    format_ok = True
    if require_format:
        missing = [s for s in SECTIONS if not re.search(rf"^#+\s*{re.escape(s)}\s*$", text, re.MULTILINE | re.IGNORECASE)]
        if missing:
            format_ok = False
            problems.append(f"required sections missing: {', '.join(missing)}")
        if DISCLAIMER.split(";")[0] not in full:
            format_ok = False
            problems.append("the closing statement (guidelines only; treatment is for the treating team) is missing")
    return GuardResult(not problems, problems, format_ok)
