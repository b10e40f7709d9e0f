"""Timestep embeddings shared by every diffusion network."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer sinusoidal features of (possibly fractional) timesteps ``t`` of shape (B,).

    Vaswani et al. 2017, Sec. 3.5, as used for the timestep in Ho et al. 2020 (App. B).
    Returns (B, dim): cosines in the first half, sines in the second.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t followed by a two-layer MLP (Ho et al. 2020)."""

    def __init__(self, base_dim: int, emb_dim: int):
        super().__init__()
        self.base_dim = base_dim
        self.mlp = nn.Sequential(
            nn.Linear(base_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.base_dim).to(self.mlp[0].weight.dtype))
