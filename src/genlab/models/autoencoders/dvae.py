"""DALL·E's discrete VAE (Ramesh et al. 2021, §2.1 and App. A).

The encoder gives K logits per position of an H/f × W/f grid; training relaxes the categorical
posterior with the Gumbel-softmax (Jang et al. 2017; Maddison et al. 2017): y = softmax((logits
+ g) / τ), the decoder reads Σ_k y_k e_k, and the loss is

    L = L_rec + kl_weight(step) · KL(q(· | x) ‖ U(K)) · (h·w) / (C·H·W)

with τ = ``temperature(step)`` annealed (1 → 1/16 with a half-cosine in the paper) and the KL
weight raised on its own schedule (0 → 6.6 in the paper, which found the higher weight improves
codebook usage). The KL is in nats per latent position (``GumbelQuantizer``); the factor puts the
image's total KL on the per-pixel scale of L_rec, as for the VAE (``models/autoencoders/vae.py``). With
``hard`` the decoder reads the one-hot code in the forward pass and the relaxed one in the
backward pass (straight-through Gumbel). In evaluation the code is the argmax, so
``encode`` gives token indices and ``decode`` takes them, as DALL·E's transformer uses them.

Departure from the paper, on purpose: the reconstruction term is the per-pixel L1/L2 error of
the shared first-stage loss (optionally with LPIPS and an adversary) instead of DALL·E's
logit-Laplace likelihood; the weights above are therefore not the paper's numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from genlab.models.autoencoders.first_stage import AutoencoderOutput, FirstStage
from genlab.nn.quantizers import GumbelQuantizer
from genlab.utils.ramps import Ramp


class DVAE(FirstStage):
    """Discrete VAE with a Gumbel-softmax relaxation, its temperature and KL weight scheduled.

    Args:
        encoder: a ``genlab.nn.autoencoder.Encoder`` whose ``latent_channels`` is K (logits).
        decoder: a ``Decoder`` whose ``latent_channels`` is the code dimension D.
        quantizer: a ``GumbelQuantizer`` with K codes of dimension D (``hard`` for
            straight-through).
        temperature: τ over training steps (a ``Ramp`` or a constant).
        kl_weight: the KL weight over training steps (a ``Ramp`` or a constant).
        **kwargs: the losses and optimizers of :class:`FirstStage`.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        decoder: nn.Module,
        quantizer: GumbelQuantizer,
        temperature: float | Ramp = 1.0,
        kl_weight: float | Ramp = 0.0,
        **kwargs: Any,
    ):
        super().__init__(decoder=decoder, **kwargs)
        if encoder.out_channels != quantizer.num_codes:
            raise ValueError(
                f"model.encoder gives {encoder.out_channels} channels, but the dVAE needs one "
                f"logit per code: set its latent_channels to num_codes={quantizer.num_codes}"
            )
        if decoder.conv_in.in_channels != quantizer.code_dim:
            raise ValueError(
                f"model.decoder reads {decoder.conv_in.in_channels} latent channels, but the codes"
                f" have code_dim={quantizer.code_dim}"
            )
        if encoder.downsample_factor != decoder.downsample_factor:
            raise ValueError("model.encoder and model.decoder have different downsampling factors")
        self.encoder, self.quantizer = encoder, quantizer
        self.temperature = temperature if isinstance(temperature, Ramp) else Ramp(temperature)
        self.kl_weight = kl_weight if isinstance(kl_weight, Ramp) else Ramp(float(kl_weight))
        self.num_codes = quantizer.num_codes
        self.latent_channels = quantizer.code_dim
        self.init_codebook_metrics()

    # ------------------------------------------------------------------------------------------
    # the first-stage interface
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → logits over the K codes (B, K, H/f, W/f)."""
        return self.encoder(images)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images → token indices (B, H/f, W/f), long: the argmax code per position."""
        return self.logits(images).argmax(dim=1)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Token indices (B, h, w) → images (B, C, h·f, w·f) in [-1, 1]."""
        return self.decoder(self.quantizer.embed(indices)).float().clamp(-1, 1)

    encode_indices = encode  # the token interface DALL·E shares with VQ-GAN
    decode_indices = decode

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """x̂ = decode(encode(x)): the hard code of every position, decoded."""
        return self.decode(self.encode(images))

    # ------------------------------------------------------------------------------------------
    # training
    def forward_train(self, images: torch.Tensor) -> AutoencoderOutput:
        """Training: τ and the KL weight of this step. Evaluation (hard codes, no noise): the
        final KL weight, so that ``val/loss`` means the same at every step."""
        step = self.global_step
        tau = self.temperature(step)
        q = self.quantizer(self.logits(images), tau)
        weight = self.kl_weight(step) if self.training else self.kl_weight.final
        h, w = q.indices.shape[-2:]
        regularization = weight * q.loss * (h * w) / images[0].numel()
        logs = {"kl": q.loss, "batch_perplexity": q.perplexity}
        if self.training:
            logs |= {"kl_weight": torch.tensor(weight), "temperature": torch.tensor(tau)}
        return AutoencoderOutput(self.decoder(q.z_q), regularization, logs, q.indices)
