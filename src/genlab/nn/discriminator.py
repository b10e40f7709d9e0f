"""The PatchGAN discriminator of pix2pix (Isola et al. 2017, §3.2.2), as VQ-GAN uses it.

A fully convolutional stack of 4×4 convolutions that classifies each overlapping patch of an
image as real or fake and returns the map of patch logits; taming-transformers'
``NLayerDiscriminator`` (Esser et al. 2021, §3.1) with pix2pix's initialisation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Norm = Literal["batch", "group", "none"]
NORMS = ("batch", "group", "none")


def norm_layer(norm: Norm, channels: int, groups: int) -> nn.Module:
    """The normalisation after each inner convolution."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


def receptive_field(layers: int) -> int:
    """Side in pixels of the input square that one patch logit sees: two stride-1 4×4 convs on
    top of ``layers`` stride-2 4×4 convs (pix2pix, App. 6.1.2: 16 for ``layers=1``, 70 for 3,
    286 for 5)."""
    r = 4 + 3  # the two stride-1 4×4 convolutions
    for _ in range(layers):
        r = 2 * r + 2  # (r - 1) · stride + kernel, stride 2, kernel 4
    return r


class PatchDiscriminator(nn.Module):
    """Images ``(B, C, H, W)`` → patch logits ``(B, 1, H/2^layers - 2, W/2^layers - 2)``.

    Each logit sees a ``receptive_field(layers)``-pixel square of the input: 70×70 for the
    default ``layers=3`` (the "70×70 PatchGAN" of Isola et al. 2017), so the logits of a
    256 px image form a 30×30 map, those of a 32 px image 2×2. The first convolution has no
    normalisation; the widths double per block up to ``8 * channels``. Weights start as
    N(0, 0.02), normalisation scales as N(1, 0.02) and biases at 0 (pix2pix, taming).
    With ``norm="batch"`` the statistics are per process; a multi-GPU run that wants them
    synced converts the module with ``nn.SyncBatchNorm.convert_sync_batchnorm``.

    Args:
        in_channels: image channels.
        channels: width of the first convolution.
        layers: number of stride-2 blocks.
        norm: ``"batch"`` (taming), ``"group"`` or ``"none"``.
        groups: GroupNorm groups when ``norm="group"``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        channels: int = 64,
        layers: int = 3,
        norm: Norm = "batch",
        groups: int = 32,
    ):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"discriminator norm={norm!r} is not one of {list(NORMS)}")
        for key, value in dict(in_channels=in_channels, channels=channels, layers=layers).items():
            if value < 1:
                raise ValueError(f"discriminator {key}={value} must be at least 1")
        widths = [channels * min(2**n, 8) for n in range(layers + 1)]
        if norm == "group" and any(w % groups for w in widths[1:]):
            raise ValueError(
                f"discriminator widths {widths[1:]} (from channels={channels}) must all be "
                f"divisible by groups={groups} with norm='group'"
            )
        self.receptive_field = receptive_field(layers)
        self.layers, self.min_size = layers, 3 * 2**layers  # the smallest input with one logit
        bias = norm == "none"  # a normalisation's shift makes a conv bias redundant
        blocks = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, layers + 1):
            stride = 2 if n < layers else 1  # the last block keeps the resolution (-1 px)
            blocks += [
                nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=bias),
                norm_layer(norm, widths[n], groups),
                nn.LeakyReLU(0.2),
            ]
        blocks.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))  # patch logits
        self.net = nn.Sequential(*blocks)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) → (B, 1, H / 2^layers - 2, W / 2^layers - 2) logits."""
        return self.net(x)


def init_weights(module: nn.Module) -> None:
    """pix2pix's initialisation: convolutions N(0, 0.02), norm scales N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
    else:
        return
    if module.bias is not None:
        nn.init.zeros_(module.bias)
