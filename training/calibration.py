"""Temperature scaling (Guo et al. 2017): one temperature per task, fitted on held-out validation cases."""

from __future__ import annotations

import torch


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 200) -> list[float]:
    """Temperatures minimising the masked binary NLL per task (targets -1 are unknown and ignored)."""
    temps = []
    for t in range(logits.shape[1]):
        known = targets[:, t] >= 0
        y, z = targets[known, t].float(), logits[known, t].detach()
        if known.sum() < 2 or len(torch.unique(y)) < 2:
            temps.append(1.0)  # too few labels to fit: leave uncalibrated, honestly
            continue
        log_t = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), y)
            loss.backward()
            return loss

        opt.step(closure)
        temps.append(float(log_t.detach().exp().clamp(0.05, 20.0)))
    return temps
