"""The diagonal Gaussian posterior q(z | x) of a VAE (Kingma & Welling 2014)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOGVAR_RANGE = (-30.0, 20.0)  # clamped as latent diffusion's autoencoder does: exp stays finite


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over latents ``(B, C, h, w)``, from an encoder output with
    ``2C`` channels (mean first, then log-variance).

    ``kl()`` is KL(q ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²) per sample, in nats (B,).
    """

    def __init__(self, moments: Tensor):
        if moments.dim() != 4 or moments.shape[1] % 2:
            raise ValueError(
                f"a diagonal Gaussian needs (B, 2C, h, w) moments, got {tuple(moments.shape)}"
            )
        mean, logvar = moments.float().chunk(2, dim=1)
        self.mean, self.logvar = mean, logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = μ + σ ε, ε ~ N(0, I) (the reparametrization trick)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The mean, the deterministic code used to reconstruct and to encode for LDM."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q ‖ N(0, I)) per sample (B,), in nats."""
        kl = self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar
        return 0.5 * kl.flatten(1).sum(dim=1)

    def nll(self, z: Tensor) -> Tensor:
        """−log q(z) per sample (B,), in nats."""
        log_p = -0.5 * (
            math.log(2 * math.pi) + self.logvar + (z - self.mean).pow(2) / self.logvar.exp()
        )
        return -log_p.flatten(1).sum(dim=1)
