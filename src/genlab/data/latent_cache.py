"""The latent cache of latent diffusion: the train split encoded once by a frozen first stage.

At the start of fit (``model.space.cache_latents=true``) the train split is encoded into the
store ``<cache_dir>/<key>/`` (:mod:`genlab.data.chunked_store`: chunk files of at most
``model.space.cache_chunk_mb`` MiB and a manifest written last) and training reads x0 from it
by the batch's ``index`` instead of encoding the batch's images (the loader still serves them,
with their captions). The key hashes the first stage's version (its file's SHA-256), the data
(``datamodule.describe()``: dataset, resolution, crop, flips ...), the split's size, what is
stored, the orientations and the trainer's precision, so a retrained first stage or another
dataset config builds a new store. What is stored is what the encoder gives before sampling,
under the trainer's precision: a VAE's posterior moments (mean, log-variance), from which every
step still draws a fresh z = μ + σ ε, or a VQ-GAN's latent before quantization. In float16: on
the trained vae_shapes its rounding moved a decoded image by < 1e-3 at most, against 0.013 for
bf16 autocast and 0.08 for a posterior sample.

The build runs on every rank at once: rank r encodes the chunks c with c % W = r, holding one
chunk (plus a batch) in memory and writing each chunk's file atomically, so no rank ever holds
the split (before: all rows in float32 on every rank, ≈3.6 GiB for COCO train at 256 px, f = 8).
After a barrier rank 0 writes the manifest, and after a second barrier every rank memory-maps
the chunks, so the store's size costs no memory per rank. A build that was stopped leaves its
chunk files without a manifest: the next fit keeps them and encodes the rest. Random flips
(``data.random_flip``) are kept: both orientations are cached and each step draws one per item
with probability 1/2; a random crop (``data.crop=random``) cannot be cached and is refused.
Validation and testing still encode their images. A ``fast_dev_run`` encodes its batch instead
of building a cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from genlab.data.chunked_store import (
    DEFAULT_CHUNK_MB,
    ChunkedStore,
    ChunkWriter,
    build_store,
    is_complete,
)
from genlab.data.splits import split_dataset
from genlab.nn.distributions import DiagonalGaussian
from genlab.utils import progress
from genlab.utils.io import description_key
from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

CACHE_FORMAT = 2  # what a latent cache holds and how (2: a chunked store); part of its key
CACHE_DTYPE = torch.float16
FIELD = "latents"
PROBE_ITEMS = 4  # train items read twice to check that their images are not random


@dataclass
class LatentCache:
    """The encodings of every train item (N, O, C', h, w), memory-mapped; O orientations, C' = 2C
    for a VAE's posterior moments."""

    store: ChunkedStore
    moments: bool  # (mean, log-variance) rather than latents

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, O, C', h, w)."""
        return self.store.shape(FIELD)

    @property
    def dtype(self) -> torch.dtype:
        return CACHE_DTYPE

    def rows(self, index: torch.Tensor | list[int]) -> torch.Tensor:
        """The stored rows (B, O, C', h, w) of the train items ``index``, copied out of the maps."""
        return self.store.read(FIELD, index)

    def latents(self, index: torch.Tensor, *, device: torch.device) -> torch.Tensor:
        """Unscaled latents z of the train items ``index``: one orientation drawn per item with
        probability 1/2 when both are cached (as ``random_flip`` does), then for a VAE a fresh
        posterior sample."""
        rows = self.rows(index)  # (B, O, C', h, w)
        pick = torch.zeros(len(rows), dtype=torch.long)
        if rows.shape[1] == 2:
            draw = torch.rand(len(rows), device=device)
            pick = (draw < 0.5).long().cpu()
        rows = rows[torch.arange(len(rows)), pick].to(device).float()  # (B, C', h, w)
        return DiagonalGaussian(rows).sample() if self.moments else rows

    @classmethod
    def open(
        cls,
        trainer: Any,
        first_stage: nn.Module,
        *,
        cache_dir: Path,
        first_stage_version: str,
        chunk_mb: float = DEFAULT_CHUNK_MB,
    ) -> LatentCache:
        """The cache of this trainer's train split, built first (by all ranks together) when it
        is not complete."""
        dataset, orientations = cache_source(trainer.datamodule)
        device = trainer.lightning_module.device
        with torch.no_grad():
            probe = first_stage.encode(dataset[0]["image"][None].to(device))
        moments = isinstance(probe, DiagonalGaussian)
        description = cache_description(
            trainer, dataset, orientations, first_stage_version, moments
        )
        folder = Path(cache_dir, description_key(description))
        if trainer.strategy.broadcast(is_complete(folder), src=0):  # rank 0 decides for all
            log.info(f"latent cache: reusing {folder} (built before for this data and first stage)")
        else:
            shape = (orientations, *moments_or_latents(probe).shape[1:])  # (O, C', h, w)
            build(trainer, first_stage, folder, dataset, orientations, description, shape, chunk_mb)
        if not is_complete(folder):
            raise FileNotFoundError(
                f"rank {trainer.global_rank} cannot see the latent cache {folder} that rank 0 "
                "completed: model.space.cache_dir must be on a file system that every node shares"
            )
        return cls(ChunkedStore(folder), moments)


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
    folder: Path,
    dataset: Dataset,
    orientations: int,
    description: dict[str, Any],
    shape: tuple[int, ...],
    chunk_mb: float = DEFAULT_CHUNK_MB,
) -> None:
    """Encode the train split into the store ``folder`` (``shape``: one item's (O, C', h, w)),
    each rank its chunks, one chunk in memory at a time; every rank returns once the store is
    complete."""
    start, datamodule = time.perf_counter(), trainer.datamodule
    device = trainer.lightning_module.device
    fields = {FIELD: (tuple(shape), np.dtype(str(CACHE_DTYPE).removeprefix("torch.")).name)}

    def compute(rows: list[int], writer: ChunkWriter) -> None:
        loader = DataLoader(
            Subset(dataset, rows),
            batch_size=getattr(datamodule, "batch_size", 64),
            shuffle=False,
            num_workers=getattr(datamodule, "num_workers", 0),
        )
        with progress.bar("latent cache", total=len(rows)) as bar:
            for batch in loader:
                images = batch["image"].to(device)
                latents = encodings(trainer, first_stage, images, orientations).to(CACHE_DTYPE)
                if not torch.isfinite(latents).all():
                    raise ValueError(
                        f"the first stage's encodings overflow {CACHE_DTYPE}: cannot cache"
                    )
                writer.add({FIELD: latents})
                bar.advance(len(images))

    writer = build_store(
        folder,
        fields,
        len(dataset),
        chunk_mb,
        description,
        compute,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        barrier=trainer.strategy.barrier,
    )
    resumed = f", {writer.skipped} chunk(s) of an earlier build kept" if writer.skipped else ""
    log.info(
        f"latent cache: built {folder} in {time.perf_counter() - start:.1f} s "
        f"({len(dataset)} train items x {orientations} orientation(s), {CACHE_DTYPE}{resumed})"
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
