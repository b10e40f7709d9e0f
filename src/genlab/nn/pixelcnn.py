"""The gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders"), over a grid of discrete codes: the prior of the VQ-VAE paper (van den Oord et al.
2017, §4.2).

Two stacks remove the blind spot of the masked PixelCNN. With (r, c) a grid position:

* the **vertical** stack's features at (r, c) see only rows above r (every column within the
  receptive field): its first layer convolves rows r − k//2 … r − 1, later layers rows
  r − k//2 … r of the previous vertical features;
* the **horizontal** stack's features at (r, c) see row r left of c and, through a 1×1 link
  from the vertical stack, the rows above: its first layer convolves columns c − k//2 … c − 1
  (the "A" mask), later layers c − k//2 … c of the previous horizontal features (the "B" mask).

Each layer is the gated activation tanh(W_f ∗ x + V_f h) ⊙ σ(W_g ∗ x + V_g h) with h the
condition (a class embedding; the null class for the unconditional model of guidance), and the
horizontal stack is residual after its first layer. So the logits at (r, c) depend only on the
codes before (r, c) in raster order (tested by gradients). The convolutions are ordinary
convolutions on shifted, padded inputs, so there are no masked weights to keep at zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedLayer(nn.Module):
    """One layer of both stacks (module docstring); ``first`` excludes the current position."""

    def __init__(self, channels: int, kernel: int, cond_dim: int, *, first: bool):
        super().__init__()
        if kernel < 3 or kernel % 2 == 0:
            raise ValueError(f"model.net.kernel={kernel} must be odd and >= 3")
        half = kernel // 2
        self.first, self.half = first, half
        rows = half if first else half + 1  # rows above (and the current one after layer 1)
        cols = half if first else half + 1  # columns left (and the current one after layer 1)
        self.vertical = nn.Conv2d(channels, 2 * channels, (rows, kernel))
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, cols))
        self.link = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        self.cond = nn.Linear(cond_dim, 2 * channels)

    @staticmethod
    def gate(x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.half
        bias = self.cond(cond)[:, :, None, None]  # (B, 2p, 1, 1)
        if self.first:  # rows r - half .. r - 1: pad the top by half, drop the last row
            v_pre = self.vertical(F.pad(v, (half, half, half, 0)))[:, :, :-1]
            h_pre = self.horizontal(F.pad(h, (half, 0, 0, 0)))[:, :, :, :-1]
        else:  # rows r - half .. r; columns c - half .. c
            v_pre = self.vertical(F.pad(v, (half, half, half, 0)))
            h_pre = self.horizontal(F.pad(h, (half, 0, 0, 0)))
        v_out = self.gate(v_pre + bias)
        h_gated = self.gate(h_pre + self.link(v_pre) + bias)
        h_out = self.out(h_gated) if self.first else h + self.out(h_gated)
        return v_out, h_out


class GatedPixelCNN(nn.Module):
    """Logits over ``num_codes`` at every grid position from the codes before it in raster
    order and a class.

    Args:
        num_codes: K, the codebook size (input and output vocabulary).
        num_classes: classes of the condition, including the null class (1: unconditional).
        grid: the code grid's side (checked at the input).
        channels: p, features per stack.
        layers: gated layers.
        kernel: the stacks' kernel size k (odd).
        hidden: width of the 1×1 output head.
    """

    def __init__(
        self,
        *,
        num_codes: int,
        num_classes: int = 1,
        grid: int = 8,
        channels: int = 64,
        layers: int = 8,
        kernel: int = 5,
        hidden: int = 256,
    ):
        super().__init__()
        if layers < 1:
            raise ValueError(f"model.net.layers={layers} must be >= 1")
        self.num_codes, self.num_classes, self.grid = num_codes, num_classes, grid
        self.embed = nn.Embedding(num_codes, channels)
        self.class_embed = nn.Embedding(num_classes, channels)
        self.layers = nn.ModuleList(
            GatedLayer(channels, kernel, channels, first=i == 0) for i in range(layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, num_codes, 1)
        )

    def forward(self, codes: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (B, h, w) in [0, K) and classes (B,) (None: class 0) → logits (B, K, h, w)."""
        if codes.dim() != 3 or codes.shape[1:] != (self.grid, self.grid):
            raise ValueError(
                f"codes of shape {tuple(codes.shape)}: expected (B, {self.grid}, {self.grid})"
            )
        if classes is None:
            classes = torch.zeros(len(codes), dtype=torch.long, device=codes.device)
        x = self.embed(codes).permute(0, 3, 1, 2)  # (B, p, h, w)
        cond = self.class_embed(classes)  # (B, p)
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h, cond)
        return self.head(h)
