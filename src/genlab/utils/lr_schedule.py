"""Learning-rate schedules used by the models' ``configure_optimizers``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: Optimizer, *, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_ratio`` of the base lr at
    ``total_steps`` (Loshchilov & Hutter 2017 without restarts). Stepped once per optimizer step."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"warmup_steps={warmup_steps}, total_steps={total_steps}: need >= 0, >= 1")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def optimizers(
    optimizer_factory: Callable[..., Optimizer],
    scheduler_factory: Callable[..., Any] | None,
    params: Iterable[Any],
    trainer: Any,
) -> Optimizer | dict[str, Any]:
    """What a model's ``configure_optimizers`` returns: the optimizer over ``params`` and, if a
    scheduler factory is given, its scheduler over the trainer's total optimizer steps
    (``estimated_stepping_batches``), stepped every optimizer step."""
    optimizer = optimizer_factory(params)
    if scheduler_factory is None:
        return optimizer
    total = int(trainer.estimated_stepping_batches)
    scheduler = scheduler_factory(optimizer, total_steps=total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def step_uncounted(optimizer: Any) -> None:
    """``optimizer.step()`` on a ``LightningOptimizer`` without advancing ``global_step``.

    In manual optimization Lightning advances its step counter in the optimizer's
    ``_on_before_step`` / ``_on_after_step`` hooks (set by its manual-optimization loop before
    every batch); they are swapped for no-ops for this one step.
    """
    before, after = optimizer._on_before_step, optimizer._on_after_step
    optimizer._on_before_step = optimizer._on_after_step = lambda: None
    try:
        optimizer.step()
    finally:
        optimizer._on_before_step, optimizer._on_after_step = before, after
