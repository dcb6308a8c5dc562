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


def cox_partial_likelihood(risk: torch.Tensor, days: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), averaged over events; 0 when no event."""
    order = torch.argsort(days, descending=True)
    risk, events = risk[order].flatten(), events[order].flatten().float()
    log_cumsum = torch.logcumsumexp(risk, dim=0)  # log of the risk set sum, longest survivors first
    n_events = events.sum()
    if n_events == 0:
        return risk.sum() * 0.0
    return -((risk - log_cumsum) * events).sum() / n_events


def segmentation_loss() -> nn.Module:
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True)


def localization_loss() -> nn.Module:
    from monai.losses import DiceCELoss

    return DiceCELoss(sigmoid=True)
