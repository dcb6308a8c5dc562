"""Which of t1, t1ce, t2, flair a DICOM series is, the way scanners actually name and tag them.

Rules on the series description and protocol name, vendor conventions included:
- ignored: localisers/scouts/surveys/calibrations, and sequences that are none of the four (DWI/ADC,
  SWI, perfusion, MIPs);
- FLAIR: `flair`, Siemens `dark-fluid` / `tirm` (T2 TIRM dark fluid); but `T1 FLAIR` (GE's T1-weighted
  FLAIR) is T1;
- T1ce: a T1 family name (t1, mprage, spgr/fspgr, bravo, tfe, vibe, mp2rage) with a contrast marker
  (`+c`, `c+`, `+km`/`km` (German Kontrastmittel), `post`, `gad`/`gd`, `contrast`, `ce`, `t1c`);
- T2: `t2` (not T2* / T2-star, which is susceptibility-weighted), Philips `T2W`, `tse` alone;
- T1: the T1 family without a contrast marker.
When the name says nothing, acquisition tags decide with a lower confidence: ContrastBolusAgent
present -> T1ce; inversion time >= 1500 ms with long TR -> FLAIR; TR >= 2000 ms and TE >= 70 ms -> T2;
TR <= 1000 ms and TE <= 30 ms -> T1. The name and the tags agreeing raise the confidence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IGNORED = re.compile(r"(locali[sz]er|\bscout|survey|3.?plane|\b3pl\b|\bloc\b|calibration|\bcal\b|asset cal|ref.?scan|"
                     r"\bdwi\b|diffusion|\badc\b|\btrace\b|\bswi\b|t2\*|t2 ?star|\bswan\b|perf|\bdsc\b|\bdce\b|\basl\b|\bmip\b|\bmpr\b)")  # fmt: skip
T1_FAMILY = re.compile(r"(\bt1|mprage|mp2rage|\bspgr|fspgr|bravo|\btfe\b|\bvibe|\bt1w)")
CONTRAST = re.compile(r"(\+ ?c\b|\bc ?\+|\+ ?km\b|\bkm\b|\+ ?gd\b|\bgd\b|\bgad|\bpost\b|contrast|\bce\b|\bt1c\b|\bt1ce\b|\+ ?ce\b)")
FLAIR = re.compile(r"(flair|dark.?fluid|\btirm\b)")
T2 = re.compile(r"(\bt2|\bt2w\b)")
TSE_ONLY = re.compile(r"\b(tse|fse)\b")


@dataclass(frozen=True)
class SeriesMapping:
    modality: str | None
    confidence: float
    reason: str

    def to_json(self) -> dict:
        return {"modality": self.modality, "confidence": self.confidence, "reason": self.reason}


def _normalise(text: str) -> str:
    return re.sub(r"[_\-./]+", " ", text.lower()).strip()


def from_name(name: str) -> SeriesMapping:
    d = _normalise(name)
    if not d:
        return SeriesMapping(None, 0.0, "no description")
    if IGNORED.search(d):
        return SeriesMapping(None, 0.9, "localiser or a sequence other than T1/T1ce/T2/FLAIR (ignored)")
    t1 = bool(T1_FAMILY.search(d))
    if FLAIR.search(d) and not t1:
        return SeriesMapping("flair", 0.95, "FLAIR / dark-fluid")
    if t1 and CONTRAST.search(d):
        return SeriesMapping("t1ce", 0.95, "T1-weighted with a contrast marker")
    if t1:
        return SeriesMapping("t1", 0.9, "T1-weighted" + (" (T1 FLAIR is T1-weighted)" if FLAIR.search(d) else ""))
    if T2.search(d):
        return SeriesMapping("t2", 0.9, "T2-weighted")
    if TSE_ONLY.search(d):
        return SeriesMapping("t2", 0.6, "a turbo/fast spin echo without a weighting (usually T2)")
    return SeriesMapping(None, 0.0, "no known modality in the name")


def _number(ds, key: str) -> float | None:
    try:
        value = ds.get(key) if ds is not None else None
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def from_tags(ds) -> SeriesMapping:
    if ds is None:
        return SeriesMapping(None, 0.0, "no tags")
    image_type = " ".join(str(v) for v in (ds.get("ImageType") or [])).lower()
    if "localizer" in image_type or "scout" in image_type:
        return SeriesMapping(None, 0.9, "ImageType says localiser (ignored)")
    tr, te, ti = _number(ds, "RepetitionTime"), _number(ds, "EchoTime"), _number(ds, "InversionTime")
    agent = str(ds.get("ContrastBolusAgent", "") or "").strip()
    if ti is not None and ti >= 1500 and (tr or 0) >= 4000:
        return SeriesMapping("flair", 0.7, f"inversion time {ti:g} ms, TR {tr:g} ms: fluid-attenuated")
    if tr is not None and te is not None and tr >= 2000 and te >= 70:
        return SeriesMapping("t2", 0.7, f"TR {tr:g} ms, TE {te:g} ms: T2-weighted")
    t1_like = (tr is not None and te is not None and tr <= 1000 and te <= 30) or (ti is not None and 600 <= ti <= 1300 and (te or 99) <= 10)
    if t1_like:
        if agent:
            return SeriesMapping("t1ce", 0.7, f"T1-weighted timing with ContrastBolusAgent {agent!r}")
        return SeriesMapping("t1", 0.6, "T1-weighted timing, no contrast agent recorded")
    return SeriesMapping(None, 0.0, "acquisition tags inconclusive")


def classify_series(description: str, ds=None) -> SeriesMapping:
    """The modality of one series, with a confidence in [0, 1] and the reason, for the output."""
    protocol = str(ds.get("ProtocolName", "") or "") if ds is not None else ""
    by_name = from_name(description)
    if by_name.modality is None and by_name.confidence == 0.0 and protocol:
        by_name = from_name(protocol)
    by_tags = from_tags(ds)
    if by_name.modality is None and by_name.confidence > 0:  # explicitly ignored by name
        return by_name
    if by_name.modality is None:
        return by_tags
    if by_tags.modality == by_name.modality:
        return SeriesMapping(by_name.modality, 0.99, f"{by_name.reason}; tags agree ({by_tags.reason})")
    if by_tags.modality is not None and by_tags.modality != by_name.modality:
        # Names are what sites curate; a tag rule can be fooled (a post-contrast T2, say).
        return SeriesMapping(by_name.modality, round(by_name.confidence - 0.25, 2),
                             f"{by_name.reason}; tags suggest {by_tags.modality} ({by_tags.reason}): check --mapping")  # fmt: skip
    return by_name
