"""Out-of-distribution score of a study: the Mahalanobis distance (Lee et al., NeurIPS 2018: one Gaussian,
here with a Ledoit-Wolf covariance since a cohort has few cases) of the preprocessed input's summary
statistics from the training cases': the brain's share of the grid, and per sequence the spread, skewness
and kurtosis of its z-scored intensities inside the brain, and the correlation of every pair of sequences.

Why the input and not the encoder: the classifier's pooled encoder features sit behind instance norms,
which normalise away most of what makes a study foreign (measured on 60 phantoms, 8 epochs: AUROC 0.62
for the encoder features against 0.99-1.00 for these statistics on the same variants). Sequences a study
lacks take the training mean, so a missing modality (which the models handle) is not a foreign study.

Fitted after training on the training split; its threshold is chosen on the validation split: the 99.9 %
quantile of a scaled chi-square fitted (by its moments) to the validation cases' squared distances. A
validation split has ~10 cases, too few for an empirical tail, and in-distribution distances are heavy-
tailed (tumour burden moves the FLAIR skewness): measured on 60 phantoms over 6 splits, this rule flagged
1 of 54 held-out in-distribution cases and every one of 216 out-of-distribution variants; over 4 of those
splits the validation maximum, and a 99 % quantile of the same fit, each flagged 6 of 36. The exported classifier
computes the score in its graph (output `ood_score`, `statistics` below is that code). Evaluation
measures it: AUROC between the test cases and out-of-distribution versions of them (`variants`).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

MIN_FOR_TAIL = 3  # validation cases needed to fit the tail model; fewer: their maximum
TAIL = 0.999
# Variances are floored at 1/1000 of the largest: a few cases, a float32 graph.
MAX_CONDITION = 1e3


def statistics(image: torch.Tensor, presence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, X, Y, Z) preprocessed images -> (B, D) statistics and the (B, D) mask of the entries the
    study's own sequences define (1) or not (0: a missing sequence)."""
    brain = (image != 0).any(dim=1, keepdim=True).float()
    n = brain.sum(dim=(2, 3, 4)).clamp(min=1.0)
    share = brain.mean(dim=(2, 3, 4))
    mean = (image * brain).sum(dim=(2, 3, 4)) / n
    centred = (image - mean[..., None, None, None]) * brain
    std = ((centred**2).sum(dim=(2, 3, 4)) / n).clamp(min=1e-6).sqrt()
    z = centred / std[..., None, None, None]
    skew = (z**3).sum(dim=(2, 3, 4)) / n
    skew = torch.sign(skew) * torch.log1p(skew.abs())  # tumour burden gives a heavy tail; compress it
    kurtosis = torch.log1p((z**4).sum(dim=(2, 3, 4)) / n)
    flat = z.flatten(2)
    corr = flat @ flat.transpose(1, 2) / n[..., None]
    pairs = list(itertools.combinations(range(int(image.shape[1])), 2))  # constants in the exported graph
    i, j = [a for a, _ in pairs], [b for _, b in pairs]
    values = torch.cat([share, std, skew, kurtosis, corr[:, i, j]], dim=1)
    defined = torch.cat([torch.ones_like(share), presence, presence, presence, presence[:, i] * presence[:, j]], dim=1)
    return values, defined


def fit(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]) -> dict | None:
    """(values, defined) of the training and validation cases -> {mean, whiten, threshold, rule, ...};
    None without at least 2 training cases."""
    from sklearn.covariance import LedoitWolf

    values, defined = train
    if len(values) < 2:
        return None
    counts = defined.sum(axis=0)
    mean = np.where(counts > 0, (values * defined).sum(axis=0) / np.maximum(counts, 1), 0.0)
    model = LedoitWolf(assume_centered=True).fit(_impute(values, defined, mean) - mean)
    eigenvalues, vectors = np.linalg.eigh(model.covariance_)
    eigenvalues = np.maximum(eigenvalues, max(eigenvalues.max() / MAX_CONDITION, 1e-12))
    whiten = vectors / np.sqrt(eigenvalues)  # |(x - mean) @ whiten| is the Mahalanobis distance
    reference = val if len(val[0]) else train
    threshold, rule = _threshold(distance(*reference, mean, whiten), "validation" if len(val[0]) else "training")
    return {"mean": mean.tolist(), "whiten": whiten.tolist(), "threshold": threshold, "rule": rule,
            "n_train": len(values), "n_val": len(val[0]), "method": "mahalanobis-input-statistics"}  # fmt: skip


def _threshold(scores: np.ndarray, kind: str) -> tuple[float, str]:
    from scipy.stats import chi2

    if len(scores) < MIN_FOR_TAIL:
        return float(scores.max()), f"maximum of {len(scores)} {kind} cases"
    squared = scores**2
    mean, var = float(squared.mean()), float(squared.var(ddof=1))
    dof = min(2 * mean * mean / var, 1000.0) if var > 0 else 1000.0  # s * chi2(k): mean s k, variance 2 s^2 k
    scale = mean / dof
    threshold = float(np.sqrt(scale * chi2.ppf(TAIL, dof)))
    return threshold, f"{TAIL:.1%} quantile of a scaled chi-square (k = {dof:.1f}) fitted to {len(scores)} {kind} cases"


def _impute(values: np.ndarray, defined: np.ndarray, mean) -> np.ndarray:
    return np.where(defined > 0, values, np.asarray(mean))


def distance(values: np.ndarray, defined: np.ndarray, mean, whiten) -> np.ndarray:
    """Mahalanobis distance sqrt((x - m)^T C^-1 (x - m)) = |(x - m) W| with W W^T = C^-1."""
    x = _impute(np.asarray(values, dtype=float), np.asarray(defined), mean)
    return np.linalg.norm((x - np.asarray(mean)) @ np.asarray(whiten), axis=1)


def case_statistics(images: list[np.ndarray], presences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`statistics` of preprocessed cases, as numpy (for fitting and checks)."""
    if not images:
        return np.zeros((0, 0)), np.zeros((0, 0))
    rows = [statistics(torch.from_numpy(im[None]).float(), torch.from_numpy(p[None]).float()) for im, p in zip(images, presences)]
    return torch.cat([r[0] for r in rows]).double().numpy(), torch.cat([r[1] for r in rows]).double().numpy()


def variants(image: np.ndarray, presence: np.ndarray, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Out-of-distribution inputs made from one preprocessed in-distribution case (channels x grid):
    - `not_brain`: noise where the grid is (a non-brain volume z-scored over its whole extent),
    - `wrong_sequence`: the sequences in the wrong channels (T1<->FLAIR, T1ce<->T2),
    - `corrupt`: heavy noise in the brain and half the volume lost (the phantom generator's artefact),
    - `intensity_shift`: a non-linear intensity change the z-score does not undo (x -> sign(x) x^2)."""
    brain = np.any(image != 0, axis=0)
    noise = rng.standard_normal(image.shape).astype(np.float32)
    corrupt = image + noise * brain
    corrupt[:, :, : image.shape[2] // 2] = 0
    return {"not_brain": (noise, np.ones_like(presence)),
            "wrong_sequence": (image[[3, 2, 1, 0]].copy(), presence[[3, 2, 1, 0]].copy()),
            "corrupt": (corrupt.astype(np.float32), presence),
            "intensity_shift": ((np.sign(image) * image**2).astype(np.float32), presence)}  # fmt: skip
