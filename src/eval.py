"""Evaluate a checkpoint: ``python src/eval.py ckpt_path=... [data=...]`` (``conf/eval.yaml``).

Rebuild the model from the checkpoint alone (``genlab.load``), run ``trainer.test`` on the
datamodule stored in the checkpoint (or the one given as ``data=``), and write every metric to
``metrics_file`` (default ``<run folder>/metrics.json``), whose path is printed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from genlab.utils.checkpoint import DATA_CONFIG_KEY, model_from_checkpoint, read_checkpoint
from genlab.utils.instantiate import instantiate
from genlab.utils.instantiators import instantiate_loggers
from genlab.utils.rank_logging import RankedLogger
from genlab.utils.task import TaskResult, extras, task_wrapper
from genlab.utils.validation import validate_config

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
log = RankedLogger(__name__, rank_zero_only=True)

TOP_LEVEL = {
    "task_name": str,
    "tags": list[str] | None,
    "ckpt_path": str,
    "seed": int | None,
    "metrics_file": str,
}


@task_wrapper
def evaluate(cfg: DictConfig) -> TaskResult:
    """Test the checkpoint's model on its (or the given) datamodule; save the metrics."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    ckpt = read_checkpoint(cfg.ckpt_path)
    model = model_from_checkpoint(ckpt, path=cfg.ckpt_path)
    data_cfg = data_config(cfg, ckpt)
    log.info(f"instantiating data <{data_cfg['_target_']}>")
    datamodule = instantiate(data_cfg)
    loggers = instantiate_loggers(cfg.get("logger"), output_dir=cfg.paths.output_dir)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers)
    trainer.test(model, datamodule=datamodule)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    write_metrics(Path(cfg.metrics_file), metrics, ckpt_path=cfg.ckpt_path, data_cfg=data_cfg)
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "trainer": trainer}
    return metrics, objects


def data_config(cfg: DictConfig, ckpt: dict[str, Any]) -> dict[str, Any]:
    """The ``data=`` config if one was given, else the one stored in the checkpoint."""
    if cfg.get("data") is not None:
        return OmegaConf.to_container(cfg.data, resolve=True)
    if ckpt.get(DATA_CONFIG_KEY) is None:
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path!r} stores no data config: choose one, e.g. data=shapes"
        )
    log.info("using the data config stored in the checkpoint")
    return ckpt[DATA_CONFIG_KEY]


@rank_zero_only
def write_metrics(path: Path, metrics: dict[str, float], **provenance: Any) -> None:
    """Write the metrics, with the checkpoint and data they came from, as JSON; print the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metrics": metrics, **provenance}, indent=2, default=str) + "\n")
    log.info(f"metrics: {metrics}")
    print(f"metrics written to {path}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    """Validate the composed config, then evaluate the checkpoint."""
    validate_config(cfg, TOP_LEVEL)
    extras(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    main()
