"""What the gateway does for the web UI (services/ui): display images of a study, demo studies, the
serving summary the console shows, and the security headers on every UI response."""

from __future__ import annotations

import base64
import gzip
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from imaging.dataset import check_case_id
from imaging.errors import StudyError
from imaging.ingest import NIFTI_NAME
from imaging.study import MODALITIES

UI_DIR = Path(__file__).with_name("ui")
UI_HEADERS: dict[str, str] = {}  # set by the gateway once it knows the platform API's address

# The UI loads nothing from elsewhere: scripts, styles and images from this origin only (blob:/data: for
# the downloads and canvases it makes itself); it may call the platform API named in its config.
def security_headers(platform_url: str) -> dict[str, str]:
    csp = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
           f"connect-src 'self' {platform_url}; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")  # fmt: skip
    return {"content-security-policy": csp, "x-content-type-options": "nosniff", "x-frame-options": "DENY",
            "referrer-policy": "no-referrer", "cross-origin-opener-policy": "same-origin"}  # fmt: skip


def preview_images(study, prepared=None) -> dict[str, str]:
    """Each present modality on the input's reference grid (the grid of the mask and box), through its
    registration transform when preprocessing registered it (so the viewer shows what the models saw),
    scaled to int16 0..1000 between its 0.5th and 99.5th percentiles, as gzipped NIfTI in base64."""
    import nibabel as nib

    from imaging.sitk_bridge import resample, rigid_from_ras

    ref = study.reference
    registered = {s["modality"]: s["transform_ras"] for s in (prepared.record.get("steps", []) if prepared else [])
                  if s.get("step") == "register" and "transform_ras" in s}  # fmt: skip
    out = {}
    for modality in study.present:
        vol = study.images[modality]
        data = np.asarray(vol.data, np.float32)
        if modality in registered:
            data = resample(vol, ref.shape, ref.affine, order=1, transform=rigid_from_ras(np.array(registered[modality])))
        elif vol.shape != ref.shape or not np.allclose(vol.affine, ref.affine, atol=1e-3):
            data = resample(vol, ref.shape, ref.affine, order=1)
        finite = data[np.isfinite(data)]
        lo, hi = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
        scaled = np.clip((np.nan_to_num(data) - lo) / max(hi - lo, 1e-6), 0, 1) * 1000
        img = nib.Nifti1Image(scaled.astype(np.int16), ref.affine)
        out[modality] = base64.b64encode(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)).decode()
    return out


def demo_cases(folder: Path | None) -> list[dict]:
    """Case folders of the demo dataset with the modalities each has."""
    if folder is None or not folder.is_dir():
        return []
    cases = []
    for case in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = {m.group(1).lower(): p.name for p in case.iterdir() if (m := NIFTI_NAME.search(p.name))}
        present = [m for m in MODALITIES if m in files]
        if present:
            cases.append({"case_id": case.name, "modalities": present})
    return cases


def demo_file(folder: Path | None, case_id: str, modality: str) -> Path | None:
    """The NIfTI of one modality of a demo case; None for anything else (no path leaves the folder)."""
    if folder is None or modality not in MODALITIES:
        return None
    try:
        check_case_id(case_id)
    except StudyError:
        return None
    case = folder / case_id
    if not case.is_dir():
        return None
    for path in case.iterdir():
        match = NIFTI_NAME.search(path.name)
        if match and match.group(1).lower() == modality and path.is_file():
            return path
    return None


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Histogram quantile as Prometheus computes it (linear within the bucket)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total, target = buckets[-1][1], q * buckets[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= target:
            if bound == float("inf"):
                return prev_bound
            width = count - prev_count
            return prev_bound + (bound - prev_bound) * ((target - prev_count) / width if width else 0.0)
        prev_bound, prev_count = bound, count
    return prev_bound if total else None


def request_summary(exposition: str) -> dict[str, dict]:
    """Per route: requests, error rate (5xx share) and p50/p99 latency from the gateway's metrics."""
    counts: dict[str, dict[str, float]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            route = sample.labels.get("route")
            if route is None:
                continue
            if sample.name == "oncoserve_requests_total":
                counts.setdefault(route, {})[sample.labels.get("status", "")] = sample.value
            elif sample.name == "oncoserve_request_seconds_bucket":
                buckets.setdefault(route, []).append((float(sample.labels["le"]), sample.value))
    out = {}
    for route in sorted(set(counts) | set(buckets)):
        by_status = counts.get(route, {})
        total = sum(by_status.values())
        errors = sum(v for k, v in by_status.items() if k.startswith("5"))
        b = sorted(buckets.get(route, []))
        p50, p99 = _quantile(b, 0.5), _quantile(b, 0.99)
        out[route] = {"requests": int(total), "client_errors": int(sum(v for k, v in by_status.items() if k.startswith("4"))),
                      "error_rate": errors / total if total else 0.0,
                      "p50_ms": round(p50 * 1000, 1) if p50 is not None else None,
                      "p99_ms": round(p99 * 1000, 1) if p99 is not None else None}  # fmt: skip
    return out
