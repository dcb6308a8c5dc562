"""Patch-network inference over a whole model-grid volume, the way nnU-Net and MONAI do it.

A segmentation network is trained on patches (training.augment.tumour_crop); at inference it must see
patches too, or its instance normalisation meets statistics it never saw. MONAI's
`sliding_window_inference` tiles the volume with windows of the training patch size, overlapping by
`overlap`, and blends their outputs with a Gaussian weight (centre voxels count more than edges).

Optional mirroring test-time augmentation (nnU-Net's): the volume is also predicted mirrored along
every combination of the three axes (8 passes), the outputs are flipped back and averaged, and the
passes' disagreement on the whole tumour is reported as the segmentation's uncertainty.

One implementation, used by serving (services.task_logic) and by training's evaluation alike.
`run` is the model: a callable from a (B, C, x, y, z) float32 batch of windows to its outputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from imaging.postprocess import probabilities_to_labels

DEFAULT_OVERLAP = 0.25  # MONAI's default; nnU-Net uses 0.5 (about 1.5x the windows here, see make bench)
MIRROR_AXES = list(itertools.chain.from_iterable(itertools.combinations((0, 1, 2), k) for k in range(4)))


@dataclass(frozen=True)
class WindowSpec:
    roi: tuple[int, int, int]  # the patch the network was trained on (model-grid voxels)
    overlap: float = DEFAULT_OVERLAP
    blend: str = "gaussian"  # or "constant" (plain averaging)
    batch: int = 2  # windows per model call
    mirror: bool = False  # mirroring test-time augmentation (8 passes)

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"sliding-window overlap must be in [0, 1), not {self.overlap}")
        if self.blend not in ("gaussian", "constant"):
            raise ValueError(f"sliding-window blend must be gaussian or constant, not {self.blend!r}")
        if len(self.roi) != 3 or min(self.roi) < 1:
            raise ValueError(f"sliding-window roi must be three positive sizes, not {self.roi}")

    @classmethod
    def of_version(cls, extras: dict, overlap: float | None = None, mirror: bool | None = None,
                   batch: int | None = None) -> WindowSpec | None:  # fmt: skip
        """The window a model version was trained for (its extras' `inference`), with the serving
        options on top; None for a version exported as a whole-volume network (before windows)."""
        info = (extras or {}).get("inference") or {}
        if not info.get("roi"):
            return None
        return cls(roi=tuple(int(r) for r in info["roi"]),
                   overlap=float(info.get("overlap", DEFAULT_OVERLAP) if overlap is None else overlap),
                   blend=str(info.get("blend", "gaussian")), batch=int(batch or 2),
                   mirror=bool(mirror))  # fmt: skip


@dataclass
class WindowedPrediction:
    probabilities: np.ndarray  # (K, X, Y, Z) float32: class (softmax) or region (sigmoid) probabilities
    windows: int  # windows per pass
    passes: int  # 1, or 8 with mirroring
    disagreement: float | None = None  # 1 - mean Dice of each pass's whole tumour to the consensus (mirror)


def window_count(shape: tuple[int, ...], spec: WindowSpec) -> int:
    """Windows one pass takes (MONAI's tiling: an interval of roi x (1 - overlap), last window flush)."""
    n = 1
    for size, roi in zip(shape, spec.roi):
        roi = min(roi, size)
        step = max(1, int(roi * (1 - spec.overlap)))
        n *= 1 if size <= roi else int(np.ceil((size - roi) / step)) + 1
    return n


def _one_pass(run: Callable[[np.ndarray], np.ndarray], image: np.ndarray, spec: WindowSpec) -> np.ndarray:
    import torch
    from monai.inferers import sliding_window_inference

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(run(np.ascontiguousarray(windows.numpy(), dtype=np.float32))))

    with torch.no_grad():
        out = sliding_window_inference(torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.float32)),
                                       roi_size=spec.roi, sw_batch_size=spec.batch, predictor=predictor,
                                       overlap=spec.overlap, mode=spec.blend)  # fmt: skip
    return out[0].numpy()


def _whole_tumour(probs: np.ndarray) -> np.ndarray:
    return probabilities_to_labels(probs) > 0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def predict_version(run: Callable[[np.ndarray], np.ndarray], image: np.ndarray, extras: dict, **options) -> WindowedPrediction:
    """How serving and evaluation run a segmentation version over a (C, X, Y, Z) image: its sliding
    window (the serving `options` overlap, mirror, batch on top of the version's own), or one call for a
    version exported as a whole-volume network."""
    spec = WindowSpec.of_version(extras, **options)
    if spec is None:
        return WindowedPrediction(np.asarray(run(image[None]))[0], 1, 1)
    return predict(run, image, spec)


def predict(run: Callable[[np.ndarray], np.ndarray], image: np.ndarray, spec: WindowSpec) -> WindowedPrediction:
    """(C, X, Y, Z) model-grid image -> blended probabilities over the whole volume (see module doc)."""
    if image.ndim != 4:
        raise ValueError(f"sliding-window input must be (C, X, Y, Z), not {image.shape}")
    if not spec.mirror:
        return WindowedPrediction(_one_pass(run, image, spec), window_count(image.shape[1:], spec), 1)
    total, tumours = None, []
    for axes in MIRROR_AXES:
        flipped = np.flip(image, axis=[a + 1 for a in axes]) if axes else image
        out = _one_pass(run, flipped, spec)
        out = np.flip(out, axis=[a + 1 for a in axes]) if axes else out
        tumours.append(_whole_tumour(out))
        total = out.astype(np.float32) if total is None else total + out
    mean = total / len(MIRROR_AXES)
    consensus = _whole_tumour(mean)
    disagreement = 1.0 - float(np.mean([_dice(t, consensus) for t in tumours]))
    return WindowedPrediction(np.ascontiguousarray(mean, dtype=np.float32), window_count(image.shape[1:], spec),
                              len(MIRROR_AXES), disagreement)  # fmt: skip
