"""Temperature scaling (Guo et al. 2017): one temperature per task, fitted on held-out validation cases.

A temperature is fitted only where there is enough to fit it on (at least MIN_CASES labelled cases with
MIN_PER_CLASS of each class), by the binary NLL over a bounded range: on a handful of separable cases
the unbounded optimum runs to T -> 0 and sharpens the model instead of calibrating it. Elsewhere T = 1
and the record says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar

MIN_CASES = 20
MIN_PER_CLASS = 4
BOUNDS = (0.5, 10.0)  # at most 2x sharper, at most 10x softer


@dataclass
class TemperatureFit:
    temperature: float
    n: int
    fitted: bool
    why: str
    nll_before: float | None = None
    nll_after: float | None = None

    def record(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    scaled = z / t
    return float(np.mean(np.logaddexp(0.0, scaled) - y * scaled))  # binary cross-entropy of sigmoid(z / t)


def fit_one(z: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = BOUNDS) -> TemperatureFit:
    n, positives = len(y), int(np.sum(y))
    if n < MIN_CASES or min(positives, n - positives) < MIN_PER_CLASS:
        return TemperatureFit(1.0, n, False, f"too few labelled validation cases ({n}, {positives} positive; "
                                             f"needs {MIN_CASES} with {MIN_PER_CLASS} of each class): left uncalibrated")  # fmt: skip
    best = minimize_scalar(lambda log_t: _nll(z, y, float(np.exp(log_t))), bounds=np.log(bounds), method="bounded",
                           options={"xatol": 1e-4})  # fmt: skip
    t = float(np.exp(best.x))
    at_bound = "; at the bound of its range" if min(abs(t - b) / b for b in bounds) < 1e-3 else ""
    return TemperatureFit(t, n, True, f"NLL on {n} validation cases, T in [{bounds[0]}, {bounds[1]}]{at_bound}",
                          _nll(z, y, 1.0), _nll(z, y, t))  # fmt: skip


def fit_temperatures(logits: torch.Tensor, targets: torch.Tensor) -> list[TemperatureFit]:
    """A fit per task column (targets -1 are unknown and ignored)."""
    fits = []
    for t in range(logits.shape[1]):
        known = (targets[:, t] >= 0).numpy()
        fits.append(fit_one(logits[known, t].detach().double().numpy(), targets[known, t].double().numpy()))
    return fits


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """The temperatures alone."""
    return [f.temperature for f in fit_temperatures(logits, targets)]


def uncalibrated(p: np.ndarray, temperature: float) -> np.ndarray:
    """The probability before scaling, from the calibrated one: p = sigmoid(z / T) => sigmoid(z)."""
    p = np.clip(np.asarray(p, dtype=float), 1e-12, 1 - 1e-12)
    return 1.0 / (1.0 + np.exp(-temperature * np.log(p / (1 - p))))
