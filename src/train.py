"""Train a model: ``python src/train.py [key=value ...]`` (config: ``conf/train.yaml``).

Compose the config, validate it, instantiate data, model, callbacks, loggers and trainer, fit,
then test the best checkpoint. Returns ``optimized_metric`` for Hydra sweepers (Optuna).
Runs without installing genlab: Python puts this file's folder (``src/``) on ``sys.path``.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from genlab.callbacks.step_seeds import StepSeeds
from genlab.utils.checkpoint import AtomicCheckpointIO, ModelConfigInCheckpoint
from genlab.utils.cuda import set_tf32
from genlab.utils.first_stages import resolve_first_stage
from genlab.utils.frozen_parts import build_missing_parts
from genlab.utils.instantiate import instantiate
from genlab.utils.instantiators import instantiate_callbacks, instantiate_loggers
from genlab.utils.logging_utils import log_hyperparameters
from genlab.utils.rank_logging import RankedLogger
from genlab.utils.task import (
    Preempted,
    TaskResult,
    extras,
    get_metric_value,
    null_group_overrides,
    task_wrapper,
)
from genlab.utils.validation import ConfigError, validate_config

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
log = RankedLogger(__name__, rank_zero_only=True)

TOP_LEVEL = {
    "task_name": str,
    "tags": list[str] | None,
    "train": bool,
    "test": bool,
    "ckpt_path": str | None,
    "seed": int | None,
    "optimized_metric": str | None,
    "tf32": bool,
}


@task_wrapper
def train(cfg: DictConfig) -> TaskResult:
    """Fit ``cfg.model`` on ``cfg.data`` (resuming from ``cfg.ckpt_path``), then test it.

    The model and data are built from their resolved plain-dict configs with genlab's own
    ``instantiate``, the same dicts the checkpoints store, so ``genlab.load`` rebuilds exactly
    the model that was trained.
    """
    seed = cfg.get("seed")
    if seed is None:  # DDP ranks started by Lightning inherit the first rank's PL_GLOBAL_SEED
        seed = int(os.environ.get("PL_GLOBAL_SEED") or random.SystemRandom().randrange(2**31))
        log.info(f"seed=null: this run's seed is {seed} (saved in its checkpoints)")
    L.seed_everything(seed, workers=True)  # the same initial weights on every rank
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    log.info(f"instantiating data <{data_cfg['_target_']}>")
    datamodule = instantiate(data_cfg)
    log.info(f"instantiating model <{model_cfg['_target_']}>")
    build_missing_parts(model_cfg)  # e.g. the unCLIP models' CLIP, by its recipe
    model = instantiate(model_cfg)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    callbacks += [ModelConfigInCheckpoint(model_cfg, data_cfg), StepSeeds(seed)]
    loggers = instantiate_loggers(
        cfg.get("logger"), output_dir=cfg.paths.output_dir, ckpt_path=ckpt_path
    )
    if not loggers:  # a learning-rate monitor has nowhere to write (Lightning refuses it)
        monitors = [c for c in callbacks if isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
        if monitors:
            log.info("no logger (logger=null): the learning-rate monitor is left out")
            callbacks = [c for c in callbacks if c not in monitors]
    log.info(f"instantiating trainer <{cfg.trainer._target_}>")
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        plugins=[*instantiate_plugins(cfg.trainer.get("plugins")), AtomicCheckpointIO()],
        **manual_optimization_overrides(model, cfg.trainer),
    )
    set_tf32(trainer.strategy.root_device.type, cfg.get("tf32", True))  # CUDA only
    log_hyperparameters(cfg=cfg, model=model, trainer=trainer)
    if cfg.train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = dict(trainer.callback_metrics)
    if cfg.test:
        trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint_to_test(trainer, cfg))
        metrics.update(trainer.callback_metrics)
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}
    return metrics, objects


def instantiate_plugins(plugins_cfg: DictConfig | None) -> list:
    """The trainer config's own ``plugins`` (e.g. a ``SLURMEnvironment``), instantiated."""
    if not plugins_cfg:
        return []
    return [hydra.utils.instantiate(p) if isinstance(p, DictConfig) else p for p in plugins_cfg]


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """The checkpoint to resume from: a path, or ``last`` / ``auto`` for this run folder's
    ``checkpoints/last.ckpt`` (``last`` fails when there is none; ``auto`` then starts afresh,
    which makes one command both start and resume a run with a fixed ``hydra.run.dir``)."""
    if ckpt_path not in ("last", "auto"):
        return ckpt_path
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if last.exists():  # a file, or a folder of shards (trainer=fsdp)
        log.info(f"ckpt_path={ckpt_path}: resuming from {last}")
        return str(last)
    if ckpt_path == "last":
        raise ConfigError(
            f"ckpt_path=last: no checkpoint at {last}. Point hydra.run.dir at the run folder to "
            "resume, or use ckpt_path=auto to start afresh when there is none."
        )
    log.info(f"ckpt_path=auto: no {last} yet, so this run starts from scratch")
    return None


def manual_optimization_overrides(model: L.LightningModule, trainer_cfg: DictConfig) -> dict:
    """Trainer arguments for a model that runs its own optimizer steps (the first stages with
    an adversary).

    * Lightning refuses ``gradient_clip_val`` for such a model, so the model clips with its
      ``grad_clip`` (its configs default it to ``trainer.gradient_clip_val``) and the trainer
      gets none.
    * Its generator and discriminator steps each leave the other's parameters without gradients,
      which DDP only allows with ``find_unused_parameters``: a DDP strategy gets it turned on.
    """
    if model.automatic_optimization:
        return {}
    log.info(
        f"{type(model).__name__} optimizes manually and clips its own gradients "
        f"(model.grad_clip={getattr(model, 'grad_clip', None)}); the trainer does not clip"
    )
    overrides: dict = {"gradient_clip_val": None}
    strategy = trainer_cfg.get("strategy")
    if isinstance(strategy, str) and strategy == "ddp":
        overrides["strategy"] = "ddp_find_unused_parameters_true"
    elif isinstance(strategy, DictConfig) and str(strategy.get("_target_", "")).endswith(
        "DDPStrategy"
    ):
        strategy = OmegaConf.to_container(strategy, resolve=True)
        overrides["strategy"] = {**strategy, "find_unused_parameters": True}
    return overrides


def checkpoint_to_test(trainer: L.Trainer, cfg: DictConfig) -> str | None:
    """The best checkpoint by the monitored metric, else ``cfg.ckpt_path``, else None (current
    weights, with a warning)."""
    callback = trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "") if callback is not None else ""
    if best:
        log.info(f"testing the best checkpoint {best}")
        return best
    if cfg.get("ckpt_path") and not cfg.train:
        return resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
    log.warning("no best checkpoint was saved: testing the current weights")
    return None


@hydra.main(version_base="1.3", config_path="../conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    """Validate the composed config, train, and return the metric named by optimized_metric."""
    validate_config(cfg, TOP_LEVEL)
    if cfg.get("ckpt_path") not in (None, "last", "auto") and not Path(cfg.ckpt_path).exists():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r}: no such checkpoint (file or shard folder)")
    resolve_first_stage(cfg)  # an LDM's first stage: given, found or built; data.resolution follows
    extras(cfg)
    try:
        metrics, _ = train(cfg)
    except Preempted as stop:
        sys.exit(128 + stop.signum)  # what the signal would have given; the message is logged
    return get_metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    sys.argv = null_group_overrides(sys.argv, Path(__file__).resolve().parents[1] / "conf")
    main()
