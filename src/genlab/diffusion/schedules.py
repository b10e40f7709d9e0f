"""Noise schedules as small pure functions in float64 (STYLE.md 4).

Notation (Ho et al. 2020): β_t the variance added at step t (t = 0..T-1 here, the paper's
t = 1..T), α_t = 1 - β_t, ᾱ_t = ∏_{s≤t} α_s ("alpha_bar"), so x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

ScheduleName = Literal["linear", "cosine", "sigmoid"]


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """β rising linearly from 1e-4 to 0.02, scaled to keep the T=1000 shape (Ho et al. 2020, §4)."""
    scale = 1000.0 / num_steps
    return torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64)


def betas_for_alpha_bar(
    alpha_bar: Callable[[float], float], num_steps: int, max_beta: float = 0.999
) -> torch.Tensor:
    """β_t = 1 - ᾱ((t+1)/T) / ᾱ(t/T), clipped at ``max_beta`` (Nichol & Dhariwal 2021, Eq. 17)."""
    betas = [
        min(1.0 - alpha_bar((t + 1) / num_steps) / alpha_bar(t / num_steps), max_beta)
        for t in range(num_steps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def cosine_betas(num_steps: int, s: float = 0.008) -> torch.Tensor:
    """ᾱ(t) = cos²((t + s)/(1 + s) · π/2), normalised by ᾱ(0) (Nichol & Dhariwal 2021, Eq. 17)."""
    return betas_for_alpha_bar(lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2, num_steps)


def sigmoid_betas(
    num_steps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0
) -> torch.Tensor:
    """ᾱ(t) = (σ(end/τ) - σ((start + t(end - start))/τ)) / (σ(end/τ) - σ(start/τ)).

    The sigmoid schedule of Jabri et al. 2023 (RIN), Alg. 1, turned into β by Eq. 17 of
    Nichol & Dhariwal 2021.
    """

    def sigmoid(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-z))

    v_start, v_end = sigmoid(start / tau), sigmoid(end / tau)

    def alpha_bar(t: float) -> float:
        return (v_end - sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)

    return betas_for_alpha_bar(lambda t: max(alpha_bar(t), 1e-12), num_steps)


def make_betas(name: ScheduleName, num_steps: int) -> torch.Tensor:
    """The named schedule's β_0..β_{T-1}, float64."""
    schedules = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}
    if name not in schedules:
        raise ValueError(f"schedule={name!r} is not one of {sorted(schedules)}")
    return schedules[name](num_steps)


def alpha_bar_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 - β_s), float64."""
    return torch.cumprod(1.0 - betas.double(), dim=0)


def spaced_timesteps(num_train_steps: int, num_steps: int) -> torch.Tensor:
    """``num_steps`` evenly spaced training timesteps, descending, ending at t = 0.

    The "respacing" of Nichol & Dhariwal 2021 (§4): a model trained with T steps samples on any
    subsequence; samplers step from each entry to the next with the matching ᾱ.
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"steps={num_steps} must be in [1, {num_train_steps}] (training steps)")
    ts = torch.linspace(0, num_train_steps - 1, num_steps, dtype=torch.float64).round().long()
    return ts.flip(0)
