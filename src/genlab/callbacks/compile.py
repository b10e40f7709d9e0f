"""``torch.compile`` of the model's network, opt-in: ``callbacks.compile.mode=default`` (or
``reduce-overhead``, ``max-autotune``); ``mode: null`` (conf/callbacks/compile.yaml) does nothing.

What is compiled: the first of ``nets`` (attribute paths) that the model has -- the denoising
UNet of a diffusion model (``denoiser.net``), the Transformer of DALL·E, the VQ prior and
unCLIP's prior (``net``). The rest (text encoders, frozen first stages, the EMA copy that
sampling uses, the losses) runs as before.

It is compiled *in place* with ``nn.Module.compile``, which compiles the module's ``__call__``
and keeps the module where it is: parameter and buffer names, ``state_dict`` keys and therefore
checkpoints are those of an uncompiled run (``torch.compile(net)`` would instead wrap it and
prefix every key with ``_orig_mod.``). Compilation itself happens on the first call, inside the
first training step (minutes for a large UNet with ``max-autotune``); new input shapes, e.g.
sampling's batch sizes or eval mode, compile again (up to torch's recompile limit, after which
the call runs eagerly).

It is applied in the ``setup`` hook, before the strategy moves, wraps (DDP) or shards
(``trainer=fsdp``: genlab's ``FSDP.setup``) the model; a compiled net keeps its compiled call
under DDP and FSDP, and FSDP's per-block hooks run between the compiled regions (torch does not
trace them by default).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
from torch import nn

from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def find_net(module: nn.Module, paths: list[str]) -> tuple[str, nn.Module] | None:
    """The first ``(path, submodule)`` of ``paths`` (dotted attribute paths) that ``module``
    has, or None."""
    for path in paths:
        try:
            found = module.get_submodule(path)
        except AttributeError:
            continue
        return path, found
    return None


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module.compile()`` has been called on it."""
    return getattr(module, "_compiled_call_impl", None) is not None


class CompileNet(L.Callback):
    """Compile the model's network in place with ``torch.compile`` (see the module docstring).

    Args:
        mode: ``None`` (off), or ``torch.compile``'s mode: ``default``, ``reduce-overhead``
            (CUDA graphs: fixed shapes and no CPU overhead), ``max-autotune`` (searches kernels
            and uses CUDA graphs: longest compile, fastest steps), ``max-autotune-no-cudagraphs``.
        nets: attribute paths of the network to compile, tried in order.
        backend: ``inductor`` (generated kernels); ``eager`` or ``aot_eager`` only trace (the
            tests, or to debug a graph break).
        dynamic: ``torch.compile``'s ``dynamic`` (None: static shapes first, dynamic ones after
            a shape changes).
        fullgraph: refuse graph breaks (an error instead of falling back to Python for a part).
    """

    def __init__(
        self,
        mode: CompileMode | None = None,
        nets: list[str] | tuple[str, ...] = ("denoiser.net", "net"),
        backend: str = "inductor",
        dynamic: bool | None = None,
        fullgraph: bool = False,
    ) -> None:
        if not nets:
            raise ValueError("callbacks.compile.nets is empty: name the network to compile")
        self.mode, self.nets, self.backend = mode, list(nets), backend
        self.dynamic, self.fullgraph = dynamic, fullgraph

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.mode is None:
            return
        found = find_net(pl_module, self.nets)
        if found is None:
            children = ", ".join(name for name, _ in pl_module.named_children()) or "none"
            raise ValueError(
                f"callbacks.compile.mode={self.mode}: {type(pl_module).__name__} has none of "
                f"callbacks.compile.nets={self.nets}; its submodules are: {children}. Name the "
                "network to compile, e.g. callbacks.compile.nets=[generator]"
            )
        path, net = found
        if is_compiled(net):  # fit, then test, in one process
            return
        net.compile(
            mode=self.mode, backend=self.backend, dynamic=self.dynamic, fullgraph=self.fullgraph
        )
        params = sum(p.numel() for p in net.parameters())
        log.info(
            f"torch.compile(mode={self.mode}, backend={self.backend}) of {path} "
            f"({type(net).__name__}, {params:,} parameters), in place: state_dict keys unchanged; "
            "it compiles during the first step"
        )
