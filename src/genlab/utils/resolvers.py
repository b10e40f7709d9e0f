"""Config resolvers that make every process of one job agree on its run folder.

A run folder named by each process's clock (``${now:...}``) splits a job whose processes start
at different times, e.g. the nodes of a multi-node run, across several folders. The run folder
is therefore named by the job, when the launcher gives it an identity:

* ``GENLAB_RUN_ID``: set it to the same value on every node of a hand-launched job
  (``GENLAB_RUN_ID=exp1 NODE_RANK=1 python src/train.py trainer.num_nodes=2 ...``);
* SLURM: ``slurm-<job id>[_<array task>][.<step>]`` -- the same on every task of a step, and
  again after a requeue, so a requeued job resumes in its own folder with ``ckpt_path=auto``;
* torchrun: ``torchrun-<rdzv id>`` when ``--rdzv-id`` is given;
* otherwise the start time, ``%Y-%m-%d_%H-%M-%S`` (a single-machine run; Lightning hands the
  folder to the DDP processes it starts itself).

``${process_suffix:}`` names each process's log file: empty for the first process of the first
node, ``_node<N>`` / ``_rank<R>`` for the processes that SLURM or a hand launch started on other
nodes (Lightning's own child processes already get ``train_ddp_process_<i>``).
"""

from __future__ import annotations

import os
from datetime import datetime

from omegaconf import OmegaConf

TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"


def run_id(env: dict[str, str] | None = None, now: datetime | None = None) -> str:
    """The name of this job's run folder (see the module docstring), the same in its processes."""
    env = os.environ if env is None else env
    if env.get("GENLAB_RUN_ID"):
        return env["GENLAB_RUN_ID"]
    if env.get("SLURM_JOB_ID"):
        name = f"slurm-{env.get('SLURM_ARRAY_JOB_ID') or env['SLURM_JOB_ID']}"
        if env.get("SLURM_ARRAY_TASK_ID"):
            name += f"_{env['SLURM_ARRAY_TASK_ID']}"
        step = env.get("SLURM_STEP_ID", "")
        if step.isdigit() and int(step) < 0xFFFFFFF0:  # not the batch/extern pseudo-steps
            name += f".{step}"
        return name
    if env.get("TORCHELASTIC_RUN_ID") not in (None, "", "none"):
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    return (now or datetime.now()).strftime(TIME_FORMAT)


def process_suffix(env: dict[str, str] | None = None) -> str:
    """``""`` on the job's first process; ``_rank<R>`` for SLURM tasks and ``_node<N>`` for the
    first process of another node of a hand-launched job (see the module docstring)."""
    env = os.environ if env is None else env
    if env.get("SLURM_NTASKS", "1") != "1" and env.get("SLURM_PROCID", "0") != "0":
        return f"_rank{env['SLURM_PROCID']}"
    if env.get("NODE_RANK", "0") != "0":
        return f"_node{env['NODE_RANK']}"
    return ""


def register() -> None:
    """Register ``${run_id:}`` and ``${process_suffix:}`` (idempotent; ``run_id`` is cached so
    one process resolves its folder once, like Hydra's ``now``)."""
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", lambda: run_id(), use_cache=True)
    if not OmegaConf.has_resolver("process_suffix"):
        OmegaConf.register_new_resolver("process_suffix", lambda: process_suffix())
