"""SW: segmentation latency per study by sliding-window size, overlap and mirroring TTA.

The same U-Net (random weights: compute does not depend on them) exported as a patch network at each
window size, run over one 2 mm study (4 x 96 x 112 x 96) by imaging.sliding_window exactly as serving
runs it, onnxruntime with 2 threads. The 96 x 112 x 96 window is the whole grid in one call (how
versions before patch training were served).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = [((64, 64, 64), 0.0, False), ((64, 64, 64), 0.25, False), ((64, 64, 64), 0.5, False),
         ((64, 64, 64), 0.25, True), ((96, 112, 96), 0.25, False), ((96, 112, 96), 0.25, True)]  # fmt: skip
RUNS = 3


def bench_windows() -> list[dict]:
    import onnxruntime as ort
    import torch

    from bench.timing import figure
    from imaging import sliding_window as sw
    from training import tasks

    torch.manual_seed(0)
    task = tasks.get("segmentation", {"augment": "none"})
    graph = task.export_module(task.network().eval(), {}).eval()
    image = np.random.default_rng(0).standard_normal((4, 96, 112, 96)).astype(np.float32)
    work = Path(tempfile.mkdtemp(prefix="osb-sw-"))
    figures, sessions = [], {}
    try:
        for roi, overlap, mirror in CASES:
            if roi not in sessions:
                path = work / f"seg-{'x'.join(map(str, roi))}.onnx"
                torch.onnx.export(graph, (torch.zeros(1, 4, *roi),), str(path), input_names=["image"],
                                  output_names=["probabilities"], dynamic_axes={"image": {0: "b"}, "probabilities": {0: "b"}},
                                  opset_version=17, dynamo=False)  # fmt: skip
                options = ort.SessionOptions()
                options.intra_op_num_threads = 2
                sessions[roi] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            session = sessions[roi]
            spec = sw.WindowSpec(roi=roi, overlap=overlap, mirror=mirror)

            def run(windows, session=session):
                return session.run(None, {"image": windows})[0]

            sw.predict(run, image, spec)  # warm-up
            samples = []
            for _ in range(RUNS):
                t0 = time.perf_counter()
                result = sw.predict(run, image, spec)
                samples.append(time.perf_counter() - t0)
            name = f"SW_roi{'x'.join(map(str, roi))}_overlap{overlap}_{'tta8' if mirror else 'notta'}"
            figures += [figure(f"{name}_s", float(np.median(samples)), "s"),
                        figure(f"{name}_windows", result.windows * result.passes, "model windows")]  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return figures
