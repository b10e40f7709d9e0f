"""The latent cache of latent diffusion: the train split encoded once by a frozen first stage.

At the start of fit (``model.space.cache_latents=true``) the train split is encoded into
``<cache_dir>/<key>.pt`` and training reads x0 from it by the batch's ``index`` instead of
encoding the batch's images (the loader still serves them, with their captions). The key hashes
the first stage's version (its file's SHA-256), the data (``datamodule.describe()``), the split's
size, what is stored and the trainer's precision, so a retrained first stage or another dataset
config builds a new file. What is stored is what the encoder gives before sampling, under the
trainer's precision: a VAE's posterior moments (mean, log-variance), from which every step still
draws a fresh z = μ + σ ε, or a VQ-GAN's latent before quantization. In float16: on the trained
vae_shapes its rounding moved a decoded image by < 1e-3 at most, against 0.013 for bf16 autocast
and 0.08 for a posterior sample. The encoding runs sharded over the ranks (items r, r + W, ...),
is gathered in item order and written atomically by rank 0; every rank then memory-maps the file,
so its size costs no memory per rank. Random flips (``data.random_flip``) are kept: both
orientations are cached and each step draws one per item with probability 1/2; a random crop
(``data.crop=random``) cannot be cached and is refused. Validation and testing still encode their
images. A ``fast_dev_run`` encodes its batch instead of building a cache.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from genlab.data.splits import extract_split, split_dataset
from genlab.nn.distributions import DiagonalGaussian
from genlab.utils.io import atomic_torch_save, description_key
from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

CACHE_FORMAT = 1  # what a latent cache file holds; part of its key
CACHE_DTYPE = torch.float16
PROBE_ITEMS = 4  # train items read twice to check that their images are not random


@dataclass
class LatentCache:
    """The encodings of every train item (N, O, C', h, w), memory-mapped; O orientations, C' = 2C
    for a VAE's posterior moments."""

    rows: torch.Tensor
    moments: bool  # (mean, log-variance) rather than latents

    def latents(self, index: torch.Tensor, *, device: torch.device) -> torch.Tensor:
        """Unscaled latents z of the train items ``index``: one orientation drawn per item with
        probability 1/2 when both are cached (as ``random_flip`` does), then for a VAE a fresh
        posterior sample."""
        rows = self.rows[index.cpu()]  # (B, O, C', h, w), copied out of the memory map
        pick = torch.zeros(len(rows), dtype=torch.long)
        if rows.shape[1] == 2:
            draw = torch.rand(len(rows), device=device)
            pick = (draw < 0.5).long().cpu()
        rows = rows[torch.arange(len(rows)), pick].to(device).float()  # (B, C', h, w)
        return DiagonalGaussian(rows).sample() if self.moments else rows

    @classmethod
    def open(
        cls, trainer: Any, first_stage: nn.Module, *, cache_dir: Path, first_stage_version: str
    ) -> LatentCache:
        """The cache of this trainer's train split, built first (by all ranks together) when
        its file does not exist."""
        dataset, orientations = cache_source(trainer.datamodule)
        device = trainer.lightning_module.device
        with torch.no_grad():
            probe = first_stage.encode(dataset[0]["image"][None].to(device))
        moments = isinstance(probe, DiagonalGaussian)
        description = cache_description(
            trainer, dataset, orientations, first_stage_version, moments
        )
        path = Path(cache_dir, f"{description_key(description)}.pt")
        if trainer.strategy.broadcast(path.is_file(), src=0):  # rank 0 decides for every rank
            log.info(f"latent cache: reusing {path} (built before for this data and first stage)")
        else:
            shape = tuple(moments_or_latents(probe).shape[1:])  # (C', h, w)
            build(trainer, first_stage, path, dataset, orientations, description, shape)
        if not path.is_file():
            raise FileNotFoundError(
                f"rank {trainer.global_rank} cannot see the latent cache {path} that rank 0 "
                "wrote: model.space.cache_dir must be on a file system that every node shares"
            )
        rows = torch.load(path, map_location="cpu", mmap=True, weights_only=True)["latents"]
        return cls(rows, moments)


def cache_description(
    trainer: Any, dataset: Dataset, orientations: int, first_stage_version: str, moments: bool
) -> dict[str, Any]:
    """What a latent cache is made from: its key is the hash of this."""
    datamodule = trainer.datamodule
    if hasattr(datamodule, "describe"):
        data = datamodule.describe()
    else:
        data = {"dataset": type(datamodule).__name__}
    return {
        "format": CACHE_FORMAT,
        "first_stage": first_stage_version,
        "data": data,
        "split": "train",
        "num_items": len(dataset),
        "stored": "posterior moments" if moments else "latents",
        "dtype": str(CACHE_DTYPE),
        "orientations": orientations,
        "precision": str(trainer.precision),
    }


@torch.no_grad()
def encodings(
    trainer: Any, first_stage: nn.Module, images: torch.Tensor, orientations: int = 1
) -> torch.Tensor:
    """What the cache holds of images, (B, O, C', h, w) for O orientations (the images, then
    their mirror images), encoded under the trainer's precision as training would encode them."""
    views = [images, images.flip(-1)][:orientations]
    with trainer.precision_plugin.forward_context():
        encoded = [first_stage.encode(view) for view in views]
    return torch.stack([moments_or_latents(e) for e in encoded], dim=1).float()


def build(
    trainer: Any,
    first_stage: nn.Module,
    path: Path,
    dataset: Dataset,
    orientations: int,
    description: dict[str, Any],
    shape: tuple[int, ...],
) -> None:
    """Encode the train split (``shape``: one encoding's (C', h, w)), each rank its shard, gathered in item order; rank 0 writes the
    file atomically while the others wait."""
    start, datamodule = time.perf_counter(), trainer.datamodule
    rows = extract_split(  # (N, O·C'·h·w) float32, on every rank
        dataset,
        len(dataset),
        lambda images: encodings(trainer, first_stage, images, orientations).flatten(1),
        trainer.global_rank,
        trainer.world_size,
        getattr(datamodule, "batch_size", 64),
        trainer.lightning_module.device,
        num_workers=getattr(datamodule, "num_workers", 0),
    )
    latents = rows.view(len(dataset), orientations, *shape).to(CACHE_DTYPE)
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


def moments_or_latents(encoded: Any) -> torch.Tensor:
    """A first stage's encoding as one tensor: a posterior's moments (mean, log-variance) stacked
    on the channels (B, 2C, h, w), or the latents themselves."""
    if isinstance(encoded, DiagonalGaussian):
        return torch.cat([encoded.mean, encoded.logvar], dim=1)
    if isinstance(encoded, torch.Tensor):
        return encoded
    raise ValueError(
        f"model.space.cache_latents=true cannot cache a {type(encoded).__name__} encoding: only "
        "a DiagonalGaussian posterior (vae) or latents (vqgan)"
    )


def cache_source(datamodule: Any) -> tuple[Dataset, int]:
    """The train split that the latent cache encodes, without random flips, and how many
    orientations to cache: 2 when training flips (a flip is then drawn on the cached ones)."""
    if datamodule is None:
        raise ValueError(
            "model.space.cache_latents=true needs a datamodule: trainer.fit(datamodule=)"
        )
    if getattr(datamodule, "crop", None) == "random":
        raise ValueError(
            "model.space.cache_latents=true encodes each training image once, but "
            "data.crop='random' draws a new crop at every access: set data.crop=center or "
            "model.space.cache_latents=false"
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
            "model.space.cache_latents=true needs a map-style train split (items by index), not "
            f"a {type(dataset).__name__}: set model.space.cache_latents=false"
        )
    for i in range(min(PROBE_ITEMS, len(dataset))):
        if not torch.equal(dataset[i]["image"], dataset[i]["image"]):
            raise ValueError(
                f"model.space.cache_latents=true: train item {i} gave two different images when "
                "read twice: the data module augments its training images at random, which a "
                "cache of encodings would freeze; turn that augmentation off or set "
                "model.space.cache_latents=false"
            )
