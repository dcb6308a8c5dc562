"""The platform's request work as plain function calls in one process: the baseline the served paths
are measured against."""

from __future__ import annotations

import base64


def segmentation_steps(backend, raw: dict[str, bytes], extras: dict):
    """The work of /v1/segmentation:predict as plain function calls: decode, preprocess, infer (the
    version's sliding window), postprocess, encode the mask as the gateway does (NIfTI, gzip level 1,
    base64)."""
    from imaging.preprocess import preprocess
    from services.study_analysis import mask_nifti_gz
    from services.study_input import from_nifti
    from services.task_logic import feeds, infer, postprocess

    def whole():
        p = preprocess(from_nifti(raw, "bench", None).study)
        result = postprocess("segmentation", infer("segmentation", backend.infer, feeds("segmentation", p, None), extras), p, extras)
        base64.b64encode(mask_nifti_gz(result["mask"]))

    return whole
