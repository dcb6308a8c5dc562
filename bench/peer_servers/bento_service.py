"""BentoML peer for P1-peers: the same compiled model.onnx behind a BentoML service (onnxruntime, 2 threads).

Started by bench/peers.py as `bentoml serve bench.peer_servers.bento_service:OnnxPeer` with the model path
in ONCOSERVE_BENCH_ONNX; it binds 127.0.0.1 (`--host`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import bentoml
import numpy as np


@bentoml.service(workers=1, traffic={"timeout": 300})
class OnnxPeer:
    def __init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(os.environ["ONCOSERVE_BENCH_ONNX"], options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def _run(self, image: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: image.astype(np.float32, copy=False)})[0]

    @bentoml.api
    def infer(self, image: np.ndarray) -> np.ndarray:
        """Arrays as JSON (BentoML's encoding for np.ndarray from outside)."""
        return self._run(image)

    @bentoml.api
    def infer_npy(self, tensor: Path) -> Path:
        """The binary path: an .npy file in (multipart), an .npy file out."""
        out = Path(tempfile.mkdtemp(prefix="bento-peer-")) / "probabilities.npy"
        np.save(out, self._run(np.load(tensor)))
        return out
