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
* Latent caching (``cache_latents``): at the start of fit the train split is encoded once into
  ``<cache_dir>/<key>.pt`` and training reads x0 from it by the batch's ``index`` instead of
  encoding the batch's images (the loader still serves them, with their captions). The key hashes
  the first stage's version (its file's SHA-256), the data (``datamodule.describe()``), the
  split's size, what is stored and the trainer's precision, so a retrained first stage or another
  dataset config builds a new file. What is stored is what the encoder gives before sampling,
  under the trainer's precision: a VAE's posterior moments (mean, log-variance), from which every
  step still draws a fresh z = μ + σ ε with the model's noise generator, or a VQ-GAN's latent
  before quantization. In float16: on the trained vae_shapes its rounding moved a decoded image
  by < 1e-3 at most, against 0.013 for bf16 autocast and 0.08 for a posterior sample. The
  encoding runs sharded over the ranks (items r, r + W, ...), is gathered in item order and
  written atomically by rank 0; every rank then memory-maps the file, so its size costs no memory
  per rank. Random flips (``data.random_flip``) are kept: both orientations are cached and each
  step draws one per item with probability 1/2; a random crop (``data.crop=random``) cannot be
  cached and is refused. Validation and testing still encode their images: they are small and
  check the real pipeline. A ``fast_dev_run`` encodes its batch instead of building a cache.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from genlab.data.splits import extract_split, split_dataset
from genlab.models.diffusion_model import DiffusionModel
from genlab.nn.distributions import DiagonalGaussian
from genlab.utils.checkpoint import load_frozen
from genlab.utils.io import atomic_torch_save, description_key, file_version
from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

FIRST_STAGE_KEY = "genlab_first_stage"
CACHE_FORMAT = 1  # what a latent cache file holds; part of its key
CACHE_DTYPE = torch.float16
PROBE_ITEMS = 4  # train items read twice to check that their images are not random


class LDM(DiffusionModel):
    """Latent diffusion on a frozen first stage.

    Args:
        first_stage_ckpt: a ``vae`` or ``vqgan`` checkpoint (``python src/train.py
            experiment=vae_shapes_64``), loaded with ``genlab.load``.
        scale_factor: multiply latents by this; None: 1 / std of the first batch's latents.
        image_size: the images' size in pixels (the diffusion runs at image_size / f).
        channels: the latent channels (must be the first stage's).
        cache_latents: encode the train split once, at the start of fit, into ``cache_dir`` (or
            reuse that file) and train from it (module doc).
        cache_dir: the folder of latent caches.
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
        cache_latents: bool = False,
        cache_dir: str | None = None,
        **kwargs: Any,
    ):
        if cache_latents and not cache_dir:
            raise ValueError("model.cache_latents=true needs model.cache_dir: where to keep it")
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
        self.cache_latents, self.cache_dir = cache_latents, cache_dir
        self.latent_cache: torch.Tensor | None = None  # (N, O, C', h, w), memory-mapped
        self.cached_moments = False  # the cache holds (mean, log-variance), not latents

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
            encoded = encoded.sample() if self.training else encoded.mode()
        return encoded.float()

    def to_diffusion_space(self, images: torch.Tensor) -> torch.Tensor:
        return self.scaled(self.latents(images))

    def scaled(self, z: torch.Tensor) -> torch.Tensor:
        """x0 = scale_factor · z, with scale_factor set from z first if it is not set yet."""
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
    # the latent cache
    def on_fit_start(self) -> None:
        if self.cache_latents and self.trainer.fast_dev_run:
            log.info("latent cache: not built for a fast_dev_run; encoding each batch instead")
        elif self.cache_latents:
            self.latent_cache = self.load_latent_cache()

    def training_data(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.latent_cache is None:
            return super().training_data(batch)
        return self.scaled(self.cached_latents(batch["index"]))

    def cached_latents(self, index: torch.Tensor) -> torch.Tensor:
        """Unscaled latents z of the train items ``index`` from the cache: one orientation drawn
        per item with probability 1/2 when both are cached (as ``random_flip`` does), then for a
        VAE a fresh posterior sample, drawn as :meth:`latents` draws it in training."""
        rows = self.latent_cache[index.cpu()]  # (B, O, C', h, w), copied out of the memory map
        pick = torch.zeros(len(rows), dtype=torch.long)
        if rows.shape[1] == 2:
            draw = torch.rand(len(rows), device=self.device)
            pick = (draw < 0.5).long().cpu()
        rows = rows[torch.arange(len(rows)), pick].to(self.device).float()  # (B, C', h, w)
        return DiagonalGaussian(rows).sample() if self.cached_moments else rows

    @torch.no_grad()
    def encodings(self, images: torch.Tensor, orientations: int = 1) -> torch.Tensor:
        """What the cache holds of images, (B, O, C', h, w) for O orientations (the images, then
        their mirror images): a VAE's posterior moments (mean, log-variance; C' = 2C) or a
        VQ-GAN's latents before quantization, encoded under the trainer's precision as training
        would encode them."""
        views = [images, images.flip(-1)][:orientations]
        with self.trainer.precision_plugin.forward_context():
            encoded = [self.first_stage.encode(view) for view in views]
        return torch.stack([moments_or_latents(e) for e in encoded], dim=1).float()

    def load_latent_cache(self) -> torch.Tensor:
        """The encodings of every train item, memory-mapped from ``<cache_dir>/<key>.pt``, which
        is built first (by all ranks together) when it does not exist."""
        trainer = self.trainer
        dataset, orientations = cache_source(trainer.datamodule)
        with torch.no_grad():
            probe = self.first_stage.encode(dataset[0]["image"][None].to(self.device))
        self.cached_moments = isinstance(probe, DiagonalGaussian)
        description = self.cache_description(dataset, orientations)
        path = Path(self.cache_dir, f"{description_key(description)}.pt")
        if trainer.strategy.broadcast(path.is_file(), src=0):  # rank 0 decides for every rank
            log.info(f"latent cache: reusing {path} (built before for this data and first stage)")
        else:
            self.build_latent_cache(path, dataset, orientations, description)
        if not path.is_file():
            raise FileNotFoundError(
                f"rank {trainer.global_rank} cannot see the latent cache {path} that rank 0 "
                "wrote: model.cache_dir must be on a file system that every node shares"
            )
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)["latents"]

    def cache_description(self, dataset: Dataset, orientations: int) -> dict[str, Any]:
        """What a latent cache is made from: its key is the hash of this."""
        datamodule = self.trainer.datamodule
        if hasattr(datamodule, "describe"):
            data = datamodule.describe()
        else:
            data = {"dataset": type(datamodule).__name__}
        return {
            "format": CACHE_FORMAT,
            "first_stage": self.first_stage_version,
            "data": data,
            "split": "train",
            "num_items": len(dataset),
            "stored": "posterior moments" if self.cached_moments else "latents",
            "dtype": str(CACHE_DTYPE),
            "orientations": orientations,
            "precision": str(self.trainer.precision),
        }

    def build_latent_cache(
        self, path: Path, dataset: Dataset, orientations: int, description: dict[str, Any]
    ) -> None:
        """Encode the train split, each rank its shard, gathered in item order; rank 0 writes
        the file atomically while the others wait."""
        trainer, start = self.trainer, time.perf_counter()
        datamodule = trainer.datamodule
        rows = extract_split(  # (N, O·C'·h·w) float32, on every rank
            dataset,
            len(dataset),
            lambda images: self.encodings(images, orientations).flatten(1),
            trainer.global_rank,
            trainer.world_size,
            getattr(datamodule, "batch_size", 64),
            self.device,
            num_workers=getattr(datamodule, "num_workers", 0),
        )
        size = self.image_size
        latents = rows.view(len(dataset), orientations, -1, size, size).to(CACHE_DTYPE)
        if not torch.isfinite(latents).all():
            raise ValueError(f"the first stage's encodings overflow {CACHE_DTYPE}: cannot cache")
        if trainer.global_rank == 0:
            atomic_torch_save(
                {"latents": latents, "description": json.dumps(description)}, path, stream=True
            )
        trainer.strategy.barrier()
        log.info(
            f"latent cache: built {path} in {time.perf_counter() - start:.1f} s "
            f"({len(dataset)} train items x {orientations} orientation(s), {CACHE_DTYPE})"
        )

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
    an autoencoder with a continuous latent."""
    hint = "use a vae or vqgan checkpoint (python src/train.py experiment=vae_shapes_64)"
    needs = ("encode", "decode", "latent_channels", "downsample_factor")
    module = load_frozen(path, key="model.first_stage_ckpt", needs=needs, hint=hint)
    if callable(getattr(module, "encode_indices", None)) and not hasattr(module, "quant_conv"):
        raise ValueError(
            f"model.first_stage_ckpt={str(path)!r} is a dVAE: its tokens have no continuous "
            "latent to diffuse; use a vae or vqgan checkpoint"
        )
    return module


def moments_or_latents(encoded: Any) -> torch.Tensor:
    """A first stage's encoding as one tensor: a posterior's moments (mean, log-variance) stacked
    on the channels (B, 2C, h, w), or the latents themselves."""
    if isinstance(encoded, DiagonalGaussian):
        return torch.cat([encoded.mean, encoded.logvar], dim=1)
    if isinstance(encoded, torch.Tensor):
        return encoded
    raise ValueError(
        f"model.cache_latents=true cannot cache a {type(encoded).__name__} encoding: only a "
        "DiagonalGaussian posterior (vae) or latents (vqgan)"
    )


def cache_source(datamodule: Any) -> tuple[Dataset, int]:
    """The train split that the latent cache encodes, without random flips, and how many
    orientations to cache: 2 when training flips (a flip is then drawn on the cached ones)."""
    if datamodule is None:
        raise ValueError("model.cache_latents=true needs a datamodule: trainer.fit(datamodule=)")
    if getattr(datamodule, "crop", None) == "random":
        raise ValueError(
            "model.cache_latents=true encodes each training image once, but data.crop='random' "
            "draws a new crop at every access: set data.crop=center or model.cache_latents=false"
        )
    flips = bool(getattr(datamodule, "random_flip", False))
    dataset = datamodule.unflipped_train_split() if flips else split_dataset(datamodule, "train")
    check_deterministic(dataset)
    return dataset, 1 + flips


def check_deterministic(dataset: Dataset) -> None:
    """Refuse a train split whose items are not addressed by index or whose images are random
    (an augmentation the cache would freeze): the first items are read twice and compared."""
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "model.cache_latents=true needs a map-style train split (items by index), not a "
            f"{type(dataset).__name__}: set model.cache_latents=false"
        )
    for i in range(min(PROBE_ITEMS, len(dataset))):
        if not torch.equal(dataset[i]["image"], dataset[i]["image"]):
            raise ValueError(
                f"model.cache_latents=true: train item {i} gave two different images when read "
                "twice: the data module augments its training images at random, which a cache "
                "of encodings would freeze; turn that augmentation off or set "
                "model.cache_latents=false"
            )
