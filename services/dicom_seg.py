"""The segmentation as a DICOM SEG object (highdicom), when the study came in as DICOM.

Frames follow the reference series' slices in volume order (imaging.dicom_series.sorted_slices):
mask voxel (x, y, z) is row y, column x of slice z, as series_to_volume built it. Labels map to
segments 1 NCR, 2 ED, 3 ET (BraTS labels 1, 2, 4).
"""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                "StudyDate", "StudyTime", "ReferringPhysicianName")
SEGMENTS = [  # (BraTS label, segment label, SNOMED property type)
    (1, "Necrotic tumour core (NCR)", codes.SCT.Necrosis),
    (2, "Peritumoral edema (ED)", codes.SCT.Edema),
    (4, "Enhancing tumour (ET)", codes.SCT.Neoplasm),
]


def build_dicom_seg(mask: np.ndarray, source_slices: list, model_version: str) -> bytes:
    """mask: labels on the reference series' grid (x = columns, y = rows, z = slices)."""
    frames = np.transpose(mask, (2, 1, 0))  # -> (slices, rows, columns)
    if frames.shape != (len(source_slices), source_slices[0].Rows, source_slices[0].Columns):
        raise ValueError(f"mask shape {mask.shape} does not match the reference series")
    for ds in source_slices:
        # De-identification emptied or removed these; the SEG's patient/study modules need them present (type 2).
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
    label_map = np.zeros(frames.shape, np.uint8)
    for number, (label, _, _) in enumerate(SEGMENTS, start=1):
        label_map[frames == label] = number
    algorithm = hd.AlgorithmIdentificationSequence(name="oncoserve segmentation", version=str(model_version),
                                                   family=codes.cid7162.ArtificialIntelligence)  # fmt: skip
    descriptions = [
        hd.seg.SegmentDescription(segment_number=n, segment_label=name,
                                  segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                                  segmented_property_type=code, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                  algorithm_identification=algorithm, anatomic_regions=[codes.SCT.Brain])  # fmt: skip
        for n, (_, name, code) in enumerate(SEGMENTS, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=source_slices, pixel_array=label_map, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=900,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="oncoserve",
        manufacturer_model_name="oncoserve segmentation", software_versions=str(model_version),
        device_serial_number="none", content_description="Glioma sub-regions (research use)",
    )  # fmt: skip
    buffer = io.BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()
