"""Fault injection for the tests in tests/faults/: a real DDPM whose loss turns NaN at one step on
one rank. Runs put this folder on PYTHONPATH and select it with
``model._target_=faulty_models.NaNLossDDPM +model.nan_step=3 +model.nan_rank=1``."""

from __future__ import annotations

from typing import Any

import torch

from genlab.models.diffusion.model import DiffusionModel


class NaNLossDDPM(DiffusionModel):
    """A DDPM whose training loss is NaN at ``nan_step`` on ``nan_rank`` (every step if -1)."""

    def __init__(self, *args: Any, nan_step: int = 3, nan_rank: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nan_step, self.nan_rank = nan_step, nan_rank

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        hit = self.nan_step in (-1, self.global_step) and self.global_rank == self.nan_rank
        return loss * float("nan") if hit else loss
