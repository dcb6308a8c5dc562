"""The deterministic report composer (the default generator, always available).

Writes every section from the facts and cites knowledge-base passages by id; it states nothing that is
not in the findings or in a cited passage, which the grounding guard checks like any generated text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.reporting.facts import Facts

SECTIONS = ("Findings", "Layered diagnosis", "Prognosis", "Suggested next steps", "Limitations")
DISCLAIMER = ("These findings are guidelines only, produced by research models; treatment plans are for the "
              "treating team to decide.")  # fmt: skip
MARKER_NAMES = {"grade": "Grade group", "idh": "IDH", "codeletion_1p19q": "1p/19q", "mgmt": "MGMT promoter"}
LABEL_WORDS = {"LGG": "lower grade", "HGG": "high grade", "wildtype": "wildtype", "mutant": "mutant",
               "intact": "intact", "codeleted": "codeleted", "unmethylated": "unmethylated",
               "methylated": "methylated"}  # fmt: skip


@dataclass
class Section:
    title: str
    text: str
    citations: list[str] = field(default_factory=list)


def _findings(f: Facts) -> Section:
    v = f.volumes
    if not f.found:
        where = "No tumour was localized."
    elif f.hemisphere in ("left", "right"):
        where = f"The lesion is centred in the {f.hemisphere} hemisphere."
    else:
        where = "The lesion is centred near the midline."
    if f.implausible_volumes:
        # services.plausibility: the figures cannot be true for this study, so they are not written as findings.
        parts = [where, "The segmentation is implausible for this study (a tumour too large for its brain mask, or far "
                        "outside the volumes the model was trained on); its volumes are not reported as measurements."]  # fmt: skip
    else:
        parts = [where,
                 f"Segmented volumes: necrotic core {v['NCR']:.1f} mL, edema {v['ED']:.1f} mL, enhancing tumour "
                 f"{v['ET']:.1f} mL; tumour core {v['TC']:.1f} mL, whole tumour {v['WT']:.1f} mL."]  # fmt: skip
    if f.enhancement_pct is not None and not f.implausible_volumes:
        parts.append(f"Enhancement proportion (enhancing tumour / tumour core): {f.enhancement_pct:.0f}%.")
    parts.append("Missing sequences: " + (", ".join(m.upper() for m in f.missing) if f.missing else "none") + ".")
    if f.ood_flag:
        parts.append("Quality: the study is flagged as unlike the training data; the outputs below should not be relied on.")
    return Section("Findings", " ".join(parts), ["imaging#1", "imaging#4"])


def _diagnosis(f: Facts) -> Section:
    d = f.diagnosis
    lines = [f"Integrated diagnosis: {d.integrated}.", f"Histology (predicted): {d.histology}.", f"Grade: {d.grade}."]
    if f.uninformative_markers:
        lines.append("The classifier's probabilities are uninformative for this study (every marker near even odds); "
                     "no marker is called from them.")  # fmt: skip
    for name in ("grade", "idh", "codeletion_1p19q", "mgmt"):
        m = f.markers[name]
        lines.append(f"{MARKER_NAMES[name]}: {LABEL_WORDS.get(m.label, m.label)}, probability {m.probability * 100:.0f}%, "
                     f"uncertainty {m.uncertainty:.2f}{'' if m.determinate else ' (indeterminate)'}.")  # fmt: skip
    return Section("Layered diagnosis", " ".join(lines), ["who-cns5#1", "who-cns5#5", "markers#4"])


def _prognosis(f: Facts) -> Section:
    text = f"Model risk group: {f.risk_group} (risk score {f.risk_score:.2f})."
    if f.median_days is not None:
        text += f" Median survival read from the model's curve: {f.median_days:.0f} days ({f.median_months:.1f} months)."
    else:
        text += " The model's survival curve does not reach its median within its follow-up."
    return Section("Prognosis", text + " This is a population estimate from a model, not a prediction for this patient.",
                   ["prognosis#4"])  # fmt: skip


def _next_steps(f: Facts) -> Section:
    steps = ["Discussion at a multidisciplinary neuro-oncology tumour board.",
             "Tissue diagnosis by resection or biopsy with molecular testing for the integrated diagnosis, "
             "including MGMT promoter methylation.",
             "Early postoperative MRI to document the extent of resection."]  # fmt: skip
    if f.missing:
        steps.insert(0, "Acquire the missing sequences if possible and repeat the analysis.")
    return Section("Suggested next steps", " ".join(steps), ["next-steps#1", "next-steps#2", "next-steps#3"])


def _limitations(f: Facts) -> Section:
    text = ("Research models trained on synthetic phantoms; not validated on patients. Marker predictions are "
            "probabilities, not molecular test results. The models cannot tell glioma from other lesions.")  # fmt: skip
    return Section("Limitations", text, ["limitations#1", "limitations#3", "markers#4"])


def compose(facts: Facts) -> list[Section]:
    return [_findings(facts), _diagnosis(facts), _prognosis(facts), _next_steps(facts), _limitations(facts)]


def to_markdown(case_id: str, sections: list[Section], references: dict[str, str]) -> str:
    out = [f"# Neuro-oncology MRI report: {case_id}", ""]
    for s in sections:
        cites = " ".join(f"[{c}]" for c in s.citations)
        out += [f"## {s.title}", "", s.text + (f" {cites}" if cites else ""), ""]
    out += [f"_{DISCLAIMER}_", ""]
    if references:
        out += ["## References", ""] + reference_lines(references) + [""]
    return "\n".join(out)


def reference_lines(references: dict[str, str]) -> list[str]:
    return [f"- [{pid}] {text}" for pid, text in references.items()]
