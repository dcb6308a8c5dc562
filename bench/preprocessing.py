"""Preprocessing v2 per study on this machine: each step timed, fast path beside raw path.

The fast path is a BraTS-style phantom (skull-stripped, zero background, one grid); the raw path is
the same case as `imaging.raw_phantoms` writes it (head, pose, motion, bias, noise, thick slices), at
2 mm. Also: SimpleITK's resampler vs the scipy path it replaced, and the label gather on the way back.
"""

from __future__ import annotations

import time

import numpy as np


def _steps(record: dict, prefix: str) -> list[dict]:
    from bench.timing import figure

    out, register = [], 0.0
    for step in record["steps"]:
        if step.get("skipped") or "seconds" not in step:  # (normalise is not timed on its own)
            continue
        if step["step"] == "register":
            register += step["seconds"]
            continue
        out.append(figure(f"PP_{prefix}_{step['step']}_s", step["seconds"], "s"))
    out.append(figure(f"PP_{prefix}_register_all_s", register, "s"))
    return out


def bench_preprocessing(seed: int = 5, index: int = 0) -> list[dict]:
    import nibabel as nib
    from nibabel.processing import resample_from_to

    from bench.timing import figure
    from imaging.phantoms import make_case
    from imaging.preprocess import labels_to_source, preprocess
    from imaging.raw_phantoms import make_raw_case
    from imaging.sitk_bridge import resample

    figures = []
    twin, _ = make_case(seed, index)
    preprocess(twin)  # warm caches (anatomy, imports)
    t0 = time.perf_counter()
    fast = preprocess(twin)
    figures.append(figure("PP_fast_total_s", time.perf_counter() - t0, "s"))
    figures += _steps(fast.record, "fast")
    raw, _, _ = make_raw_case(seed, index)
    t0 = time.perf_counter()
    prepared = preprocess(raw)
    figures.append(figure("PP_raw_total_s", time.perf_counter() - t0, "s"))
    figures += _steps(prepared.record, "raw")

    # Resampling 4 volumes onto the model grid: SimpleITK vs nibabel/scipy (the v1 path).
    grid = prepared.grid
    t0 = time.perf_counter()
    for volume in twin.images.values():
        resample(volume, grid.shape, grid.affine, order=1)
    sitk_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for volume in twin.images.values():
        resample_from_to(nib.Nifti1Image(np.asarray(volume.data, np.float32), volume.affine), (grid.shape, grid.affine), order=1)
    scipy_s = time.perf_counter() - t0
    figures += [figure("PP_resample4_simpleitk_s", sitk_s, "s"), figure("PP_resample4_scipy_s", scipy_s, "s")]
    t0 = time.perf_counter()
    labels_to_source(prepared.segmentation, prepared)
    figures.append(figure("PP_inverse_labels_s", time.perf_counter() - t0, "s"))
    return figures


def _upload(study) -> dict:
    """A study as the multipart upload a client sends (NIfTI, gzip level 1)."""
    import gzip

    import nibabel as nib

    return {m: (f"{m}.nii.gz", gzip.compress(nib.Nifti1Image(np.asarray(v.data), v.affine).to_bytes(), compresslevel=1),
                "application/gzip") for m, v in study.images.items()}  # fmt: skip


def bench_served_paths(seed: int = 5, index: int = 0, runs: int = 5) -> list[dict]:
    """PP-served: /v1/segmentation:predict end to end for the BraTS-style twin (fast path) and the same case
    as a raw scanner study (raw path), timed alternately on one served stack, with the path each took."""
    import httpx

    from bench.timing import figure
    from bench.serving import interleaved_p50_ms, served_stack
    from imaging.phantoms import make_case
    from imaging.raw_phantoms import make_raw_case

    twin, _ = make_case(seed, index)
    raw, _, _ = make_raw_case(seed, index)
    uploads = {"fast": _upload(twin), "raw": _upload(raw)}
    with served_stack("osb-pp-", n=6) as (settings, _, _, _):
        url = f"{settings.serve_url}/v1/segmentation:predict"
        paths = {}

        def post(name):
            def call():
                response = httpx.post(url, files=uploads[name], timeout=600)
                response.raise_for_status()
                paths[name] = response.json()["preprocessing"]["path"]

            return call

        p50 = interleaved_p50_ms({name: post(name) for name in uploads}, runs=runs)
    if paths != {"fast": "fast", "raw": "raw"}:
        raise RuntimeError(f"the served studies took the wrong preprocessing paths: {paths}")
    return [figure("PP_served_fast_segmentation_e2e_p50", p50["fast"], "ms"),
            figure("PP_served_raw_segmentation_e2e_p50", p50["raw"], "ms"),
            figure("PP_served_raw_over_fast", p50["raw"] / p50["fast"], "ratio")]  # fmt: skip
