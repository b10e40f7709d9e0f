"""Building blocks shared by networks of different concepts (image encoders, autoencoders)."""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a skip (He et al. 2016, pre-activation): the UNet's
    ``ResBlock`` without a timestep embedding. The residual branch starts at zero."""

    def __init__(self, c_in: int, c_out: int, *, groups: int, dropout: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(groups, c_in),
            nn.SiLU(),
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.GroupNorm(groups, c_out),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        nn.init.zeros_(self.block[-1].weight)
        nn.init.zeros_(self.block[-1].bias)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)
