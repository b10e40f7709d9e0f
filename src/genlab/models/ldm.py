"""Latent diffusion (Rombach et al. 2022): the diffusion model of ``models/diffusion_model.py``
run in the latent space of a frozen first stage (a ``vae`` or ``vqgan`` checkpoint).

* The first stage is rebuilt from its checkpoint alone (``genlab.load``), frozen (no gradient,
  eval mode, outside the optimizer) and kept out of this model's ``state_dict``: an LDM
  checkpoint stores the first stage's path and the SHA-256 of its file, and loading it needs that
  file again — a missing or changed file fails with a message saying which.
* x0 = scale_factor · z with z a sample of the VAE's posterior (the latent before quantization
  for a VQ-GAN, whose ``decode`` quantizes: "the quantization layer absorbed into the decoder",
  §3 of the paper). ``scale_factor`` is 1 / std of the first training batch's latents unless
  given (their "scale_by_std", App. G), the same on every rank (rank 0's), and saved.
* Sampling draws latents and decodes them: ``generate`` returns images in [-1, 1]. Thresholding
  is off by default (latents are not bounded like pixels); inpainting and bits/dim, which are
  defined in pixel space, are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from genlab.metrics.extractors import file_version
from genlab.models.diffusion_model import DiffusionModel
from genlab.utils.checkpoint import load
from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

FIRST_STAGE_KEY = "genlab_first_stage"


class LDM(DiffusionModel):
    """Latent diffusion on a frozen first stage.

    Args:
        first_stage_ckpt: a ``vae`` or ``vqgan`` checkpoint (``python src/train.py
            experiment=vae_shapes_64``), loaded with ``genlab.load``.
        scale_factor: multiply latents by this; None: 1 / std of the first batch's latents.
        image_size: the images' size in pixels (the diffusion runs at image_size / f).
        channels: the latent channels (must be the first stage's).
        **kwargs: the diffusion model's arguments (:class:`DiffusionModel`).
    """

    config_name = "ldm"

    def __init__(
        self,
        *,
        first_stage_ckpt: str,
        scale_factor: float | None = None,
        image_size: int = 64,
        channels: int = 4,
        **kwargs: Any,
    ):
        first_stage = load_first_stage(first_stage_ckpt)
        f = first_stage.downsample_factor
        if image_size != first_stage.image_size:
            raise ValueError(
                f"model.image_size={image_size} but the first stage {first_stage_ckpt} was "
                f"trained at {first_stage.image_size} px"
            )
        if channels != first_stage.latent_channels:
            raise ValueError(
                f"model.channels={channels} but the first stage's latents have "
                f"{first_stage.latent_channels} channels: set model.channels to that"
            )
        if kwargs.get("bpd_images"):
            raise ValueError("model.bpd_images: bits/dim is a pixel-space bound; set it to 0")
        super().__init__(image_size=image_size // f, channels=channels, **kwargs)
        object.__setattr__(self, "first_stage", first_stage)  # not a submodule: see _apply
        self.first_stage_ckpt = str(first_stage_ckpt)
        self.first_stage_version = file_version(first_stage_ckpt)
        self.pixel_size = image_size
        given = scale_factor is not None
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor or 1.0)))
        self.register_buffer("scale_set", torch.tensor(given))

    # ------------------------------------------------------------------------------------------
    # the frozen first stage
    def _apply(self, fn, recurse=True):
        """Move the first stage with the model (it is not a registered submodule, so that it
        stays out of ``state_dict``, ``parameters`` and ``train()``)."""
        self.first_stage._apply(fn, recurse)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Unscaled latents z of images: a posterior sample (VAE, in training; its mean
        otherwise) or the latent before quantization (VQ-GAN)."""
        encoded = self.first_stage.encode(images)
        if hasattr(encoded, "sample"):
            generator = self.noise_generator if self.training else None
            encoded = encoded.sample(generator) if self.training else encoded.mode()
        return encoded.float()

    def to_diffusion_space(self, images: torch.Tensor) -> torch.Tensor:
        z = self.latents(images)
        if not bool(self.scale_set):
            self.set_scale_factor(z)
        return z * self.scale_factor

    @torch.no_grad()
    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        return self.first_stage.decode(x0.float() / self.scale_factor).float().clamp(-1, 1)

    def set_scale_factor(self, z: torch.Tensor) -> None:
        """scale_factor = 1 / std(z) of this batch, rank 0's value on every rank."""
        std = z.float().std()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            std = trainer.strategy.broadcast(std, src=0)
        self.scale_factor.fill_(1.0 / float(std))
        self.scale_set.fill_(True)
        log.info(f"scale_factor = 1 / std of the first batch's latents = {1 / float(std):.4f}")

    # ------------------------------------------------------------------------------------------
    # checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[FIRST_STAGE_KEY] = {
            "path": self.first_stage_ckpt,
            "version": self.first_stage_version,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(FIRST_STAGE_KEY, {}).get("version")
        if saved is not None and saved != self.first_stage_version:
            raise ValueError(
                f"the first stage {self.first_stage_ckpt} has changed since this LDM was trained "
                f"(sha256 {self.first_stage_version}, trained on {saved}): its latents no longer "
                "match; put the original file back"
            )

    # ------------------------------------------------------------------------------------------
    # what pixel space has and latent space does not
    def generate(self, prompts=None, *, known=None, mask=None, **kwargs) -> torch.Tensor:
        if known is not None:
            raise ValueError("inpainting is defined in pixel space: not available for an LDM")
        return super().generate(prompts, **kwargs)


def load_first_stage(path: str | Path) -> torch.nn.Module:
    """The first stage of a checkpoint, frozen, with a clear error when it is missing or is not
    an autoencoder."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"model.first_stage_ckpt={str(path)!r}: no such file. Train one first (python "
            "src/train.py experiment=vae_shapes_64) or point to an existing vae/vqgan checkpoint"
        )
    module = load(path)
    for attr in ("encode", "decode", "latent_channels", "downsample_factor"):
        if not hasattr(module, attr):
            raise ValueError(
                f"model.first_stage_ckpt={str(path)!r} holds a {type(module).__name__}, not a "
                f"first-stage autoencoder with {attr} (use a vae or vqgan checkpoint)"
            )
    if callable(getattr(module, "encode_indices", None)) and not hasattr(module, "quant_conv"):
        raise ValueError(
            f"model.first_stage_ckpt={str(path)!r} is a dVAE: its tokens have no continuous "
            "latent to diffuse; use a vae or vqgan checkpoint"
        )
    return module.requires_grad_(False).eval()
