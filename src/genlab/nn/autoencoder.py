"""The convolutional encoder and decoder of the first-stage autoencoders (VAE, VQ-GAN, dVAE).

The design of VQ-GAN (Esser et al. 2021, Fig. 2 and App.) that latent diffusion reuses for its
autoencoders (Rombach et al. 2022, App. G): a stem convolution, pre-activation residual blocks
(GroupNorm-SiLU-conv twice) at each resolution level, optional self-attention at chosen levels, a
stride-2 convolution between levels, a middle of residual-attention-residual at the lowest
resolution, and GroupNorm-SiLU-conv to the latent channels. The decoder mirrors it with
nearest-neighbour ×2 upsampling followed by a 3×3 convolution. The stride-2 convolution pads one
pixel on every side by default; ``downsample_padding="asymmetric"`` pads one pixel after the
last row and column only, as taming-transformers, latent diffusion and diffusers' ``Encoder`` do
(the same parameters; the layout that ``format=diffusers`` exports). ``norm_eps`` is the eps of
every GroupNorm (1e-5, PyTorch's default; taming-transformers and diffusers use 1e-6). Images of ``H × W`` pixels map to
latents of ``H/f × W/f`` with ``f = 2^(len(channels) - 1)``.

The networks know nothing of quantization or sampling: a VAE asks the encoder for
``double_latent`` channels (mean and log-variance), a VQ-GAN quantizes the encoder's output and a
dVAE reads it as logits over its codebook.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from genlab.nn.attention import AttentionImpl, SpatialAttention
from genlab.nn.blocks import ResidualBlock
from genlab.nn.unet import check_levels


def check_args(name: str, channels, attention_levels, groups: int, **positive: int) -> list[int]:
    """``channels`` as a list, after checking the constructor arguments of an encoder/decoder.

    Raises:
        ValueError: naming the argument that is empty, not positive, not divisible by ``groups``
            or an attention level that is not there.
    """
    if len(channels) == 0:
        raise ValueError(f"{name} channels={list(channels)} must name at least one level")
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} {key}={value} must be at least 1")
    return check_levels(name, channels, attention_levels, groups)


DownsamplePadding = Literal["symmetric", "asymmetric"]


class AsymmetricDownsample(nn.Conv2d):
    """A 3×3 stride-2 convolution after padding one zero row and column at the end (bottom,
    right), as taming-transformers' and diffusers' ``Downsample2D(padding=0)``; the parameters
    are those of ``nn.Conv2d(c, c, 3, stride=2, padding=1)``."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1)))


def downsample(channels: int, padding: DownsamplePadding) -> nn.Conv2d:
    """The stride-2 convolution between two encoder levels (module docstring)."""
    if padding == "symmetric":
        return nn.Conv2d(channels, channels, 3, stride=2, padding=1)
    if padding == "asymmetric":
        return AsymmetricDownsample(channels)
    raise ValueError(f"encoder downsample_padding={padding!r}: one of 'symmetric', 'asymmetric'")


def set_norm_eps(module: nn.Module, eps: float) -> None:
    """Give every GroupNorm inside ``module`` this eps."""
    if eps <= 0:
        raise ValueError(f"norm_eps={eps} must be positive")
    for layer in module.modules():
        if isinstance(layer, nn.GroupNorm):
            layer.eps = eps


def level_blocks(c_in, c_out, *, n, attention, heads, groups, dropout, impl) -> list[nn.Module]:
    """``n`` residual blocks from ``c_in`` to ``c_out`` channels, each followed by self-attention
    when ``attention`` (as taming-transformers attends after every block of a level)."""
    layers = []
    for i in range(n):
        layers.append(
            ResidualBlock(c_in if i == 0 else c_out, c_out, groups=groups, dropout=dropout)
        )
        if attention:
            layers.append(SpatialAttention(c_out, heads=heads, groups=groups, impl=impl))
    return layers


def middle(c, *, attention, heads, groups, dropout, impl) -> nn.Sequential:
    """Residual block, self-attention (when ``attention``), residual block at the lowest level."""
    layers = [ResidualBlock(c, c, groups=groups, dropout=dropout)]
    if attention:
        layers.append(SpatialAttention(c, heads=heads, groups=groups, impl=impl))
    layers.append(ResidualBlock(c, c, groups=groups, dropout=dropout))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Images ``(B, C, H, W)`` → latents ``(B, latent_channels, H/f, W/f)`` (Esser et al. 2021).

    Args:
        in_channels: image channels.
        channels: feature channels per level; each level after the first halves H and W, so the
            downsampling factor is ``f = 2^(len(channels) - 1)`` (``downsample_factor``).
        res_blocks: residual blocks per level.
        latent_channels: channels of the latent map.
        double_latent: output ``2 * latent_channels`` (a VAE's mean and log-variance).
        attention_levels: indices of levels whose residual blocks are followed by self-attention.
        mid_attention: self-attention between the two residual blocks of the middle.
        groups: GroupNorm groups; every entry of ``channels`` must be divisible by it.
        dropout: dropout inside the residual blocks.
        heads: attention heads (taming-transformers uses one).
        attn_impl: attention implementation (see ``nn.attention.attention``).
        downsample_padding: ``symmetric`` (one pixel on every side) or ``asymmetric`` (one after
            the last row and column: taming-transformers, latent diffusion, diffusers).
        norm_eps: the eps of every GroupNorm (taming-transformers and diffusers: 1e-6).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        channels: tuple[int, ...] | list[int] = (64, 128, 256),
        res_blocks: int = 1,
        latent_channels: int = 4,
        double_latent: bool = False,
        attention_levels: tuple[int, ...] | list[int] = (),
        mid_attention: bool = True,
        groups: int = 32,
        dropout: float = 0.0,
        heads: int = 1,
        attn_impl: AttentionImpl = "auto",
        downsample_padding: DownsamplePadding = "symmetric",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        channels = check_args(
            "encoder",
            channels,
            attention_levels,
            groups,
            in_channels=in_channels,
            res_blocks=res_blocks,
            latent_channels=latent_channels,
        )
        self.downsample_factor = 2 ** (len(channels) - 1)
        self.downsample_padding = downsample_padding
        self.out_channels = latent_channels * (2 if double_latent else 1)
        common = dict(heads=heads, groups=groups, dropout=dropout, impl=attn_impl)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        c = channels[0]
        for level, ch in enumerate(channels):
            layers = level_blocks(
                c, ch, n=res_blocks, attention=level in attention_levels, **common
            )
            if level < len(channels) - 1:
                layers.append(downsample(ch, downsample_padding))  # H, W halved
            self.down.append(nn.Sequential(*layers))
            c = ch
        self.mid = middle(c, attention=mid_attention, **common)
        self.conv_out = nn.Sequential(
            nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, self.out_channels, 3, padding=1)
        )
        set_norm_eps(self, norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) → (B, latent_channels [× 2], H / f, W / f)."""
        h = self.conv_in(x)  # (B, channels[0], H, W)
        for level in self.down:
            h = level(h)
        return self.conv_out(self.mid(h))


class Decoder(nn.Module):
    """Latents ``(B, latent_channels, h, w)`` → images ``(B, C, h·f, w·f)``, the encoder's mirror.

    Each level has ``res_blocks + 1`` residual blocks, one more than the encoder's, as in
    taming-transformers and latent diffusion; levels run from the deepest (``channels[-1]``) to
    the first, each but the last followed by nearest-neighbour ×2 upsampling and a 3×3 conv.

    Args:
        out_channels: image channels.
        channels, res_blocks, latent_channels, attention_levels, mid_attention, groups, dropout,
            heads, attn_impl, norm_eps: as in ``Encoder`` (the same values give the mirror
            network).
    """

    def __init__(
        self,
        *,
        out_channels: int = 3,
        channels: tuple[int, ...] | list[int] = (64, 128, 256),
        res_blocks: int = 1,
        latent_channels: int = 4,
        attention_levels: tuple[int, ...] | list[int] = (),
        mid_attention: bool = True,
        groups: int = 32,
        dropout: float = 0.0,
        heads: int = 1,
        attn_impl: AttentionImpl = "auto",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        channels = check_args(
            "decoder",
            channels,
            attention_levels,
            groups,
            out_channels=out_channels,
            res_blocks=res_blocks,
            latent_channels=latent_channels,
        )
        self.downsample_factor = 2 ** (len(channels) - 1)
        common = dict(heads=heads, groups=groups, dropout=dropout, impl=attn_impl)
        c = channels[-1]
        self.conv_in = nn.Conv2d(latent_channels, c, 3, padding=1)
        self.mid = middle(c, attention=mid_attention, **common)
        up = []  # up[level] as in the encoder; forward runs them deepest first
        for level, ch in reversed(list(enumerate(channels))):
            attention = level in attention_levels
            layers = level_blocks(c, ch, n=res_blocks + 1, attention=attention, **common)
            if level > 0:
                layers += [
                    nn.Upsample(scale_factor=2.0, mode="nearest"),
                    nn.Conv2d(ch, ch, 3, padding=1),
                ]
            up.insert(0, nn.Sequential(*layers))
            c = ch
        self.up = nn.ModuleList(up)
        self.conv_out = nn.Sequential(
            nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, out_channels, 3, padding=1)
        )
        set_norm_eps(self, norm_eps)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight of the final convolution, where VQ-GAN's adaptive weight λ takes the
        gradients of the reconstruction and adversarial losses (Esser et al. 2021, Eq. 7)."""
        return self.conv_out[-1].weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, latent_channels, h, w) → (B, C, h · f, w · f)."""
        h = self.mid(self.conv_in(z))  # (B, channels[-1], h, w)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(h)
