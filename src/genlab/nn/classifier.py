"""The noisy-image classifier of Dhariwal & Nichol 2021 (§4, App. A): the UNet's encoder half.

A stem convolution, residual blocks conditioned on the timestep by scale-shift (the UNet's
``ResBlock``), stride-2 downsampling between levels, a middle block, then GroupNorm-SiLU, a
pooling over pixels and a linear head to class logits. Dhariwal & Nichol (§4) take the UNet's
downsampling trunk and pool its 8×8 output with attention (CLIP's attention pool);
``pool="attention"`` here lets the mean of the feature map attend to every pixel, without CLIP's
learned positional table, so the network runs at any resolution (the optional coordinate
channels carry position instead). Like the UNet, the network knows nothing of noise schedules:
it reads x_t and the model time t.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from genlab.nn.attention import AttentionImpl, attention, merge_heads, split_heads
from genlab.nn.embeddings import TimestepEmbedding
from genlab.nn.unet import AttentionBlock, Level, check_levels, coordinate_channels

Pooling = Literal["mean", "attention"]


class AttentionPool(nn.Module):
    """One query, the mean of the feature map, attends to [mean; pixels] (the attention pooling
    of CLIP's ResNet, Radford et al. 2021, used by Dhariwal & Nichol 2021, App. A)."""

    def __init__(self, channels: int, *, heads: int, impl: AttentionImpl = "auto"):
        super().__init__()
        if channels % heads:
            raise ValueError(
                f"attention pooling channels={channels} not divisible by heads={heads}"
            )
        self.heads, self.impl = heads, impl
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(channels, 2 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) → (B, C)."""
        pixels = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = torch.cat([pixels.mean(dim=1, keepdim=True), pixels], dim=1)  # (B, 1 + HW, C)
        k, v = self.to_kv(tokens).chunk(2, dim=-1)
        q, k, v = (split_heads(z, self.heads) for z in (self.to_q(tokens[:, :1]), k, v))
        pooled = merge_heads(attention(q, k, v, impl=self.impl))  # (B, 1, C)
        return self.out(pooled[:, 0])


class NoisyClassifierNet(nn.Module):
    """Class logits of a noisy image x_t at model time t: the encoder half of ``genlab.nn.unet``.

    Args:
        in_channels: image channels.
        num_classes: number of classes (logits).
        channels: feature channels per level; each level after the first halves H and W.
        res_blocks: residual blocks per level.
        attention_levels: indices of levels with self-attention; the middle block has it when
            ``mid_attention``.
        heads: attention heads (self-attention and attention pooling).
        pool: ``"attention"`` (Dhariwal & Nichol 2021) or ``"mean"`` (global average) pooling.
        dropout, groups: as in the UNet's residual blocks.
        coord_channels: append the two pixel-coordinate channels to the input.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        channels: tuple[int, ...] | list[int] = (32, 64, 128),
        res_blocks: int = 1,
        attention_levels: tuple[int, ...] | list[int] = (),
        mid_attention: bool = False,
        heads: int = 4,
        pool: Pooling = "attention",
        dropout: float = 0.0,
        groups: int = 8,
        coord_channels: bool = True,
        attn_impl: AttentionImpl = "auto",
    ):
        super().__init__()
        channels = check_levels("classifier", channels, attention_levels, groups)
        if pool not in ("mean", "attention"):
            raise ValueError(f"pool={pool!r} is not one of ['attention', 'mean']")
        self.num_classes, self.coord_channels = num_classes, coord_channels
        self.out_dim = num_classes  # the output width: logits, or a noise-aware CLIP's features
        emb_dim = 4 * channels[0]
        self.time_embed = TimestepEmbedding(channels[0], emb_dim)

        def level(c_in: int, c_out: int, with_attention: bool) -> Level:
            attn = None
            if with_attention:
                attn = AttentionBlock(
                    c_out, heads=heads, context_dim=None, groups=groups, impl=attn_impl
                )
            return Level(c_in, c_out, emb_dim=emb_dim, groups=groups, dropout=dropout, attn=attn)

        self.stem = nn.Conv2d(in_channels + 2 * coord_channels, channels[0], 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        c = channels[0]
        for i, ch in enumerate(channels):
            blocks = [
                level(c if j == 0 else ch, ch, i in attention_levels) for j in range(res_blocks)
            ]
            self.down.append(nn.ModuleList(blocks))
            c = ch
            if i < len(channels) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = level(c, c, mid_attention)
        self.norm = nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU())
        self.pool = AttentionPool(c, heads=heads, impl=attn_impl) if pool == "attention" else None
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,) model times, integer or fractional → logits (B, num_classes)."""
        emb = self.time_embed(t)  # (B, emb_dim)
        if self.coord_channels:
            x = torch.cat([x, coordinate_channels(x)], dim=1)  # (B, C + 2, H, W)
        h = self.stem(x)
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb, None, None)  # (B, C_i, H / 2^i, W / 2^i)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.norm(self.mid(h, emb, None, None))
        pooled = h.mean(dim=(2, 3)) if self.pool is None else self.pool(h)  # (B, C_last)
        return self.head(pooled)
