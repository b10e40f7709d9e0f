"""The shapes oracle's network: a small CNN that reads a shapes image into per-cell logits.

Two coordinate channels are appended to the image (Liu et al. 2018, CoordConv: "top left" is then
a feature, not something to infer from padding), then ``len(channels)`` levels of 3×3
convolution-norm-SiLU blocks, each level after the first halving the resolution with a strided
convolution. The last feature map is flattened and an MLP maps it to the ``feature_dim``-vector
that the oracle offers as its features (FID, KID, precision/recall); linear heads read every
cell's occupancy, shape, colour and size logits from it. The network knows nothing of the
dataset's tables beyond their sizes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from genlab.nn.unet import coordinate_channels

Norm = Literal["batch", "group"]
HEADS = ("occupancy", "shape", "color", "size")  # the per-cell outputs, in the heads' order


def conv_block(c_in: int, c_out: int, *, stride: int, norm: Norm, groups: int) -> nn.Sequential:
    """3×3 convolution (stride 1 or 2), then BatchNorm or GroupNorm, then SiLU."""
    normalise = nn.BatchNorm2d(c_out) if norm == "batch" else nn.GroupNorm(groups, c_out)
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), normalise, nn.SiLU()
    )


class ShapesParserNet(nn.Module):
    """Per-cell attribute logits and a feature vector of images ``(B, C, R, R)``.

    Args:
        image_size: R, the resolution it reads; the flattened map has
            ``channels[-1] * (R / 2^(len(channels) - 1))^2`` values.
        in_channels: image channels.
        channels: feature channels per level; each level after the first halves H and W.
        blocks: stride-1 blocks per level (after the first block or the downsampling one).
        feature_dim: D, the width of the MLP and of the features.
        num_cells, num_shapes, num_colors, num_sizes: the sizes of the output tables.
        norm: ``"batch"`` or ``"group"`` normalisation after each convolution.
        groups: GroupNorm groups.
        coord_channels: append the two pixel-coordinate channels to the input.
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        in_channels: int = 3,
        channels: tuple[int, ...] | list[int] = (32, 64, 128, 128),
        blocks: int = 1,
        feature_dim: int = 256,
        num_cells: int = 9,
        num_shapes: int = 5,
        num_colors: int = 9,
        num_sizes: int = 2,
        norm: Norm = "batch",
        groups: int = 8,
        coord_channels: bool = True,
    ):
        super().__init__()
        check_parser_args(image_size, list(channels), norm, groups)
        self.image_size, self.feature_dim, self.coord_channels = (
            image_size,
            feature_dim,
            coord_channels,
        )
        self.num_cells = num_cells
        self.sizes = dict(zip(HEADS, (2, num_shapes, num_colors, num_sizes)))
        layers, c = [], in_channels + 2 * coord_channels
        for i, ch in enumerate(channels):
            layers.append(conv_block(c, ch, stride=1 if i == 0 else 2, norm=norm, groups=groups))
            layers += [
                conv_block(ch, ch, stride=1, norm=norm, groups=groups) for _ in range(blocks)
            ]
            c = ch
        self.trunk = nn.Sequential(*layers)
        side = image_size // 2 ** (len(channels) - 1)
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * side * side, feature_dim),
            nn.SiLU(),
            nn.Linear(feature_dim, feature_dim),
            nn.SiLU(),
        )
        self.heads = nn.Linear(feature_dim, num_cells * sum(self.sizes.values()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x: (B, C, R, R) → features (B, D) and logits per head ``{name: (B, cells, K)}``,
        for the heads occupancy (K = 2: empty, occupied), shape, color and size."""
        if self.coord_channels:
            x = torch.cat([x, coordinate_channels(x)], dim=1)  # (B, C + 2, R, R)
        features = self.mlp(self.trunk(x))  # (B, D)
        logits = self.heads(features).unflatten(1, (self.num_cells, -1))  # (B, cells, ΣK)
        return features, dict(zip(HEADS, logits.split(list(self.sizes.values()), dim=-1)))


def check_parser_args(image_size: int, channels: list[int], norm: str, groups: int) -> None:
    """Check that the levels divide the resolution and that GroupNorm's groups divide channels."""
    if not channels or min(channels) < 1:
        raise ValueError(f"net.channels={channels} must be a non-empty list of positive ints")
    factor = 2 ** (len(channels) - 1)
    if image_size % factor:
        raise ValueError(
            f"net.image_size={image_size} must be divisible by 2^(len(net.channels) - 1)="
            f"{factor}: each level after the first halves the resolution"
        )
    if norm not in ("batch", "group"):
        raise ValueError(f"net.norm={norm!r} is not one of ['batch', 'group']")
    if norm == "group" and any(c % groups for c in channels):
        raise ValueError(f"net.channels={channels} must be divisible by net.groups={groups}")
