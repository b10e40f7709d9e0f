"""Build the trainer's callbacks and loggers from their config groups.

Each group (``callbacks``, ``logger``) is a mapping of names to ``_target_`` nodes, so configs
can add or drop one entry (``callbacks.early_stopping=null``) without touching the others.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

WANDB_ID_FILE = "wandb_id.txt"
WANDB_TARGET = "WandbLogger"


def instantiate_callbacks(callbacks_cfg: DictConfig | None) -> list[Callback]:
    """Instantiate every ``_target_`` entry of the ``callbacks`` group (none when it is null)."""
    return instantiate_group(callbacks_cfg, "callbacks")


def instantiate_loggers(
    logger_cfg: DictConfig | None, *, output_dir: str | Path, ckpt_path: str | None = None
) -> list[Logger]:
    """Instantiate every ``_target_`` entry of the ``logger`` group (none when it is null).

    A W&B logger without an ``id`` gets the run id stored next to ``ckpt_path``'s run when
    resuming (so the resumed training continues the same W&B run) or a new one, which is written
    to ``<output_dir>/wandb_id.txt`` for the next resume. Its ``group`` and ``name``, when null,
    come from :func:`wandb_run_names` (a multirun's jobs form one group). ``offline: true`` with
    ``log_model`` (which Lightning refuses: it cannot upload) runs W&B with ``mode="offline"``
    instead, so the checkpoints are artifacts of the offline run and ``wandb sync`` uploads them.
    """
    overrides = {}
    if logger_cfg:
        for name, node in logger_cfg.items():
            if node is None or not str(node.get("_target_", "")).endswith(WANDB_TARGET):
                continue
            names = wandb_run_names(logger_cfg._get_root().get("task_name"))
            extra = {k: v for k, v in names.items() if node.get(k) is None}
            if node.get("id") is None:
                extra["id"] = wandb_run_id(output_dir, ckpt_path)
            if node.get("offline") and node.get("log_model"):
                extra |= {"offline": False, "mode": "offline"}
            overrides[name] = extra
    return instantiate_group(logger_cfg, "logger", overrides)


def wandb_run_names(task_name: str | None = None) -> dict[str, str]:
    """W&B ``group`` and ``name`` from the Hydra run: in a multirun, the group is
    ``<task name>/<sweep folder name>`` (every job of the sweep in one group) and the name is
    ``<sweep folder name>/<job number>``, the job's folder (its overrides are in its config); in
    a single run, the group is the task name and the name is left to W&B."""
    if not HydraConfig.initialized():
        return {"group": task_name} if task_name else {}
    hydra_cfg = HydraConfig.get()
    task = task_name or hydra_cfg.job.name
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {"group": task}
    sweep = Path(hydra_cfg.sweep.dir).name
    return {"group": f"{task}/{sweep}", "name": f"{sweep}/{hydra_cfg.job.num}"}


def instantiate_group(
    group_cfg: DictConfig | None, group: str, overrides: dict[str, dict] | None = None
) -> list:
    """Instantiate the ``_target_`` entries of a config group; skip null entries."""
    if not group_cfg:
        log.info(f"no {group} configured")
        return []
    if not isinstance(group_cfg, DictConfig):
        raise TypeError(f"{group} must be a mapping of names to _target_ configs, got {group_cfg}")
    objects = []
    for name, node in group_cfg.items():
        if node is None:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"{group}.{name} has no _target_: each entry must name a class")
        log.info(f"instantiating {group}.{name} <{node._target_}>")
        objects.append(hydra.utils.instantiate(node, **(overrides or {}).get(name, {})))
    return objects


def wandb_run_id(output_dir: str | Path, ckpt_path: str | None) -> str:
    """The W&B run id: the one stored in ``ckpt_path``'s run folder, else a new random one.

    Checkpoints live in ``<run folder>/checkpoints/``; the id is saved (on rank zero) in
    ``<output_dir>/wandb_id.txt``.
    """
    stored = Path(ckpt_path).resolve().parent.parent / WANDB_ID_FILE if ckpt_path else None
    if stored is not None and stored.is_file():
        run_id = stored.read_text().strip()
        log.info(f"resuming W&B run {run_id} (from {stored})")
    else:
        run_id = secrets.token_hex(4)
    write_text(Path(output_dir, WANDB_ID_FILE), run_id + "\n")
    return run_id


@rank_zero_only
def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` on rank zero only, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
