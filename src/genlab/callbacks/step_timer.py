"""Seconds per optimizer step after a warm-up, measured inside a real training run.

``bench/leaderboard.py`` turns a wall-clock budget into each recipe's ``trainer.max_steps`` from
this measurement: ``python src/train.py experiment=... trainer.max_steps=25
'+callbacks.step_timer={_target_: genlab.callbacks.step_timer.StepTimer, warmup_steps: 5}'``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


class StepTimer(L.Callback):
    """Time the optimizer steps after the first ``warmup_steps`` and write them to JSON.

    The clock starts at the end of the batch that completes step ``warmup_steps`` and stops at
    the end of the last batch, so data loading, forward, backward and the optimizer step of every
    timed step are inside it; the warm-up (first-call allocations, lazy initializations, data-
    dependent inits) and everything after the last batch (validation, checkpoints, grids) are not.
    At train end ``path`` (default ``<trainer.default_root_dir>/step_times.json``) gets
    ``{"warmup_steps", "timed_steps", "seconds", "seconds_per_step", "timed_batches", "images",
    "images_per_second"}``; ``seconds_per_step`` and ``images_per_second`` are null when no step
    was timed (a run of ``max_steps <= warmup_steps``). ``images`` counts the items of the timed
    training batches of all ranks (this rank's count times the world size: every rank trains on
    equal batches), whatever the steps per batch (genlab's adversarial models count one per batch;
    a model that counted several would still be measured per batch).

    Args:
        warmup_steps: optimizer steps (``trainer.global_step``) left out of the timing.
        path: the JSON file to write.
    """

    def __init__(self, warmup_steps: int = 5, path: str | None = None) -> None:
        if warmup_steps < 0:
            raise ValueError(f"callbacks.step_timer.warmup_steps={warmup_steps}: must be >= 0")
        self.warmup_steps, self.path = warmup_steps, path
        self.start: tuple[int, float] | None = None  # (global step, time) when the clock started
        self.last: tuple[int, float] | None = None
        self.batches = self.items = 0  # trained on inside the timed window, on this rank

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.warmup_steps == 0:
            self.start = (trainer.global_step, self.now())

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step, now = trainer.global_step, self.now()
        if self.start is None:
            if step >= self.warmup_steps:
                self.start = (step, now)
        else:
            self.batches += 1
            self.items += batch_size(batch)
        self.last = (step, now)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        record: dict[str, Any] = {"warmup_steps": self.warmup_steps, "timed_steps": 0}
        record.update(seconds=0.0, seconds_per_step=None)
        record.update(timed_batches=0, images=0, images_per_second=None)
        if self.start is not None and self.last is not None and self.last[0] > self.start[0]:
            steps, seconds = self.last[0] - self.start[0], self.last[1] - self.start[1]
            record.update(timed_steps=steps, seconds=seconds, seconds_per_step=seconds / steps)
            images = self.items * trainer.world_size
            record.update(
                timed_batches=self.batches, images=images, images_per_second=images / seconds
            )
        path = Path(self.path or Path(trainer.default_root_dir) / "step_times.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")

    @staticmethod
    def now() -> float:
        """The wall clock, after the queued GPU work (if any) has finished."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()


def batch_size(batch: Any) -> int:
    """The number of items in a training batch: the length of its ``index`` (the data contract),
    else of its ``image``, else of its first tensor; 0 if it has none."""
    if isinstance(batch, dict):
        for key in ("index", "image"):
            if torch.is_tensor(batch.get(key)):
                return len(batch[key])
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        return next((len(t) for t in batch if torch.is_tensor(t) and t.dim() > 0), 0)
    return len(batch) if torch.is_tensor(batch) and batch.dim() > 0 else 0
