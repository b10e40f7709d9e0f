"""What a run does when a loss or a gradient is NaN or infinite: ``callbacks.nonfinite.policy``.

Left alone, one NaN gradient turns every weight into NaN, training goes on to the end and the
NaN weights are checkpointed. :class:`NonFiniteGuard` checks the gradients of every optimizer
step, after backward (and after DDP has averaged them) and before clipping and the step:

* ``policy=skip`` (default): the step is skipped (the optimizer sees no gradients, so neither
  the weights nor its moments change), a warning names the step, and ``train/nonfinite_skips``
  counts the skips; ``max_consecutive`` skipped steps in a row stop the run (it has diverged);
* ``policy=stop``: the run stops with an error naming the step; the checkpoints written so far
  are kept (and hold finite weights: see ``AtomicCheckpointIO``).

The decision is reduced over the DDP ranks (a NaN on one rank is a NaN for all), so every rank
skips or stops at the same step and none waits for another. Under fp16 mixed precision the
gradient scaler already skips steps with inf gradients: the guard leaves those to it.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch

from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

POLICIES = ("skip", "stop")


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient and its policy says stop."""


class NonFiniteGuard(L.Callback):
    """Skip (counted, warned) or stop at a training step with non-finite gradients."""

    def __init__(self, policy: Literal["skip", "stop"] = "skip", max_consecutive: int = 20):
        if policy not in POLICIES:
            raise ValueError(f"callbacks.nonfinite.policy={policy!r}: expected one of {POLICIES}")
        if max_consecutive < 1:
            raise ValueError(
                f"callbacks.nonfinite.max_consecutive={max_consecutive!r}: expected an int >= 1"
            )
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.skips = 0
        self.consecutive = 0

    def state_dict(self) -> dict[str, Any]:
        return {"skips": self.skips, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skips = int(state_dict["skips"])
        self.consecutive = int(state_dict["consecutive"])

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16: torch's GradScaler skips inf steps itself
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # each rank checks its own shard under FSDP (the flags are summed below)
        grads = [local_tensor(p.grad) for p in params if p.grad is not None]
        local = bool(grads) and not all_finite(grads)
        bad = trainer.strategy.reduce(
            torch.tensor(float(local), device=trainer.strategy.root_device), reduce_op="sum"
        )
        if float(bad) == 0:
            self.consecutive = 0
            return
        where = (
            f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch "
            f"{trainer.fit_loop.epoch_loop.batch_idx}): non-finite gradients on "
            f"{int(float(bad))} of {trainer.world_size} rank(s)"
        )
        if self.policy == "stop":
            raise NonFiniteError(
                f"{where}; callbacks.nonfinite.policy=stop ends the run here. The checkpoints "
                "written so far are kept; policy=skip skips such steps instead."
            )
        self.skips += 1
        self.consecutive += 1
        for p in params:
            p.grad = None
        log.warning(f"{where}: skipped this optimizer step ({self.skips} skipped in this run)")
        pl_module.log("train/nonfinite_skips", float(self.skips), on_step=True, sync_dist=False)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{where}; {self.consecutive} steps in a row were skipped "
                f"(callbacks.nonfinite.max_consecutive={self.max_consecutive}): the run has "
                "diverged. Lower the learning rate or resume from an earlier checkpoint."
            )


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite.

    One fused norm per tensor first (a NaN or an inf anywhere makes that tensor's norm so); only
    a tensor whose norm is not finite is checked element by element (its norm may overflow).
    """
    norms = torch.stack([n.float() for n in torch._foreach_norm(tensors)])
    suspects = (~norms.isfinite()).nonzero().flatten().tolist()
    return all(bool(tensors[i].isfinite().all()) for i in suspects)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (a DTensor under trainer=fsdp), else the tensor."""
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()
