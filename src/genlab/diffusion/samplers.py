"""Samplers as pure functions of (eps_fn, x_T, alpha_bar, timesteps) (STYLE.md 3).

``eps_fn(x_t, t)`` returns the predicted noise ε̂ for a batch at integer training timesteps
``t`` (B,); ``alpha_bar`` is the float64 ᾱ of the training schedule; ``timesteps`` is a
descending subsequence of training steps ending at 0 (see ``schedules.spaced_timesteps``), so
every sampler runs with any number of steps. Randomness comes only from ``generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from genlab.diffusion.parametrization import eps_from_x0

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _predict(eps_fn: EpsFn, x, t: int, alpha_bar_t: torch.Tensor, clip_x0: bool):
    """(x0_hat, eps_hat) at step t; with ``clip_x0`` x0_hat is clipped to [-1, 1] (static
    thresholding) and ε̂ recomputed from it so the two stay consistent."""
    eps = eps_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).float()
    x0 = (x - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = eps_from_x0(x0, x, alpha_bar_t)
    return x0, eps


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (a CPU generator
    gives the same samples whatever device x is on)."""
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, device=device).to(x.device)


def _pairs(alpha_bar: torch.Tensor, timesteps: torch.Tensor, device):
    """(t, ᾱ_t, ᾱ_prev) for each step, with ᾱ_prev = 1 after the last step (x_0 itself)."""
    ab = alpha_bar.to(device=device, dtype=torch.float32)
    ts = timesteps.tolist()
    for i, t in enumerate(ts):
        prev = ab[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=device)
        yield t, ab[t], prev


def ddim_sample(
    eps_fn: EpsFn,
    x: torch.Tensor,
    alpha_bar: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    eta: float = 0.0,
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12): deterministic for η = 0, DDPM-like for η = 1.

    x_prev = √ᾱ_prev x̂0 + √(1 - ᾱ_prev - σ²) ε̂ + σ z,
    σ = η √((1 - ᾱ_prev)/(1 - ᾱ_t)) √(1 - ᾱ_t/ᾱ_prev)   (Eq. 16).
    """
    for t, ab_t, ab_prev in _pairs(alpha_bar, timesteps, x.device):
        x0, eps = _predict(eps_fn, x, t, ab_t, clip_x0)
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and t > 0:
            x = x + sigma * _noise(x, generator)
    return x


def ddpm_sample(
    eps_fn: EpsFn,
    x: torch.Tensor,
    alpha_bar: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    variance: Literal["small", "large"] = "small",
    clip_x0: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_prev | x_t, x̂0) (Ho et al. 2020, Eq. 6-7, Alg. 2).

    On a respaced subsequence β'_t = 1 - ᾱ_t/ᾱ_prev (Nichol & Dhariwal 2021, §4). The variance is
    the posterior's β̃_t = (1-ᾱ_prev)/(1-ᾱ_t) β'_t ("small") or β'_t ("large"); the last step
    returns the posterior mean, with no noise.
    """
    for t, ab_t, ab_prev in _pairs(alpha_bar, timesteps, x.device):
        x0, _ = _predict(eps_fn, x, t, ab_t, clip_x0)
        beta = 1 - ab_t / ab_prev
        mean = (ab_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab_prev) * x) / (1 - ab_t)
        var = beta * (1 - ab_prev) / (1 - ab_t) if variance == "small" else beta
        x = mean
        if t > 0:
            x = x + var.sqrt() * _noise(x, generator)
    return x
