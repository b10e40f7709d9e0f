"""``trainer=fsdp``: fully sharded data parallel training (FSDP2, torch's ``fully_shard``).

Each process keeps 1/W of every sharded parameter, its gradient and its optimizer state, and
gathers a block's full weights just before the block runs. What is sharded: every net that
lists its blocks (``fsdp_units()``: the UNet's levels, the Transformers' blocks, the text encoder's
layers) -- each block is one FSDP unit and the net is the root unit that holds the rest of its
parameters. The EMA copy of a net is sharded the same way, so the average is updated shard by
shard. Parameters outside such nets (small embeddings and tables of the conditioners) stay
whole on every process and their gradients are averaged after each backward pass, as DDP would.

:class:`FSDP` is Lightning's ``ModelParallelStrategy`` (the FSDP2 strategy, which runs on CUDA
with NCCL and, unlike Lightning's FSDP1 ``FSDPStrategy``, also on the CPU with gloo) with a
data-parallel mesh over all processes of all nodes and genlab's sharding applied in ``setup``
instead of a ``configure_model`` hook in every model.

* Mixed precision: ``mixed_precision=bf16`` gathers weights in bf16 and reduces gradients in
  fp32 (FSDP's ``MixedPrecisionPolicy``), on top of the trainer's autocast.
* Activation checkpointing: ``activation_checkpointing=true`` turns on the nets'
  ``gradient_checkpointing`` (genlab/nn/checkpointing.py) for the sharded blocks.
* Sampling and evaluation (the sample-grid and metrics callbacks) run inside
  :func:`full_weights`: every process gathers the full weights once, then draws its images
  without talking to the others (ranks may draw different numbers of batches).
* Checkpoints: ``save_distributed_checkpoint=true`` writes ``last.ckpt`` as a folder with one
  shard file per process (torch.distributed.checkpoint) plus ``meta.pt``; resuming reads it back
  sharded, and :func:`genlab.load` / ``ckpt_path=`` of sample.py, eval.py, export.py consolidate
  it into one model on one process (:func:`read_sharded_checkpoint`). ``false`` gathers a single
  ordinary checkpoint file on rank 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint


def shardable_nets(module: nn.Module) -> list[nn.Module]:
    """The outermost submodules of ``module`` that list their blocks (``fsdp_units()``)."""
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if callable(getattr(child, "fsdp_units", None)):
                found.append(child)
            else:
                visit(child)

    visit(module)
    return found


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def shard_module(
    module: nn.Module,
    mesh: Any,
    *,
    mixed_precision: str | None = "bf16",
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
) -> int:
    """Apply ``fully_shard`` to every block of every shardable net of ``module``, then to the
    net itself; returns the number of nets sharded.

    Raises:
        ValueError: no net of ``module`` can be sharded (nothing would be gained over DDP), or
            an unknown ``mixed_precision``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtypes = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if mixed_precision not in dtypes:
        raise ValueError(
            f"trainer.strategy.mixed_precision={mixed_precision!r}: one of bf16, fp16, fp32, null"
        )
    policy = MixedPrecisionPolicy(param_dtype=dtypes[mixed_precision], reduce_dtype=torch.float32)
    nets = shardable_nets(module)
    if not nets:
        raise ValueError(
            f"trainer=fsdp: {type(module).__name__} has no net that FSDP can shard (the UNet, "
            "the Transformers and the text encoder can); train it with trainer=ddp"
        )
    for net in nets:
        if activation_checkpointing and hasattr(net, "gradient_checkpointing"):
            net.gradient_checkpointing = True
        for block in net.fsdp_units():
            fully_shard(
                block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward
            )
        fully_shard(net, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return len(nets)


def replicated_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters that FSDP left whole (not DTensors)."""
    from torch.distributed.tensor import DTensor

    return [p for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]


class FSDP(ModelParallelStrategy):
    """Fully sharded data parallel over every process of every node (see the module docstring).

    Args:
        mixed_precision: ``bf16`` | ``fp16``: the dtype in which weights are gathered and blocks
            run (gradients reduced in fp32); ``fp32`` / None: full precision.
        reshard_after_forward: free a block's gathered weights after its forward pass (ZeRO-3;
            False keeps them until the backward pass, ZeRO-2: more memory, less communication).
        activation_checkpointing: recompute blocks in the backward pass.
        save_distributed_checkpoint: one shard file per process (True) or one gathered file.
        process_group_backend: ``nccl`` on CUDA, ``gloo`` on the CPU (None: Lightning's default).
    """

    strategy_name = "genlab_fsdp"

    def __init__(
        self,
        *,
        mixed_precision: str | None = "bf16",
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.mixed_precision = mixed_precision
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing

    def setup_environment(self) -> None:
        # one data-parallel dimension over all processes (Lightning's default is nodes x GPUs)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer: L.Trainer) -> None:
        """ModelParallelStrategy.setup, with genlab's sharding instead of ``configure_model``."""
        from lightning.fabric.utilities.init import _materialize_distributed_module
        from lightning.fabric.utilities.optimizer import _optimizers_to_device

        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        if not is_sharded(self.model):
            count = shard_module(
                self.model,
                self.device_mesh["data_parallel"],
                mixed_precision=self.mixed_precision,
                reshard_after_forward=self.reshard_after_forward,
                activation_checkpointing=self.activation_checkpointing,
            )
            whole = sum(p.numel() for p in replicated_parameters(self.model))
            total = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            log.info(
                f"FSDP over {self.world_size} processes: {count} nets sharded by block; "
                f"{whole:,} of {total:,} trainable parameters stay whole on every process"
            )
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        """Average the gradients of the parameters FSDP left whole (FSDP reduces the rest)."""
        super().post_backward(closure_loss)
        grads = [p.grad for p in replicated_parameters(self.model) if p.grad is not None]
        if grads and self.world_size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world_size
            for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
                grad.copy_(part.view_as(grad))


@contextlib.contextmanager
def full_weights(module: nn.Module) -> Iterator[None]:
    """Gather the full weights of every FSDP unit of ``module`` for the duration of the block,
    so forward passes need no communication (sampling on some ranks only, or on different
    numbers of batches). A collective: every rank must enter it. No-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        # back to the strategy's setting (ZeRO-3 unless configured otherwise)
        strategy = getattr(getattr(module, "_trainer", None), "strategy", None)
        again = getattr(strategy, "reshard_after_forward", True)
        for unit in units:
            unit.set_reshard_after_forward(again, recurse=False)


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A folder written by a distributed save (shard files + ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file()


def read_sharded_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of a distributed (sharded) checkpoint folder, consolidated on this
    process: ``state_dict`` holds full tensors, as in a single-file checkpoint."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    return _load_distributed_checkpoint(Path(path))  # keys as saved: state_dict, optimizer_0, ...
