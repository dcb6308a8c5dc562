"""Brain extraction behind one interface: `deepbet` by default, HD-BET when its weights are configured.

deepbet (MIT, Fisch et al. 2024) ships its TorchScript weights inside the wheel: nothing is fetched at
run time. HD-BET downloads its weights on first use unless they are already on disk; oncoserve only
runs it when a setting names the folder holding them, and refuses otherwise (never an implicit
download). Each extractor states its name, version and the sha256 of the weights it ran, recorded in
every prediction.

Both run on one image (the T1-weighted series when present: what both models were trained on) on its
own grid and return a boolean brain mask on that grid.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import threading
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import nibabel as nib
import numpy as np

from imaging.errors import StudyError
from imaging.study import Volume

SKULL_STRIP_METHODS = ("deepbet", "hd-bet")


class BrainExtractor(Protocol):
    name: str

    def describe(self) -> dict: ...

    def extract(self, volume: Volume) -> np.ndarray: ...


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DeepBetExtractor:
    name = "deepbet"

    def __init__(self, threads: int = 2):
        try:
            from deepbet.bet import BrainExtraction
            from deepbet.utils import DATA_PATH
        except ImportError as exc:  # pragma: no cover - a broken install
            raise StudyError(f"skull stripping needs the `deepbet` package ({exc})") from None
        self._weights = [Path(DATA_PATH) / "models" / n for n in ("model.pt", "bbox_model.pt")]
        self._threads = threads
        self._lock = threading.Lock()  # one torch model, used by one study at a time
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            self._bet = BrainExtraction(no_gpu=True)

    @lru_cache(maxsize=1)
    def describe(self) -> dict:
        return {"method": self.name, "version": importlib.metadata.version("deepbet"),
                "weights_sha256": {p.name: _sha256(p) for p in self._weights}}  # fmt: skip

    def extract(self, volume: Volume) -> np.ndarray:
        import torch

        img = nib.Nifti1Image(np.asarray(volume.data, dtype=np.float32), volume.affine)
        with self._lock:
            previous = torch.get_num_threads()
            torch.set_num_threads(self._threads)
            try:
                _, mask, _ = self._bet.run(img)
            finally:
                torch.set_num_threads(previous)
        return np.asarray(mask.dataobj) > 0


class HdBetExtractor:
    """HD-BET (Isensee et al. 2019), only from weights already on disk (`hdbet_weights` setting)."""

    name = "hd-bet"
    WEIGHT_FILES = ("0.model", "1.model", "2.model", "3.model", "4.model")

    def __init__(self, weights_dir: Path | None):
        if weights_dir is None:
            raise StudyError("skull_strip=hd-bet needs the folder of its weights (setting hdbet_weights); "
                             "oncoserve never lets HD-BET download them at run time")  # fmt: skip
        weights_dir = Path(weights_dir)
        missing = [n for n in self.WEIGHT_FILES if not (weights_dir / n).is_file()]
        if missing:
            raise StudyError(f"hdbet_weights={weights_dir}: missing {', '.join(missing)} (HD-BET's 5 fold models)")
        try:
            from HD_BET.run import run_hd_bet  # noqa: F401
        except ImportError:
            raise StudyError("skull_strip=hd-bet: the HD-BET package is not installed (install it beside a CPU "
                             "torch; `pip install hd-bet` pulls a CUDA torch)") from None  # fmt: skip
        self.weights_dir = weights_dir

    def describe(self) -> dict:
        try:
            version = importlib.metadata.version("HD_BET")
        except importlib.metadata.PackageNotFoundError:
            version = importlib.metadata.version("hd-bet")
        return {"method": self.name, "version": version,
                "weights_sha256": {n: _sha256(self.weights_dir / n) for n in self.WEIGHT_FILES}}  # fmt: skip

    def extract(self, volume: Volume) -> np.ndarray:  # pragma: no cover - needs HD-BET and its weights
        import os
        import tempfile

        import HD_BET.paths
        import HD_BET.utils
        from HD_BET.run import run_hd_bet

        # HD-BET 1.x looks here before downloading (the files exist, so it never does); modules that
        # imported the name keep their own binding, so both are set. Not verified on this machine.
        HD_BET.paths.folder_with_parameter_files = HD_BET.utils.folder_with_parameter_files = str(self.weights_dir)
        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, "in.nii.gz"), os.path.join(tmp, "out.nii.gz")
            nib.save(nib.Nifti1Image(np.asarray(volume.data, dtype=np.float32), volume.affine), src)
            run_hd_bet(src, out, mode="fast", device="cpu", do_tta=False, keep_mask=True)
            return np.asarray(nib.load(out.replace(".nii.gz", "_mask.nii.gz")).dataobj) > 0


_extractors: dict[tuple, BrainExtractor] = {}
_extractors_lock = threading.Lock()


def extractor(method: str = "deepbet", hdbet_weights: Path | None = None) -> BrainExtractor:
    """The configured extractor, built once per process (loading a model costs more than running it)."""
    if method not in SKULL_STRIP_METHODS:
        raise StudyError(f"skull_strip={method!r}: expected one of {', '.join(SKULL_STRIP_METHODS)}")
    key = (method, str(hdbet_weights))
    with _extractors_lock:
        if key not in _extractors:
            _extractors[key] = DeepBetExtractor() if method == "deepbet" else HdBetExtractor(hdbet_weights)
        return _extractors[key]
