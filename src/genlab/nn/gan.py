"""The networks of a DCGAN (Radford et al. 2016) with a projection discriminator (Miyato & Koyama
2018), and the R1 gradient penalty (Mescheder et al. 2018).

* :class:`DCGANGenerator`: z (+ a condition vector) → a 4×4 map → upsampling blocks that halve
  the width and double the side (transposed 4×4 convolutions, or nearest upsampling + 3×3
  convolution), each with BatchNorm or GroupNorm and ReLU → an image through tanh. A condition
  is concatenated to z (conditional GAN, Mirza & Osindero 2014) and, with ``cond_norm``, also
  predicts the scale and shift of every normalisation (conditional batch normalisation,
  de Vries et al. 2017, as in Miyato & Koyama's generator).
* :class:`DCGANDiscriminator`: strided 4×4 convolutions with LeakyReLU(0.2) down to a 4×4 map
  whose flattened features φ(x) give the logit

      D(x, y) = ψ(φ(x)) + ⟨V y, φ(x)⟩          (Miyato & Koyama 2018, Eq. 3)

  ψ a linear score and V a linear map of the condition vector y (for a one-hot class, V y is a
  row of the class embedding). φ(x) keeps the 4×4 layout (DCGAN's last 4×4 convolution is this
  linear map of the flattened features), so the projection can check *where* a caption's
  objects are, which a globally pooled φ could not.
* :func:`r1_penalty`: ‖∇ₓ D(x)‖² per sample, on real images.

Notation: ``z_dim`` is the latent size, ``cond_dim`` the size of y (0: unconditional).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

Norm = Literal["batch", "group", "none"]
NORMS = ("batch", "group", "none")
Upsample = Literal["transposed", "nearest"]
BASE_SIZE = 4  # the side of the first (generator) and last (discriminator) feature map


def check_layout(name: str, image_size: int, channels: Sequence[int]) -> None:
    """``image_size`` must be 4 · 2^len(channels): one stride-2 step per width."""
    if not channels or any(c < 1 for c in channels):
        raise ValueError(f"{name}.channels={list(channels)} must be a non-empty list of ints >= 1")
    expected = BASE_SIZE * 2 ** len(channels)
    if image_size != expected:
        steps = math.log2(image_size / BASE_SIZE) if image_size >= BASE_SIZE else -1
        fix = f"give {int(steps)} widths" if steps >= 1 and steps.is_integer() else "no list fits"
        raise ValueError(
            f"{name}.channels={list(channels)}: {len(channels)} stride-2 steps from a "
            f"{BASE_SIZE}x{BASE_SIZE} map make {expected} px images, not image_size={image_size}"
            f" ({fix}; the size must be 4 x a power of 2)"
        )


def normalization(norm: Norm, channels: int, groups: int, *, affine: bool) -> nn.Module:
    """BatchNorm (DCGAN), GroupNorm (batch-independent: samples do not depend on the batch) or
    nothing, after a convolution."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r} is not one of {list(NORMS)}")
    if norm == "batch":
        return nn.BatchNorm2d(channels, affine=affine)
    if norm == "group":
        if channels % groups:
            raise ValueError(f"norm='group': width {channels} is not divisible by groups={groups}")
        return nn.GroupNorm(groups, channels, affine=affine)
    return nn.Identity()


class ConditionalNorm(nn.Module):
    """A normalisation whose per-channel scale 1 + γ(y) and shift β(y) are linear in the
    condition y (de Vries et al. 2017); with ``cond_dim=0`` a plain learned affine one.

    γ and β start at zero, so the layer starts as the plain normalisation.
    """

    def __init__(self, norm: Norm, channels: int, cond_dim: int, groups: int):
        super().__init__()
        self.norm = normalization(norm, channels, groups, affine=cond_dim == 0)
        self.gain = nn.Linear(cond_dim, channels) if cond_dim else None
        self.bias = nn.Linear(cond_dim, channels) if cond_dim else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """x: (B, C, H, W), cond: (B, cond_dim) or None → (B, C, H, W)."""
        x = self.norm(x)
        if self.gain is None:
            return x
        gain = 1 + self.gain(cond)[..., None, None]  # (B, C, 1, 1)
        return x * gain + self.bias(cond)[..., None, None]

    def zero_init(self) -> None:
        if self.gain is not None:
            for layer in (self.gain, self.bias):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)


def upsampling(upsample: Upsample, c_in: int, c_out: int) -> nn.Module:
    """×2 upsampling convolution: DCGAN's transposed 4×4 one, or nearest + 3×3 convolution
    (Odena et al. 2016, which avoids the checkerboard artefacts of the former)."""
    if upsample == "transposed":
        return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)
    if upsample == "nearest":
        return nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(c_in, c_out, 3, padding=1))
    raise ValueError(f"generator upsample={upsample!r} must be transposed or nearest")


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation (Radford et al. 2016, §4): weights N(0, 0.02), norm scales
    N(1, 0.02), biases 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm) and module.weight is not None:
        nn.init.normal_(module.weight, 1.0, 0.02)
    else:
        return
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


class DCGANGenerator(nn.Module):
    """z (B, z_dim) [+ y (B, cond_dim)] → images (B, out_channels, image_size, image_size) in
    (-1, 1).

    Widths ``channels[i]`` at sides 4 · 2^i; a last upsampling convolution to ``out_channels``
    and tanh, without normalisation (Radford et al. 2016, §3). A model builds it from a partial
    config, filling in ``image_size``, ``out_channels`` and ``cond_dim``.

    Args:
        z_dim: size of the latent z ~ N(0, I) (100 in DCGAN).
        channels: widths from the 4×4 map up; ``image_size = 4 · 2^len(channels)``.
        image_size, out_channels: the images made.
        cond_dim: size of the condition vector y (0: unconditional).
        norm: ``"batch"`` (DCGAN), ``"group"`` or ``"none"``.
        groups: GroupNorm groups.
        upsample: ``"transposed"`` (DCGAN) or ``"nearest"``.
        cond_norm: y also sets the scale and shift of every normalisation (else only
            concatenated to z).
    """

    def __init__(
        self,
        *,
        z_dim: int = 128,
        channels: Sequence[int] = (256, 128, 64),
        image_size: int = 32,
        out_channels: int = 3,
        cond_dim: int = 0,
        norm: Norm = "batch",
        groups: int = 32,
        upsample: Upsample = "transposed",
        cond_norm: bool = True,
    ):
        super().__init__()
        check_layout("model.generator", image_size, channels)
        if z_dim < 1 or cond_dim < 0:
            raise ValueError(
                f"model.generator: z_dim={z_dim} must be >= 1, cond_dim={cond_dim} >= 0"
            )
        self.z_dim, self.cond_dim, self.image_size = z_dim, cond_dim, image_size
        self.channels = list(channels)
        norm_cond = cond_dim if cond_norm else 0
        self.input = nn.Linear(z_dim + cond_dim, self.channels[0] * BASE_SIZE**2)
        self.norms = nn.ModuleList(
            [ConditionalNorm(norm, c, norm_cond, groups) for c in self.channels]
        )
        self.ups = nn.ModuleList(
            [upsampling(upsample, a, b) for a, b in zip(self.channels, self.channels[1:])]
        )
        self.output = upsampling(upsample, self.channels[-1], out_channels)
        self.apply(dcgan_init)
        for layer in self.norms:
            layer.zero_init()

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, z_dim), cond: (B, cond_dim) or None → (B, out_channels, H, W) in (-1, 1)."""
        if self.cond_dim and cond is None:
            raise ValueError(f"this generator is conditional: pass cond of size {self.cond_dim}")
        inputs = torch.cat([z, cond.to(z.dtype)], dim=1) if self.cond_dim else z
        h = self.input(inputs).view(len(z), self.channels[0], BASE_SIZE, BASE_SIZE)  # (B, C0, 4, 4)
        h = torch.relu(self.norms[0](h, cond))
        for up, norm in zip(self.ups, self.norms[1:], strict=True):
            h = torch.relu(norm(up(h), cond))  # (B, C_i, 4·2^i, 4·2^i)
        return torch.tanh(self.output(h))


class DCGANDiscriminator(nn.Module):
    """Images (B, C, H, W) [+ y (B, cond_dim)] → logits (B,), with the projection term
    ⟨V y, φ(x)⟩ when conditional (Miyato & Koyama 2018).

    Widths ``channels[i]`` at sides H / 2^(i+1), each reached by a stride-2 4×4 convolution; the
    first without normalisation (Radford et al. 2016, §3); φ(x) = the flattened 4×4 map of
    ``channels[-1]`` widths. A model builds it from a partial config, filling in
    ``image_size``, ``in_channels`` and ``cond_dim``.

    Args:
        channels: widths after each stride-2 convolution; ``image_size = 4 · 2^len(channels)``.
        image_size, in_channels: the images judged.
        cond_dim: size of the condition vector y (0: unconditional, no projection).
        norm: ``"batch"`` (DCGAN), ``"group"`` or ``"none"`` (with an R1 penalty, which should
            see each sample on its own, not through batch statistics).
        groups: GroupNorm groups.
        spectral_norm: spectral normalisation of every weight (Miyato et al. 2018), as in the
            projection discriminator's paper.
    """

    def __init__(
        self,
        *,
        channels: Sequence[int] = (64, 128, 256),
        image_size: int = 32,
        in_channels: int = 3,
        cond_dim: int = 0,
        norm: Norm = "batch",
        groups: int = 32,
        spectral_norm: bool = False,
    ):
        super().__init__()
        check_layout("model.discriminator", image_size, channels)
        self.cond_dim, self.image_size, self.norm = cond_dim, image_size, norm
        widths = [in_channels, *channels]
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            conv = nn.Conv2d(a, b, 4, stride=2, padding=1)
            blocks += [conv] if i == 0 else [conv, normalization(norm, b, groups, affine=True)]
            blocks.append(nn.LeakyReLU(0.2))
        self.features = nn.Sequential(*blocks)
        self.feature_dim = channels[-1] * BASE_SIZE**2
        self.score = nn.Linear(self.feature_dim, 1)  # ψ
        self.embed = nn.Linear(cond_dim, self.feature_dim, bias=False) if cond_dim else None  # V
        self.apply(dcgan_init)
        if spectral_norm:
            for module in self.modules():
                if isinstance(module, nn.Conv2d | nn.Linear):
                    nn.utils.parametrizations.spectral_norm(module)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W), cond: (B, cond_dim) or None → logits (B,)."""
        phi = self.features(x).flatten(1)  # (B, C_last · 4 · 4)
        logits = self.score(phi).squeeze(1)  # (B,)
        if self.embed is None:
            return logits
        if cond is None:
            raise ValueError(
                f"this discriminator is conditional: pass cond of size {self.cond_dim}"
            )
        return logits + (self.embed(cond.to(phi.dtype)) * phi).sum(1)  # Eq. 3


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """‖∇ₓ D(x)‖² per real sample, shape (B,) (Mescheder et al. 2018, Eq. 9 without γ/2).

    ``real`` must require grad and ``real_logits`` (B,) be computed from it, each logit from its
    own sample only (no batch statistics in D). The graph is kept (``create_graph``), so the
    penalty's own backward trains the discriminator.
    """
    dtype = torch.promote_types(real_logits.dtype, torch.float32)  # at least float32
    (grad,) = torch.autograd.grad(real_logits.to(dtype).sum(), real, create_graph=True)
    return grad.to(dtype).square().flatten(1).sum(1)
