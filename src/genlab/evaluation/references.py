"""Reference statistics of the real data: features of a split, computed once and cached on disk.

The cache key is the SHA-256 of the dataset description (``datamodule.describe()``: which data,
not how it is loaded), the split, the number of images and the extractor's name and version, so
a changed dataset config or new evaluator weights never reuse stale statistics. Files are
``<cache_dir>/<key>.pt`` holding the features ``(N, D)`` (float32, in item order) and the
description they were made from, written atomically (:func:`genlab.utils.io.atomic_torch_save`).

Under DDP every rank extracts the features of its shard (items r, r + W, ...), the shards are
gathered in item order (:func:`genlab.data.splits.extract_split`), and global rank zero writes
the file; every rank returns the full set.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from genlab.data.splits import extract_split, split_dataset
from genlab.utils.io import atomic_torch_save, description_key

log = logging.getLogger(__name__)


def reference_features(
    datamodule: Any,
    *,
    split: str,
    num_images: int,
    extract: Callable[[torch.Tensor], torch.Tensor],
    extractor: dict[str, Any],
    cache_dir: str | Path | None,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    barrier: Callable[[], None] = lambda: None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Features ``(N, D)`` of the first ``num_images`` images of ``split``, cached on disk.

    Args:
        datamodule: the run's datamodule (provides ``describe()`` and the split).
        split: ``train``, ``val`` or ``test``.
        num_images: how many images, capped at the split's size.
        extract: images ``(B, C, H, W)`` in [-1, 1] → features ``(B, D)``.
        extractor: the extractor's ``describe()`` (name and version), part of the key.
        cache_dir: the cache folder; None: no cache.
        rank, world_size: this process's global rank and the number of ranks.
        batch_size: images per extraction batch.
        device: where the gathering metric lives (the DDP backend's device).
        barrier: called after rank zero wrote the cache, so other ranks see the file.

    Returns:
        The features and the description (the key's content, with the key).
    """
    dataset = split_dataset(datamodule, split)
    n = min(num_images, len(dataset))
    if n < num_images:
        log.warning(
            "reference split %r has %d images, fewer than the %d asked", split, n, num_images
        )
    if hasattr(datamodule, "describe"):
        data = datamodule.describe()
    else:
        data = {"dataset": type(datamodule).__name__}
    description = {"data": data, "split": split, "num_images": n, **extractor}
    key = description_key(description)
    description["key"] = key
    path = Path(cache_dir, f"{key}.pt") if cache_dir else None
    if path is not None and path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        log.info(
            "reference features of %s/%s: cache hit %s", data.get("dataset", data), split, path
        )
        return cached["features"], description
    what = f"reference features ({extractor.get('extractor')}) of {split}"
    features = extract_split(
        dataset, n, extract, rank, world_size, batch_size, device, description=what
    )
    if path is not None and rank == 0:
        payload = {"features": features, "description": json.dumps(description)}
        atomic_torch_save(payload, path, stream=True)
        log.info("reference features cached in %s", path)
    barrier()
    return features, description


def reference_for(
    trainer: Any,
    *,
    extractor: Any,
    split: str,
    num_images: int,
    cache_dir: str | Path | None,
    batch_size: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """:func:`reference_features` of ``trainer.datamodule`` with ``extractor``, sharded over
    the trainer's ranks."""
    return reference_features(
        trainer.datamodule,
        split=split,
        num_images=num_images,
        extract=extractor.features,
        extractor=extractor.describe(),
        cache_dir=cache_dir,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        batch_size=batch_size,
        device=trainer.strategy.root_device,
        barrier=trainer.strategy.barrier,
    )
