"""VQ-GAN (Esser et al. 2021) and, without adversary and perceptual loss, VQ-VAE (van den Oord
et al. 2017).

x → encoder → 1×1 conv to the code dimension D → nearest of K codes (straight-through) → 1×1
conv → decoder → x̂, trained with L_rec + L_VQ (codebook + β commitment, or the EMA codebook)
and, from ``disc_start``, a PatchGAN adversary weighted by the adaptive λ of Eq. 7 (the loop and
losses are in ``models/autoencoders/first_stage.py``). Codebook practices (EMA, k-means initialisation,
dead-code restarts, l2-normalised codes) are options of ``genlab.nn.quantizers.VectorQuantizer``.

For the methods built on top: ``encode`` gives the continuous latent before quantization and
``decode`` quantizes it first (latent diffusion trains on that latent, "the quantization layer
absorbed into the decoder", Rombach et al. 2022, §3); ``encode_indices`` / ``decode_indices``
give and take the K-ary token map of DALL·E-style priors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from genlab.models.autoencoders.first_stage import AutoencoderOutput, FirstStage
from genlab.nn.quantizers import VectorQuantizer


class VQGAN(FirstStage):
    """Vector-quantized autoencoder with an optional adversary (VQ-GAN) or without (VQ-VAE).

    Args:
        encoder, decoder: ``genlab.nn.autoencoder`` stacks with the same ``latent_channels``.
        quantizer: a ``VectorQuantizer`` whose ``code_dim`` is the latent width D.
        **kwargs: the losses and optimizers of :class:`FirstStage`.
    """

    def __init__(
        self, *, encoder: nn.Module, decoder: nn.Module, quantizer: VectorQuantizer, **kwargs: Any
    ):
        super().__init__(decoder=decoder, **kwargs)
        if encoder.downsample_factor != decoder.downsample_factor:
            raise ValueError(
                f"encoder f={encoder.downsample_factor} and decoder f="
                f"{decoder.downsample_factor} differ: give them the same channels"
            )
        self.encoder, self.quantizer = encoder, quantizer
        d = quantizer.code_dim
        self.quant_conv = nn.Conv2d(encoder.out_channels, d, 1)
        self.post_quant_conv = nn.Conv2d(d, decoder.conv_in.in_channels, 1)
        self.num_codes = quantizer.num_codes
        self.latent_channels = d
        self.init_codebook_metrics()

    # ------------------------------------------------------------------------------------------
    # the first-stage interface
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → continuous latents z_e (B, D, H/f, W/f) before quantization."""
        return self.quant_conv(self.encoder(images))

    def decode(self, latents: torch.Tensor, *, quantize: bool = True) -> torch.Tensor:
        """Latents (B, D, h, w) → images; quantized first unless ``quantize=False``."""
        if quantize:
            latents = self.quantizer(latents).z_q
        return self.decoder(self.post_quant_conv(latents))

    def encode_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Images → code indices (B, H/f, W/f), long."""
        return self.quantizer(self.encode(images)).indices

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) → images (B, C, h·f, w·f), clamped to [-1, 1]."""
        return self.decode(self.quantizer.embed(indices), quantize=False).float().clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """x̂ = decode(quantize(encode(x))) in [-1, 1] (eval mode: no codebook updates)."""
        was_training = self.training
        self.eval()
        try:
            return self.decode(self.encode(images)).float().clamp(-1, 1)
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------------------------------
    # training
    def forward_train(self, images: torch.Tensor) -> AutoencoderOutput:
        q = self.quantizer(self.encode(images))
        reconstruction = self.decoder(self.post_quant_conv(q.z_q))
        logs = {"vq_loss": q.loss, "batch_perplexity": q.perplexity}
        if self.training:
            logs["restarts"] = self.quantizer.restarts.float()
        return AutoencoderOutput(reconstruction, q.loss, logs, q.indices)
