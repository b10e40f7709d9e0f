"""Exponential moving average of a module's weights, with the decay warmed up by step."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


class EMA(nn.Module):
    """A frozen copy of ``module`` whose weights track an exponential moving average.

    The decay at step n is ``min(decay, (1 + n) / (10 + n))``: early on the average follows the
    weights closely, so a short run's EMA does not lag far behind (the warm-up of
    Tarvainen & Valpola 2017, also used by improved-diffusion / diffusers). Buffers are copied.
    """

    def __init__(self, module: nn.Module, *, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay} must be in [0, 1)")
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        # Lightning warns about every module in eval mode at fit start; the average is meant to be
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the average towards ``module``'s current weights by one step."""
        decay = self.current_decay()
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for ema_buf, buf in zip(self.module.buffers(), module.buffers(), strict=True):
            ema_buf.copy_(buf)
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMA:
        super().train(mode)
        self.module.eval()  # the averaged copy never trains (dropout off)
        return self
