"""Losses: masked multi-task BCE with learned uncertainty weighting, Cox partial likelihood, Dice+CE."""

from __future__ import annotations

import torch
from torch import nn


def masked_task_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task BCE over the cases whose label is known (target -1 = unknown is masked out).

    Returns (loss per task, whether the task had any labelled case in the batch).
    """
    known = targets >= 0
    bce = nn.functional.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).float(), reduction="none")
    bce = bce * known
    counts = known.sum(dim=0)
    return bce.sum(dim=0) / counts.clamp(min=1), counts > 0


def uncertainty_weighted(task_losses: torch.Tensor, present: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """L = sum_i L_i / (2 s_i^2) + log s_i over tasks present in the batch (s_i = exp(log_sigma_i))."""
    weighted = task_losses * 0.5 * torch.exp(-2 * log_sigma) + log_sigma
    return (weighted * present).sum()


def cox_partial_likelihood(risk: torch.Tensor, days: torch.Tensor, events: torch.Tensor, ties: str = "efron") -> torch.Tensor:
    """Negative Cox partial log-likelihood, averaged over events; 0 when no event.

    Tied event times are handled exactly and independently of the cases' order: `efron` (the default;
    lifelines and R's survival use it) or `breslow`. For distinct event time t with d events D and risk
    set R(t) = {k: T_k >= t}, the log-likelihood term is sum_D r_i - sum_{l<d} log(S_R - l/d * S_D) with
    S = sum exp(r); Breslow drops the l/d * S_D correction.
    """
    if ties not in ("efron", "breslow"):
        raise ValueError(f"ties must be 'efron' or 'breslow', not {ties!r}")
    risk, days = risk.flatten(), days.flatten()
    events = events.flatten().to(risk.dtype)
    n_events = events.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    shift = risk.max().detach()  # exp(r - max) cannot overflow; the shift cancels in every term
    w = torch.exp(risk - shift)
    times, group = torch.unique(days, return_inverse=True)  # ascending distinct times, each case's index
    n = len(times)
    at_time = torch.zeros(n, dtype=w.dtype).index_add(0, group, w)  # sum exp(r) of cases at each time
    risk_set = torch.flip(torch.cumsum(torch.flip(at_time, [0]), 0), [0])  # sum over T_k >= t
    tied = torch.zeros(n, dtype=w.dtype).index_add(0, group, w * events)  # S_D: the events' own sum
    d = torch.zeros(n, dtype=w.dtype).index_add(0, group, events)
    # The l-th event (l = 0..d-1) of each tie group: the order in which its events are numbered does not
    # matter, since only the set {0..d-1} enters the sum.
    order = torch.argsort(group * 2 + (1 - events), stable=True)  # events first within each time
    starts = torch.cumsum(torch.bincount(group, minlength=n), 0) - torch.bincount(group, minlength=n)
    rank = torch.empty_like(group)
    rank[order] = torch.arange(len(group)) - starts[group[order]]
    fraction = rank.to(w.dtype) / d[group].clamp(min=1) if ties == "efron" else torch.zeros_like(w)
    # Censored cases enter only risk sets; their own term is masked (a negative 'denominator' there is unused).
    denominator = torch.where(events > 0, risk_set[group] - fraction * tied[group], risk_set[group])
    log_lik = ((risk - shift - torch.log(denominator)) * events).sum()
    return -log_lik / n_events


def segmentation_loss() -> nn.Module:
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


class RegionLoss(nn.Module):
    """Region-based training (nnU-Net's for BraTS): sigmoid Dice + BCE on the nested regions WT, TC, ET.

    MONAI's DiceCELoss would apply softmax cross-entropy across the three channels, which treats
    nested regions as exclusive classes; the BCE here is per region."""

    def __init__(self) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, regions) + self.bce(logits, regions)


def classes_to_regions(classes: torch.Tensor) -> torch.Tensor:
    """(B, 1, ...) class indices (0 background, 1 NCR, 2 ED, 3 ET) -> (B, 3, ...) float WT, TC, ET."""
    wt = classes > 0
    tc = (classes == 1) | (classes == 3)
    et = classes == 3
    return torch.cat([wt, tc, et], dim=1).float()


def localization_loss() -> nn.Module:
    from monai.losses import DiceCELoss

    return DiceCELoss(sigmoid=True)
