"""Reference statistics of the real data: features of a split, computed once and cached on disk.

The cache key is the SHA-256 of the dataset description (``datamodule.describe()``: which data,
not how it is loaded), the split, the number of images and the extractor's name and version, so
a changed dataset config or new evaluator weights never reuse stale statistics. Files are
``<cache_dir>/<key>.pt`` holding the features ``(N, D)`` (float32, in item order) and the
description they were made from, written atomically (a temporary file, then ``os.replace``).

Under DDP every rank extracts the features of its shard (items r, r + W, ...), the shards are
gathered with :class:`~genlab.metrics.feature_bank.FeatureBank` (ordered by item index), and
global rank zero writes the file; every rank returns the full set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from genlab.metrics.feature_bank import FeatureBank

log = logging.getLogger(__name__)


def reference_key(description: dict[str, Any]) -> str:
    """The first 16 hex digits of the SHA-256 of a JSON description (sorted keys)."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_dataset(datamodule: Any, split: str) -> Dataset:
    """The ``train``, ``val`` or ``test`` dataset of a datamodule, setting it up if needed."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"reference_split={split!r} must be one of train, val, test")
    dataset = getattr(datamodule, f"data_{split}", None)
    if dataset is None:
        datamodule.setup("test" if split == "test" else "fit")
        dataset = getattr(datamodule, f"data_{split}", None)
    if dataset is None:
        raise ValueError(f"{type(datamodule).__name__} has no {split} split")
    return dataset


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """Items of ``range(n)`` for ``rank``: r, r + W, r + 2W, ... (no padding, no duplicates)."""
    return list(range(rank, n, world_size))


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
    key = reference_key(description)
    description["key"] = key
    path = Path(cache_dir, f"{key}.pt") if cache_dir else None
    if path is not None and path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        log.info(
            "reference features of %s/%s: cache hit %s", data.get("dataset", data), split, path
        )
        return cached["features"], description
    features = extract_split(dataset, n, extract, rank, world_size, batch_size, device)
    if path is not None and rank == 0:
        write_atomically(path, {"features": features, "description": json.dumps(description)})
        log.info("reference features cached in %s", path)
    barrier()
    return features, description


def extract_split(
    dataset: Dataset,
    n: int,
    extract: Callable[[torch.Tensor], torch.Tensor],
    rank: int,
    world_size: int,
    batch_size: int,
    device: torch.device | str,
    num_workers: int = 0,
) -> torch.Tensor:
    """Features of items ``0..n-1``: each rank its shard, gathered in item order."""
    if n < world_size:  # a rank without items would hang the gather (empty cat states)
        raise ValueError(f"{n} reference images cannot be shared by {world_size} ranks")
    bank = FeatureBank().to(device)
    indices = shard(n, rank, world_size)
    subset = Subset(dataset, indices)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    start = 0
    for batch in loader:
        images = batch["image"]
        index = torch.tensor(indices[start : start + len(images)], device=device)
        bank.update(extract(images.to(device)).to(device), index)
        start += len(images)
    return bank.compute().float().cpu()


def write_atomically(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(payload, partial)
    os.replace(partial, path)
