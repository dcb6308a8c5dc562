"""The results a PACS receives besides the SEG (IHE AI Results): a DICOM SR measurement report (TID 1500,
highdicom) and an encapsulated PDF of the report for viewers that show neither SEG nor SR.

Both name the algorithm and the model versions, and say whether a clinician signed the results off: the SR
through its Verification Flag (VERIFIED with the reviewer as verifying observer, else UNVERIFIED) and both
in their titles. Their instance UIDs derive from the job id, so a re-sent object replaces itself in the PACS
instead of appearing twice.
"""

from __future__ import annotations

import datetime as dt
import io
import textwrap

import highdicom as hd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
SCHEME = "99ONCOSERVE"  # a private coding scheme for concepts no public code names (marker probabilities)
REGIONS = {"WT": "Whole tumour", "TC": "Tumour core", "ET": "Enhancing tumour"}
COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName", "StudyInstanceUID", "StudyDescription")  # fmt: skip


def uid_for(job_id: str, what: str) -> str:
    return generate_uid(entropy_srcs=["oncoserve-job", job_id, what])


def sign_off_line(review: dict | None) -> str:
    """How a result object states its review: the exact words a reader sees in its title."""
    if review and review.get("decision") == "accept" and not review.get("automatic"):
        return f"AI result accepted by {review['reviewer']}"
    return "UNVERIFIED AI result, research use, not reviewed"


def _versions(findings: dict) -> dict[str, str]:
    return {task: str(v) for task, v in (findings.get("model_versions") or {}).items()}


def _code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


def build_sr(job_id: str, findings: dict, evidence: list[Dataset], review: dict | None) -> Dataset:
    """TID 1500 measurement report: one group per region (volume in mL) and one per classification
    (the label as a qualitative evaluation, each class probability as a measurement)."""
    versions = _versions(findings)
    algorithm = lambda task: hd.sr.AlgorithmIdentification(name=f"oncoserve {task}", version=versions.get(task, "unknown"))  # noqa: E731
    groups = []
    volumes = findings["segmentation"]["volumes_ml"]
    for region, name in REGIONS.items():
        if region not in volumes:
            continue
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=uid_for(job_id, f"track-{region}"), identifier=f"{name} ({region})"),
            algorithm_id=algorithm("segmentation"), finding_type=codes.SCT.Neoplasm,
            measurements=[hd.sr.Measurement(name=codes.SCT.Volume, value=float(volumes[region]),
                                            unit=hd.sr.CodedConcept("ml", "UCUM", "milliliter"),
                                            algorithm_id=algorithm("segmentation"))]))  # fmt: skip
    for marker, result in (findings.get("classification") or {}).items():
        measurements = [hd.sr.Measurement(name=_code(f"P-{marker}-{label}", f"Probability of {marker} {label}"),
                                          value=float(p), unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
                                          algorithm_id=algorithm("classification"))
                        for label, p in result["probabilities"].items()]  # fmt: skip
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=uid_for(job_id, f"track-{marker}"), identifier=f"{marker} classification"),
            algorithm_id=algorithm("classification"), measurements=measurements,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=_code(marker, marker),
                                                                 value=_code(f"{marker}-{result['label']}", str(result["label"])))]))  # fmt: skip
    device = hd.sr.ObserverContext(observer_type=codes.DCM.Device, observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uid_for("device", "oncoserve"), name="oncoserve", manufacturer_name="oncoserve", model_name="oncoserve"))  # fmt: skip
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=device),
                                     procedure_reported=codes.LN.BrainMRI,
                                     imaging_measurements=groups)  # fmt: skip
    verified = bool(review and review.get("decision") == "accept" and not review.get("automatic"))
    for ds in evidence:  # the SR's patient and study modules need these present (type 2), if empty
        for keyword in COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=uid_for(job_id, "sr-series"), series_number=901,
        sop_instance_uid=uid_for(job_id, "sr"), instance_number=1, manufacturer="oncoserve", is_complete=True,
        is_verified=verified, verifying_observer_name=review["reviewer"] if verified else None,
        verifying_organization="oncoserve review" if verified else None,
    )  # fmt: skip
    sr.SeriesDescription = f"oncoserve measurements - {sign_off_line(review)}"[:64]
    sr.SoftwareVersions = [f"{t} v{v}" for t, v in sorted(versions.items())] or ["unknown"]  # one LO (64 chars) each
    return sr


def _pdf(findings: dict, report_markdown: str, review: dict | None) -> bytes:
    """One or more A4 pages of plain text (matplotlib's PDF backend: no extra dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_pdf import PdfPages
    from matplotlib.figure import Figure

    versions = ", ".join(f"{t} v{v}" for t, v in sorted(_versions(findings).items()))
    lines = [sign_off_line(review).upper(), f"Algorithm: oncoserve ({versions})", ""]
    for paragraph in (report_markdown or "(no report)").splitlines():
        lines += textwrap.wrap(paragraph, 95) or [""]
    buffer = io.BytesIO()
    with PdfPages(buffer) as pdf:
        for start in range(0, len(lines), 60):
            fig = Figure(figsize=(8.27, 11.69))
            fig.text(0.06, 0.96, "\n".join(lines[start:start + 60]), va="top", ha="left", family="monospace", fontsize=7.5)
            pdf.savefig(fig)
    return buffer.getvalue()


def build_pdf(job_id: str, findings: dict, report_markdown: str, reference: Dataset, review: dict | None) -> Dataset:
    """Encapsulated PDF Storage, filed in the reference image's patient and study."""
    now = dt.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ENCAPSULATED_PDF, uid_for(job_id, "pdf")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for keyword in COPIED:
        setattr(ds, keyword, reference.get(keyword, ""))
    ds.SOPClassUID, ds.SOPInstanceUID = ENCAPSULATED_PDF, uid_for(job_id, "pdf")
    ds.Modality, ds.ConversionType = "DOC", "SD"
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = uid_for(job_id, "pdf-series"), 902, 1
    ds.SeriesDescription = f"oncoserve report - {sign_off_line(review)}"[:64]
    ds.DocumentTitle = f"oncoserve glioma report ({sign_off_line(review)})"[:64]
    ds.Manufacturer, ds.SoftwareVersions = "oncoserve", [f"{t} v{v}" for t, v in sorted(_versions(findings).items())] or ["unknown"]
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"  # the patient's report is the content
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    data = _pdf(findings, report_markdown, review)
    ds.EncapsulatedDocument = data + (b"\0" if len(data) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(data)
    return ds


def mark_seg(seg: Dataset, review: dict | None) -> Dataset:
    """The gateway's SEG, titled with its review state (its content is unchanged)."""
    seg.SeriesDescription = f"oncoserve segmentation - {sign_off_line(review)}"[:64]
    return seg
