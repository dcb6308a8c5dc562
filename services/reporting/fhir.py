"""The report as a FHIR R4 DiagnosticReport with contained Observations (fhir.resources, R4B models).

Observations: one per tumour sub-region volume (mL, UCUM), one per predicted marker (valueCodeableConcept
with the probability as a component), the survival risk group; the Markdown report is attached as
presentedForm. Validated by constructing the fhir.resources models (pydantic).
"""

from __future__ import annotations

import base64
import re
from datetime import datetime, timezone

from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from services.reporting.facts import Facts

LOINC_MR_BRAIN = {"system": "http://loinc.org", "code": "24590-2", "display": "MR Brain"}
OBS_CATEGORY = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}]}
LOCAL = "https://oncoserve.io/fhir/CodeSystem/findings"
REGIONS = {"NCR": "Necrotic tumour core volume", "ED": "Peritumoral edema volume", "ET": "Enhancing tumour volume",
           "TC": "Tumour core volume", "WT": "Whole tumour volume"}  # fmt: skip


def _fhir_id(raw: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", raw)


def _observation(oid: str, code: str, display: str, **value) -> dict:
    return {"resourceType": "Observation", "id": oid, "status": "preliminary", "category": [OBS_CATEGORY],
            "code": {"coding": [{"system": LOCAL, "code": code, "display": display}], "text": display},
            **value}  # fmt: skip


def build(facts: Facts, markdown: str, conclusion: str, issued: datetime | None = None) -> dict:
    observations = []
    for key, display in REGIONS.items():
        observations.append(_observation(f"vol-{key.lower()}", f"volume-{key}", display,
                                         valueQuantity={"value": round(facts.volumes[key], 1), "unit": "mL",
                                                        "system": "http://unitsofmeasure.org", "code": "mL"}))  # fmt: skip
    for name, marker in facts.markers.items():
        observations.append(_observation(
            _fhir_id(f"marker-{name}"), f"marker-{name}", f"Predicted {name}",
            valueCodeableConcept={"coding": [{"system": LOCAL, "code": marker.label}], "text": marker.label},
            component=[{"code": {"text": "probability"}, "valueQuantity": {"value": round(marker.probability, 4), "unit": "1"}},
                       {"code": {"text": "uncertainty (MC-dropout std)"}, "valueQuantity": {"value": round(marker.uncertainty, 4), "unit": "1"}}],
        ))  # fmt: skip
    observations.append(_observation("survival-risk", "survival-risk-group", "Survival risk group (model)",
                                     valueString=facts.risk_group))  # fmt: skip
    for obs in observations:  # contained: no subject of their own; the case id is the report's identifier
        Observation.model_validate(obs)
    report = {
        "resourceType": "DiagnosticReport",
        "id": _fhir_id(f"oncoserve-{facts.case_id}")[:64],
        "status": "preliminary",
        "identifier": [{"system": "https://oncoserve.io/case-id", "value": facts.case_id}],
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
        "code": {"coding": [LOINC_MR_BRAIN], "text": "MRI brain tumour analysis (research)"},
        "issued": (issued or datetime.now(timezone.utc)).isoformat(),
        "contained": observations,
        "result": [{"reference": f"#{o['id']}"} for o in observations],
        "conclusion": conclusion,
        "presentedForm": [{"contentType": "text/markdown", "language": "en",
                           "data": base64.b64encode(markdown.encode()).decode(), "title": "oncoserve report"}],
    }  # fmt: skip
    return DiagnosticReport.model_validate(report).model_dump(mode="json", exclude_none=True)
