"""Spaces: where a diffusion model's data x0 lives, injected into
:class:`~genlab.models.diffusion.model.DiffusionModel`.

* :class:`PixelSpace` — the images themselves (DDPM, Imagen, the unCLIP decoder).
* :class:`LatentSpace` — the latents of a frozen first stage (latent diffusion, Rombach et al.
  2022), x0 = scale_factor · (z - shift) with z a sample of a VAE's posterior (the latent before
  quantization for a VQ-GAN, whose ``decode`` quantizes: "the quantization layer absorbed into
  the decoder", §3). ``scale_factor`` is 1 / std of the first training batch's latents unless
  given ("scale_by_std", App. G), rank 0's value on every rank, and saved; a diffusers first stage
  brings its own (``scaling_factor``, and ``shift_factor`` as shift; 0 for genlab's). The first
  stage is rebuilt from its checkpoint (``genlab.load``) or read from a diffusers
  ``AutoencoderKL`` / ``VQModel`` folder (``genlab.nn.diffusers_vae``), frozen and kept out of
  ``state_dict``: the model's checkpoint stores its path and SHA-256, and a missing or changed
  file is refused with a message. A config without a first stage (``first_stage_ckpt: null``) is
  completed by the entry points, which find or build one by ``first_stage_recipe``
  (``genlab.utils.first_stages``); the constructor never trains one.
  With ``cache_latents`` the train split is encoded once into a store that training reads by item
  index (``genlab.data.latent_cache``), written in chunks and memory-mapped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genlab.data.chunked_store import DEFAULT_CHUNK_MB
from genlab.data.latent_cache import LatentCache
from genlab.models.diffusion.conditioners import Shared
from genlab.nn.diffusers_vae import diffusers_folder, folder_version, load_diffusers_first_stage
from genlab.nn.distributions import DiagonalGaussian
from genlab.utils.checkpoint import load_frozen
from genlab.utils.export import is_export
from genlab.utils.io import file_version
from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

FIRST_STAGE_KEY = "genlab_first_stage"


class PixelSpace(nn.Module):
    """Diffusion on the images in [-1, 1]."""

    pixel_space = True
    downsample_factor = 1

    def check(self, image_size: int, channels: int) -> None:
        """Refuse a model size or channel count that the space cannot hold."""

    def encode(self, images: torch.Tensor, *, training: bool) -> torch.Tensor:
        """x0 of a batch of images."""
        return images

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images of samples x0."""
        return x0

    def image_channels(self, channels: int) -> int:
        """The channels of the images, for a space of ``channels`` channels."""
        return channels

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """An inpainting mask of the images (1 = known) as a mask of this space."""
        return mask

    def training_x0(self, batch: dict[str, Any], *, training: bool) -> torch.Tensor:
        """x0 of a training batch."""
        return self.encode(batch["image"], training=training)

    def on_fit_start(self, trainer: Any) -> None:
        """Prepare what training needs from the data (the latent cache)."""

    def checkpoint_entries(self) -> dict[str, Any]:
        return {}

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose frozen parts changed."""


class LatentSpace(PixelSpace):
    """Diffusion on the scaled latents of a frozen ``vae`` or ``vqgan`` (module docstring).

    Args:
        first_stage_ckpt: the first stage: a genlab vae / vqgan checkpoint (``python src/train.py
            experiment=vae_shapes_64``) or export folder, or a diffusers ``AutoencoderKL`` /
            ``VQModel`` folder (``save_pretrained``; or a pipeline folder with ``vae/``).
        first_stage_format: ``auto`` (a folder with a diffusers ``config.json`` is diffusers,
            unless it is also a genlab export), ``genlab`` or ``diffusers``.
        scale_factor: multiply latents by this; None: the diffusers first stage's
            ``scaling_factor``, or 1 / std of the first batch's latents for genlab's.
        cache_latents: encode the train split once, at the start of fit, into ``cache_dir`` (or
            reuse that file) and train from it.
        cache_dir: the folder of latent caches (one store folder per content key).
        cache_chunk_mb: the build writes the cache in chunk files of at most this many MiB,
            each rank holding one chunk in memory at a time.
        first_stage_recipe, first_stage_dir: read by the entry points only, to find or build a
            first stage when ``first_stage_ckpt`` is null (``genlab.utils.first_stages``).
    """

    pixel_space = False

    def __init__(
        self,
        *,
        first_stage_ckpt: str | None,
        first_stage_format: str = "auto",
        scale_factor: float | None = None,
        cache_latents: bool = False,
        cache_dir: str | None = None,
        cache_chunk_mb: float = DEFAULT_CHUNK_MB,
        first_stage_recipe: list[str] | None = None,
        first_stage_dir: str | None = None,
    ):
        super().__init__()
        if cache_latents and not cache_dir:
            raise ValueError(
                "model.space.cache_latents=true needs model.space.cache_dir: where to keep it"
            )
        if not first_stage_ckpt:
            raise ValueError(
                "model.space.first_stage_ckpt is null: src/train.py finds or builds the first "
                "stage by model.space.first_stage_recipe (genlab.utils.first_stages."
                "resolve_first_stage); in Python, give a vae / vqgan checkpoint or a diffusers "
                "AutoencoderKL / VQModel folder"
            )
        first_stage = load_first_stage(first_stage_ckpt, first_stage_format)
        self.frozen = Shared(first_stage)
        self.first_stage_ckpt = str(first_stage_ckpt)
        self.first_stage_version = first_stage_version(first_stage_ckpt)
        own_scale = getattr(first_stage, "scaling_factor", None)
        if scale_factor is None and own_scale is not None:
            scale_factor = own_scale
            log.info(f"scale_factor = {own_scale} (the first stage's scaling_factor)")
        self.shift = float(getattr(first_stage, "shift_factor", 0.0))  # not in state_dict
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor or 1.0)))
        self.register_buffer("scale_set", torch.tensor(scale_factor is not None))
        self.cache_latents, self.cache_dir = cache_latents, cache_dir
        self.cache_chunk_mb = float(cache_chunk_mb)
        self.cache: LatentCache | None = None
        self.trainer: Any = None  # set at fit start, for the rank-0 broadcast of scale_factor

    @property
    def first_stage(self) -> nn.Module:
        return self.frozen.value

    @property
    def downsample_factor(self) -> int:
        return self.first_stage.downsample_factor

    @property
    def image_size(self) -> int:
        return self.first_stage.image_size

    def check(self, image_size: int, channels: int) -> None:
        first_stage, path = self.first_stage, self.first_stage_ckpt
        f = first_stage.downsample_factor
        if first_stage.image_size is None and image_size % f:  # a convolutional diffusers one
            raise ValueError(
                f"model.image_size={image_size} is not a multiple of the first stage's "
                f"downsampling factor f={f} ({path})"
            )
        if first_stage.image_size is not None and image_size != first_stage.image_size:
            raise ValueError(
                f"model.image_size={image_size} but the first stage {path} was trained at "
                f"{first_stage.image_size} px"
            )
        if channels != first_stage.latent_channels:
            raise ValueError(
                f"model.channels={channels} but the first stage's latents have "
                f"{first_stage.latent_channels} channels: set model.channels to that"
            )

    def image_channels(self, channels: int) -> int:
        return self.first_stage.channels

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A latent cell is known when every pixel it covers is known in every channel (min-pooled
        over the downsampling factor and the channels)."""
        f = self.downsample_factor
        cells = -F.max_pool2d(-mask.float(), kernel_size=f, stride=f)
        return cells.amin(dim=1, keepdim=True)

    def _apply(self, fn, recurse=True):
        self.first_stage._apply(fn, recurse)  # moves with the model, outside state_dict
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def latents(self, images: torch.Tensor, *, training: bool) -> torch.Tensor:
        """Unscaled latents z: a posterior sample (VAE, in training; its mean otherwise) or the
        latent before quantization (VQ-GAN)."""
        encoded = self.first_stage.encode(images)
        if isinstance(encoded, DiagonalGaussian):
            encoded = encoded.sample() if training else encoded.mode()
        return encoded.float()

    def encode(self, images: torch.Tensor, *, training: bool) -> torch.Tensor:
        return self.scaled(self.latents(images, training=training))

    def training_x0(self, batch: dict[str, Any], *, training: bool) -> torch.Tensor:
        if self.cache is None:
            return self.encode(batch["image"], training=training)
        return self.scaled(self.cache.latents(batch["index"], device=self.scale_factor.device))

    def scaled(self, z: torch.Tensor) -> torch.Tensor:
        """x0 = scale_factor · (z - shift), with scale_factor set from z first if it is not set
        yet."""
        if not bool(self.scale_set):
            self.set_scale_factor(z - self.shift)
        return (z - self.shift) * self.scale_factor if self.shift else z * self.scale_factor

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        z = x0.float() / self.scale_factor + self.shift
        return self.first_stage.decode(z).float().clamp(-1, 1)

    def set_scale_factor(self, z: torch.Tensor) -> None:
        """scale_factor = 1 / std(z) of this batch, rank 0's value on every rank."""
        std = z.float().std()
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            std = trainer.strategy.broadcast(std, src=0)
        self.scale_factor.fill_(1.0 / float(std))
        self.scale_set.fill_(True)
        log.info(f"scale_factor = 1 / std of the first batch's latents = {1 / float(std):.4f}")

    def on_fit_start(self, trainer: Any) -> None:
        self.trainer = trainer
        if self.cache_latents and trainer.fast_dev_run:
            log.info("latent cache: not built for a fast_dev_run; encoding each batch instead")
        elif self.cache_latents:
            self.cache = LatentCache.open(
                trainer,
                self.first_stage,
                cache_dir=Path(self.cache_dir),
                first_stage_version=self.first_stage_version,
                chunk_mb=self.cache_chunk_mb,
            )

    def checkpoint_entries(self) -> dict[str, Any]:
        return {
            FIRST_STAGE_KEY: {"path": self.first_stage_ckpt, "version": self.first_stage_version}
        }

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(FIRST_STAGE_KEY, {}).get("version")
        if saved is not None and saved != self.first_stage_version:
            raise ValueError(
                f"the first stage {self.first_stage_ckpt} has changed since this LDM was trained "
                f"(sha256 {self.first_stage_version}, trained on {saved}): its latents no longer "
                "match; put the original file back"
            )


FORMATS = ("auto", "genlab", "diffusers")


def first_stage_version(path: str | Path) -> str:
    """The SHA-256 prefix of a first stage's file, or of a folder's config and weight files."""
    return folder_version(path) if Path(path).is_dir() else file_version(path)


def load_first_stage(path: str | Path, first_stage_format: str = "auto") -> nn.Module:
    """The first stage of a checkpoint or a diffusers folder, frozen, with a clear error when it
    is missing or is not an autoencoder with a continuous latent."""
    if first_stage_format not in FORMATS:
        raise ValueError(
            f"model.space.first_stage_format={first_stage_format!r}: one of {list(FORMATS)}"
        )
    key = "model.space.first_stage_ckpt"
    if first_stage_format == "diffusers" or (
        first_stage_format == "auto" and diffusers_folder(path) is not None and not is_export(path)
    ):  # a folder that is both (export format=diffusers) is read as genlab's, exactly
        return load_diffusers_first_stage(path, key=key)
    hint = (
        "use a vae or vqgan checkpoint (python src/train.py experiment=vae_shapes_64) or a "
        "diffusers AutoencoderKL / VQModel folder"
    )
    needs = ("encode", "decode", "latent_channels", "downsample_factor")
    module = load_frozen(path, key=key, needs=needs, hint=hint)
    if callable(getattr(module, "encode_indices", None)) and not hasattr(module, "quant_conv"):
        raise ValueError(
            f"model.space.first_stage_ckpt={str(path)!r} is a dVAE: its tokens have no "
            "continuous latent to diffuse; use a vae or vqgan checkpoint"
        )
    return module
