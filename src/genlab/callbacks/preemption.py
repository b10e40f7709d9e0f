"""Stop a run cleanly when the cluster asks: SIGTERM or SIGUSR1 on any rank makes every rank stop
after the same training batch, save ``checkpoints/last.ckpt`` and exit with a message that says
how to resume.

Lightning's own SIGTERM handling broadcasts from inside the signal handler and only listens to
rank 0, so a signal that reaches one other rank leaves the ranks out of step. Here the handler only
records the signal; after each training batch the ranks sum their flags (one scalar all-reduce),
and if any rank was signalled they all save the same checkpoint (data position and seeds
included: the resumed run is exact) and raise :class:`Preempted`. ``train.py`` turns it into exit
status 128 + the signal number, as if the signal had ended the process.

On SLURM (``SLURM_JOB_ID`` set) with ``requeue=true``, rank 0 then asks ``scontrol requeue`` for
the job, which Lightning's ``SLURMEnvironment`` plugin would otherwise do; the requeued job
resumes with ``ckpt_path=auto`` from the same run folder (``hydra.run.dir`` fixed, or the default
one, which is named after the SLURM job id).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from genlab.utils.rank_logging import RankedLogger
from genlab.utils.task import Preempted

log = RankedLogger(__name__, rank_zero_only=False)


class Preemption(L.Callback):
    """Catch ``signals``; stop every rank at the next batch end with a saved checkpoint."""

    def __init__(self, signals: list[str] | None = None, requeue: bool = True) -> None:
        names = ["SIGTERM", "SIGUSR1"] if signals is None else list(signals)
        unknown = [n for n in names if str(n) not in signal.Signals.__members__]
        if unknown:
            raise ValueError(f"callbacks.preemption.signals: unknown signal names {unknown}")
        self.signals = [signal.Signals[n] for n in names]
        self.requeue = requeue
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its handlers (Trainer._run), so these replace them for fit
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM / SIGUSR1 are not handled")
            return
        for signum in self.signals:
            self.previous[signum] = signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: Any) -> None:
        """Only record the signal: no I/O or collective runs inside a signal handler."""
        self.received = signum

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exc: BaseException):
        self.restore_handlers()

    def restore_handlers(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        local = torch.tensor(float(self.received or 0), device=trainer.strategy.root_device)
        # the largest signal number received by any rank (0: none)
        got = trainer.strategy.reduce(local, reduce_op="max") if trainer.world_size > 1 else local
        signum = int(float(got))
        if not signum:
            return
        name = signal.Signals(signum).name
        path = checkpoint_dir(trainer) / "last.ckpt"
        trainer.save_checkpoint(path)
        message = (
            f"{name} received: stopped after step {trainer.global_step} with every rank in step "
            f"and saved {path}. Resume exactly with ckpt_path={path} (or ckpt_path=auto with the "
            "same run folder)."
        )
        if self.requeue and trainer.is_global_zero and "SLURM_JOB_ID" in os.environ:
            message += " " + requeue_slurm_job()
        log.warning(message)
        raise Preempted(message, signum, logged=True)


def checkpoint_dir(trainer: L.Trainer) -> Path:
    """Where the run's ModelCheckpoint writes, else ``<default_root_dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


def requeue_slurm_job() -> str:
    """Ask SLURM to requeue this job (or this array task); say what happened."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else SLURMEnvironment.job_id()
    try:
        done = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True)
    except FileNotFoundError:
        return f"Could not requeue SLURM job {job}: no scontrol on PATH."
    if done.returncode != 0:
        return f"Requeuing SLURM job {job} failed: {done.stderr.strip() or done.returncode}."
    return f"Requeued SLURM job {job}."
