"""Variational autoencoder (Kingma & Welling 2014): the classic generative VAE and the
KL-regularized autoencoder of latent diffusion (Rombach et al. 2022, App. G).

The encoder gives the mean and log-variance of q(z | x) = N(μ, diag σ²) over a latent map of
``latent_channels × H/f × W/f``; training decodes a reparametrized sample z = μ + σ ε and minimises

    L = L_rec + kl_weight · KL(q(z | x) ‖ N(0, I)) / (C·H·W)  [+ λ · w_adv · L_adv]

where L_rec is the per-pixel error plus the weighted perceptual distance (``models/first_stage``).
Dividing the KL (nats per image) by the image's C·H·W dimensions puts it on the per-pixel scale of
L_rec, so ``kl_weight`` means what it means in latent diffusion's autoencoder, whose loss is the
per-image sum of both (kl_weight = 1e-6 there). With an L2 error this is the negative ELBO of a
Gaussian decoder of variance σ² = kl_weight / 2 per pixel, up to a constant and a factor: the
classic β-VAE at kl_weight = 2σ² · β. A ``Ramp`` warms the weight up if asked (Bowman et al.
2016). ``generate`` decodes z ~ N(0, I): sensible for a generative VAE, a blur of shapes for a
latent-diffusion autoencoder whose posterior is far from the prior.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from genlab.models.autoencoders.first_stage import AutoencoderOutput, FirstStage
from genlab.models.contract import SamplingOptions, check_no_prompts
from genlab.nn.distributions import DiagonalGaussian
from genlab.utils.ramps import Ramp


class VAE(FirstStage):
    """Convolutional VAE with a configurable downsampling factor f and latent channels.

    Args:
        encoder: a ``genlab.nn.autoencoder.Encoder`` with ``double_latent=True``.
        decoder: the matching ``Decoder``.
        kl_weight: the KL weight (a float, or a ``Ramp`` over training steps).
        sample_posterior: decode a sample of q(z | x) in training (False: its mean, an
            autoencoder with a KL penalty only).
        sample_batch_size: most images decoded at once by ``generate``.
        **kwargs: the losses and optimizers of :class:`FirstStage`.
    """

    condition = "none"
    capabilities = frozenset({"generate", "reconstruct"})
    sampling_keys = frozenset({"temperature"})

    def sampling_options(self, *, temperature: float | None = None) -> SamplingOptions:
        """Decoding prior samples has one option, the prior's temperature (the contract)."""
        return SamplingOptions(extra={} if temperature is None else {"temperature": temperature})

    def __init__(
        self,
        *,
        encoder: nn.Module,
        decoder: nn.Module,
        kl_weight: float | Ramp = 1e-6,
        sample_posterior: bool = True,
        sample_batch_size: int = 256,
        **kwargs: Any,
    ):
        super().__init__(decoder=decoder, **kwargs)
        latent = decoder.conv_in.in_channels
        if encoder.out_channels != 2 * latent:
            raise ValueError(
                f"model.encoder gives {encoder.out_channels} channels; a VAE needs 2 x "
                f"latent_channels = {2 * latent} (mean and log-variance): set double_latent: true"
            )
        if encoder.downsample_factor != decoder.downsample_factor:
            raise ValueError("model.encoder and model.decoder have different downsampling factors")
        self.encoder = encoder
        self.kl_weight = kl_weight if isinstance(kl_weight, Ramp) else Ramp(float(kl_weight))
        self.sample_posterior = sample_posterior
        self.sample_batch_size = sample_batch_size
        self.latent_channels = latent

    # ------------------------------------------------------------------------------------------
    # the first-stage interface
    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """Images (B, C, H, W) → the posterior q(z | x) over (B, latent_channels, H/f, W/f)."""
        return DiagonalGaussian(self.encoder(images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent_channels, h, w) → images (B, C, h·f, w·f), unclamped."""
        return self.decoder(latents)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """x̂ = decode(mean of q(z | x)) in [-1, 1]."""
        return self.decode(self.encode(images).mode()).float().clamp(-1, 1)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | None = None,
        *,
        n: int | None = None,
        labels: Any = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        **unused: Any,
    ) -> torch.Tensor:
        """Decode ``n`` latents z ~ N(0, temperature² I) into images in [-1, 1]."""
        check_no_prompts(prompts, "a VAE")
        if n is None or n < 1:
            raise ValueError(f"a VAE draws n >= 1 images from its prior (got n={n})")
        shape = (n, self.latent_channels, self.latent_size, self.latent_size)
        device = "cpu" if generator is None else generator.device
        z = torch.randn(shape, generator=generator, device=device) * temperature
        chunks = [
            self.decode(z[i : i + self.sample_batch_size].to(self.device)).float().cpu()
            for i in range(0, n, self.sample_batch_size)
        ]
        return torch.cat(chunks).clamp(-1, 1)

    # ------------------------------------------------------------------------------------------
    # training
    def forward_train(self, images: torch.Tensor) -> AutoencoderOutput:
        posterior = self.encode(images)
        z = posterior.sample() if self.training and self.sample_posterior else posterior.mode()
        kl = posterior.kl().mean()  # nats per image
        # evaluation uses the final weight, so that val/loss means the same at every step
        weight = self.kl_weight(self.global_step) if self.training else self.kl_weight.final
        regularization = weight * kl / images[0].numel()
        logs = {"kl": kl}
        if self.training:
            logs["kl_weight"] = torch.tensor(weight)
        return AutoencoderOutput(self.decode(z), regularization, logs)
