"""Send the run's configuration and model size to every logger of the trainer."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

LOGGED_KEYS = ("data", "trainer", "callbacks", "extras", "task_name", "tags", "ckpt_path", "seed")


@rank_zero_only
def log_hyperparameters(*, cfg: DictConfig, model: L.LightningModule, trainer: L.Trainer) -> None:
    """Log the resolved config and the model's parameter counts as hyperparameters.

    Logged: ``model`` (its config), ``model/params/{total,trainable,non_trainable}`` and the
    top-level keys in ``LOGGED_KEYS``. Does nothing when the trainer has no logger.
    """
    if not trainer.loggers:
        log.warning("no logger: hyperparameters are not logged")
        return
    container = OmegaConf.to_container(cfg, resolve=True)
    hparams: dict[str, Any] = {"model": container["model"]}
    hparams["model/params/total"] = sum(p.numel() for p in model.parameters())
    hparams["model/params/trainable"] = sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    hparams["model/params/non_trainable"] = (
        hparams["model/params/total"] - hparams["model/params/trainable"]
    )
    hparams.update({key: container.get(key) for key in LOGGED_KEYS})
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)
