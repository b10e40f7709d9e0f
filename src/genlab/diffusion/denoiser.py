"""One denoiser interface for every sampler and guidance method (docs/architecture.md, "The diffusion system").

A ``Denoiser`` is called as ``denoiser(x_t, t)`` with a batch x_t (B, ...) and model times t (B,)
and returns a ``DenoiserOutput``: the clean-data estimate x̂0 and the noise estimate ε̂, which
are consistent (x_t = √ᾱ x̂0 + √(1-ᾱ) ε̂), plus, for networks that learn their variance, the
interpolation fraction of Nichol & Dhariwal 2021 (Eq. 15). It carries the ``Schedule`` that
gives ᾱ(t), so a sampler needs nothing else. ``from_network`` wraps a network predicting ε, v or
x0; guidance methods (``genlab.diffusion.guidance``) wrap one denoiser into another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from genlab.diffusion.parametrization import Prediction, eps_from_x0, to_x0_eps
from genlab.diffusion.schedules import Schedule


class DenoiserOutput(NamedTuple):
    """x̂0 and ε̂ (float32, shaped like x_t); ``var_frac`` ∈ [0, 1] for a learned variance:
    log Σ = f log β_t + (1 - f) log β̃_t (Nichol & Dhariwal 2021, Eq. 15), else None."""

    x0: torch.Tensor
    eps: torch.Tensor
    var_frac: torch.Tensor | None = None


@dataclass(frozen=True)
class Denoiser:
    """``fn(x_t, t) -> DenoiserOutput`` together with the schedule that defines ᾱ(t)."""

    fn: Callable[[torch.Tensor, torch.Tensor], DenoiserOutput]
    schedule: Schedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> DenoiserOutput:
        return self.fn(x_t, t)

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ(t) shaped (B, 1, ..., 1) to broadcast against ``like``, in its dtype and device."""
        return broadcast(self.schedule.alpha_bar(t), like)

    def wrap(self, fn: Callable[[torch.Tensor, torch.Tensor], DenoiserOutput]) -> Denoiser:
        """A denoiser with another function on the same schedule."""
        return Denoiser(fn, self.schedule)


def broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values reshaped to (B, 1, ..., 1) with ``like``'s dtype and device."""
    shape = (-1,) + (1,) * (like.dim() - 1)
    return values.to(device=like.device, dtype=like.dtype).reshape(shape)


def from_network(
    net_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: Schedule,
    prediction: Prediction,
    *,
    learned_variance: bool = False,
) -> Denoiser:
    """Wrap ``net_fn(x_t, t)``, which predicts ``prediction`` (ε, v or x0), into a Denoiser.

    With ``learned_variance`` the network's output has twice the channels: the prediction, then
    v ∈ [-1, 1] whose (v + 1)/2 interpolates the log variance (improved-diffusion's convention).
    """

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> DenoiserOutput:
        out = net_fn(x_t, t).float()
        var_frac = None
        if learned_variance:
            out, v = out.chunk(2, dim=1)
            var_frac = (v + 1) / 2
        x0, eps = to_x0_eps(prediction, out, x_t.float(), broadcast(schedule.alpha_bar(t), out))
        return DenoiserOutput(x0, eps, var_frac)

    return Denoiser(fn, schedule)


def with_x0(out: DenoiserOutput, x0: torch.Tensor, x_t: torch.Tensor, alpha_bar) -> DenoiserOutput:
    """``out`` with x̂0 replaced and ε̂ recomputed from it, so the two stay consistent."""
    return DenoiserOutput(x0, eps_from_x0(x0, x_t.float(), alpha_bar), out.var_frac)
