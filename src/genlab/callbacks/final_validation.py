"""Validate (and so checkpoint) after the last step of a fit budgeted in ``max_steps``."""

from __future__ import annotations

from typing import Any

import lightning as L


class FinalValidation(L.Callback):
    """Run the validation loop right after the step that reaches ``trainer.max_steps``.

    Lightning validates at epoch ends only, so when ``max_steps`` stops training mid-epoch the
    final weights are never validated and ``ModelCheckpoint`` never saves them (neither ``last``
    nor best-by-``val/loss``). Setting ``trainer.should_stop`` on that step takes the epoch loop's
    early-stopping path, which validates before it leaves; every rank sets it at the same step.
    """

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
