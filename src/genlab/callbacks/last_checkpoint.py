"""``last.ckpt``: the latest training state, rewritten (atomically) at every save point.

Lightning's ``ModelCheckpoint(save_last=True)`` only rewrites ``last.ckpt`` at a step where it
also saved a best-k checkpoint, so when the monitored metric stops improving ``last.ckpt`` falls
behind, and a run resumed from it (``ckpt_path=auto``, preemption) silently loses that progress.
:class:`LastCheckpoint` saves ``last.ckpt`` every time, on the schedule of the run's
``model_checkpoint`` (conf/callbacks/model_checkpoint.yaml).
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
