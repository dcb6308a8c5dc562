"""Which epoch a training job keeps: the one with the lowest validation metric, and when to stop.

The state travels inside every checkpoint (with the kept weights), so a resumed run goes on choosing
among all its epochs, not only the resumed ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class EarlyStopping:
    patience: int | None  # epochs without improvement before stopping; None: never stop early
    best_value: float = math.inf
    best_epoch: int = -1
    stale: int = 0

    def update(self, epoch: int, value: float) -> bool:
        """Record this epoch's validation metric (lower is better); True when it is the new best.
        Without a finite metric (no validation case) the latest epoch is kept."""
        if not math.isfinite(value):
            self.best_epoch, self.stale = epoch, 0
            return True
        if value < self.best_value:
            self.best_value, self.best_epoch, self.stale = value, epoch, 0
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience

    def reason(self, epochs_run: int, epochs_planned: int) -> str:
        """Why the kept epoch was kept, in a sentence for the model card."""
        if not math.isfinite(self.best_value):
            return f"epoch {self.best_epoch} (the last; no validation case to choose by)"
        stopped = (f"stopped after epoch {epochs_run - 1}: no improvement for {self.stale} epochs (patience {self.patience})"
                   if epochs_run < epochs_planned else f"all {epochs_planned} epochs ran")  # fmt: skip
        return f"epoch {self.best_epoch}, the lowest validation metric ({self.best_value:.4f}); {stopped}"

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict | None, patience: int | None) -> EarlyStopping:
        if not state:
            return cls(patience)
        return cls(patience, float(state["best_value"]), int(state["best_epoch"]), int(state["stale"]))
