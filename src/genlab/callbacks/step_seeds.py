"""Randomness that depends on (seed, rank, step) alone: what makes a resumed run draw the same
noise, timesteps, dropout masks and condition drops as the uninterrupted one.

Lightning checkpoints hold no random-generator state, and ``seed_everything`` gives every DDP
rank the same stream. :class:`StepSeeds` (added by ``train.py`` to every run) reseeds torch
(CPU and CUDA), numpy and Python's ``random`` at the start of each training batch from
``(seed, "train", rank, batch count)``, and at the start of each validation / test run from
``(seed, "val" | "test", rank, global step)``. So:

* a run resumed from a checkpoint at batch k draws exactly what the uninterrupted run drew from
  batch k on, wherever the checkpoint was written (after a batch, after validation, mid-epoch);
* every rank draws its own numbers, reproducibly;
* validation, sample grids and metric generation (which use their own ``torch.Generator``) cannot
  perturb the training stream, and a validation loss does not depend on what ran before it.

The seed itself is saved in the checkpoint (the per-step states follow from it and the step
counters that Lightning saves); a run started with ``seed=null`` gets a random seed, logged, which
its resumed runs keep. Item-level data randomness is seeded by :mod:`genlab.data.resumable`.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from genlab.utils.rank_logging import RankedLogger
from genlab.utils.seeding import derive_seed, seed_all

log = RankedLogger(__name__, rank_zero_only=True)


class StepSeeds(L.Callback):
    """Reseed every generator per rank and per training batch; save the seed in checkpoints."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = int(state_dict["seed"])
        if saved != self.seed:
            log.warning(
                f"seed={self.seed} differs from the checkpoint's seed {saved}: the resumed run "
                f"keeps {saved}, so that it draws what the interrupted run would have drawn"
            )
        self.seed = saved

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        batch = trainer.fit_loop.epoch_loop.total_batch_idx  # counts every batch, resumed too
        seed_all(derive_seed(self.seed, "train", trainer.global_rank, batch))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed_all(derive_seed(self.seed, "val", trainer.global_rank, trainer.global_step))

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed_all(derive_seed(self.seed, "test", trainer.global_rank, trainer.global_step))
