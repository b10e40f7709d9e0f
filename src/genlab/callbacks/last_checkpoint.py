"""``last.ckpt``: the latest training state, rewritten (atomically) at every save point.

Lightning's ``ModelCheckpoint(save_last=True)`` only rewrites ``last.ckpt`` at a step where it
also saved a best-k checkpoint, so when the monitored metric stops improving ``last.ckpt`` falls
behind, and a run resumed from it (``ckpt_path=auto``, preemption) silently loses that progress.
:class:`LastCheckpoint` saves ``last.ckpt`` every time, on the schedule of the run's
``model_checkpoint`` (conf/callbacks/model_checkpoint.yaml).

``last.ckpt`` is the resume state, not a result: it is not handed to the loggers, so W&B's
``log_model`` uploads the checkpoints of ``model_checkpoint`` (the best by the monitored metric,
with W&B's ``best`` alias), never ``last.ckpt`` under that alias.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """Save ``<dirpath>/last.ckpt`` at every save point, overwriting the previous one."""

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="last",
            monitor=None,
            save_top_k=1,
            save_last=False,
            enable_version_counter=False,
            auto_insert_metric_name=False,
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end,
        )

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        """Save like ``ModelCheckpoint`` without notifying the loggers (module docstring)."""
        trainer.save_checkpoint(filepath, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
