"""Diffusion training losses, returning one value per sample (STYLE.md 5)."""

from __future__ import annotations

import torch


def mse_per_sample(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖prediction - target‖² averaged over all but the batch dimension: L_simple, Ho et al. Eq. 14."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
