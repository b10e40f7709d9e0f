"""An image encoder for contrastive text-image models: a small ResNet that maps images to vectors.

CLIP's image towers (Radford et al. 2021, §2.4) are a ResNet whose global average pooling is
replaced by attention pooling, or a ViT. At the project's sizes (16-64 px, minutes on a CPU) this
is a ResNet in the UNet's vocabulary: a stem convolution, pre-activation residual blocks
(GroupNorm-SiLU-conv twice), stride-2 convolutions between levels, optional self-attention at
chosen levels, then GroupNorm-SiLU and a global pooling to one vector of ``out_dim`` =
``channels[-1]`` features. The pooling is CLIP's attention pooling (``nn.classifier.
AttentionPool``: the mean of the feature map attends to every pixel) or the plain mean. Optional
coordinate channels (Liu et al. 2018, CoordConv) let the features say where an object is, which
the shapes captions ("at the top left") need and which no pooling recovers otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from genlab.nn.attention import AttentionImpl, SpatialAttention
from genlab.nn.blocks import ResidualBlock
from genlab.nn.classifier import AttentionPool, Pooling
from genlab.nn.unet import check_levels, coordinate_channels


class ImageEncoder(nn.Module):
    """Images ``(B, C, H, W)`` → feature vectors ``(B, out_dim)``; runs at any resolution.

    Args:
        in_channels: image channels.
        channels: feature channels per level; each level after the first halves H and W.
        res_blocks: residual blocks per level.
        attention_levels: indices of levels ending with self-attention over their pixels.
        heads: attention heads (self-attention and attention pooling).
        pool: ``"attention"`` (CLIP's attention pooling) or ``"mean"`` (global average).
        dropout, groups: as in the UNet's residual blocks.
        coord_channels: append the two pixel-coordinate channels to the input.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        channels: tuple[int, ...] | list[int] = (32, 64, 128),
        res_blocks: int = 1,
        attention_levels: tuple[int, ...] | list[int] = (),
        heads: int = 4,
        pool: Pooling = "attention",
        dropout: float = 0.0,
        groups: int = 8,
        coord_channels: bool = True,
        attn_impl: AttentionImpl = "auto",
    ):
        super().__init__()
        channels = check_levels("image encoder", channels, attention_levels, groups)
        if pool not in ("mean", "attention"):
            raise ValueError(f"image encoder pool={pool!r} is not one of ['attention', 'mean']")
        if res_blocks < 1:
            raise ValueError(f"image encoder res_blocks={res_blocks} must be at least 1")
        self.coord_channels, self.out_dim = coord_channels, channels[-1]
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels + 2 * coord_channels, channels[0], 3, padding=1)
        ]
        c = channels[0]
        for level, ch in enumerate(channels):
            if level > 0:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # H, W halved
            for _ in range(res_blocks):
                layers.append(ResidualBlock(c, ch, groups=groups, dropout=dropout))
                c = ch
            if level in attention_levels:
                layers.append(SpatialAttention(c, heads=heads, groups=groups, impl=attn_impl))
        layers += [nn.GroupNorm(groups, c), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.pool = AttentionPool(c, heads=heads, impl=attn_impl) if pool == "attention" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) → (B, out_dim)."""
        if self.coord_channels:
            x = torch.cat([x, coordinate_channels(x)], dim=1)  # (B, C + 2, H, W)
        h = self.trunk(x)  # (B, out_dim, H / 2^(L-1), W / 2^(L-1))
        return h.mean(dim=(2, 3)) if self.pool is None else self.pool(h)
