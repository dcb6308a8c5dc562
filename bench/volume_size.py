"""P6: latency and memory vs the input volume's size (64^3, 96^3, 128^3 voxels over the same 240 mm head).

The model grid is fixed (preprocessing resamples every study onto it), so the size changes decoding,
resampling and putting the mask back on the input's grid. Each size is measured twice: end to end
through the platform (/v1/segmentation:predict), and as plain function calls in a fresh process whose
peak resident memory is the memory figure (`python -m bench.volume_size CASE_DIR MODEL_ONNX`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

SIZES = (64, 96, 128)
FOV_MM = 240.0


def write_resized(case: Path, out: Path, n: int) -> Path:
    """The case's modalities conformed to n^3 voxels of FOV_MM / n mm, centred on the original."""
    import nibabel as nib
    from nibabel.processing import conform

    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(case.glob("*.nii.gz")):
        if path.name.endswith("_seg.nii.gz"):
            continue
        resized = conform(nib.load(path), out_shape=(n, n, n), voxel_size=(FOV_MM / n,) * 3, order=1)
        nib.save(nib.Nifti1Image(resized.get_fdata().astype("float32"), resized.affine), out / path.name)
    return out


def _probe(case: Path, onnx_path: Path, runs: int = 5) -> dict:
    """In this (fresh) process: p50 of the plain-function segmentation and the peak RSS."""
    import statistics

    from bench.in_process import segmentation_steps
    from serving.backends import EmbeddedBackend

    raw = {p.name.split("_")[-1].split(".")[0]: p.read_bytes() for p in sorted(case.glob("*.nii.gz"))}
    extras_path = Path(onnx_path).with_name("extras.json")  # the version's window (written beside the model)
    extras = json.loads(extras_path.read_text()) if extras_path.exists() else {}
    whole = segmentation_steps(EmbeddedBackend(onnx_path, "segmentation", "bench", threads=2), raw, extras)
    whole()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        whole()
        times.append(time.perf_counter() - t0)
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over execve, so a child of a large
    # parent would report the parent's peak.
    hwm_kb = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return {"p50_ms": statistics.median(times) * 1000, "peak_rss_mb": hwm_kb / 1024}


def measure_in_process(case: Path, onnx_path: Path) -> dict:
    run = subprocess.run([sys.executable, "-m", "bench.volume_size", str(case), str(onnx_path)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    if run.returncode != 0:
        raise RuntimeError(f"volume-size probe failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_probe(Path(sys.argv[1]), Path(sys.argv[2]))))
