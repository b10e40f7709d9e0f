"""Exact conversions between what a network may predict: ε, x0 or v (Salimans & Ho 2022).

With a_t = √ᾱ_t and s_t = √(1-ᾱ_t):  x_t = a x0 + s ε,  v = a ε - s x0, hence
x0 = a x_t - s v and ε = s x_t + a v. ``alpha_bar`` is ᾱ at each sample's timestep, shaped to
broadcast against x (e.g. (B, 1, 1, 1)).
"""

from __future__ import annotations

from typing import Literal

import torch

Prediction = Literal["eps", "x0", "v"]


def q_sample(x0, eps, alpha_bar):
    """x_t = √ᾱ x0 + √(1-ᾱ) ε (Ho et al. 2020, Eq. 4)."""
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps


def target(prediction: Prediction, x0, eps, alpha_bar):
    """The regression target of each parametrization."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0  # v


def to_x0_eps(prediction: Prediction, out, x_t, alpha_bar) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from a network output of the given parametrization."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction == "eps":
        return (x_t - s * out) / a, out
    if prediction == "x0":
        return out, (x_t - a * out) / s
    return a * x_t - s * out, s * x_t + a * out  # v


def eps_from_x0(x0, x_t, alpha_bar):
    """ε implied by x_t and an (e.g. clipped) x0 estimate."""
    return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def convert(out, source: Prediction, dest: Prediction, x_t, alpha_bar) -> torch.Tensor:
    """Re-express a prediction of one parametrization in another, exactly, given x_t and ᾱ."""
    x0, eps = to_x0_eps(source, out, x_t, alpha_bar)
    return target(dest, x0, eps, alpha_bar)


def snr(alpha_bar):
    """Signal-to-noise ratio ᾱ / (1 - ᾱ) (Kingma et al. 2021)."""
    return alpha_bar / (1 - alpha_bar)
