"""A datamodule's splits, and work on a split shared by the DDP ranks.

:func:`split_dataset` gives the ``train``, ``val`` or ``test`` dataset of a datamodule (setting
it up when needed). :func:`shard` is the rank sharding of the evaluation protocol (docs/architecture.md):
rank r of W takes the items r, r + W, r + 2W, ... (no padding, no duplicates).
:func:`extract_split` maps a function over the images of a split, each rank its shard, and
gathers the rows on every rank in item order (with
:class:`~genlab.metrics.feature_bank.FeatureBank`): the reference features of the generative
metrics and LDM's latent cache are made with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from genlab.metrics.feature_bank import FeatureBank
from genlab.utils import progress


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


def extract_split(
    dataset: Dataset,
    n: int,
    extract: Callable[[torch.Tensor], torch.Tensor],
    rank: int,
    world_size: int,
    batch_size: int,
    device: torch.device | str,
    num_workers: int = 0,
    description: str = "features",
) -> torch.Tensor:
    """Features of items ``0..n-1``: each rank its shard, gathered in item order (a progress
    bar named ``description`` on rank zero at a terminal: :mod:`genlab.utils.progress`)."""
    if n < world_size:  # a rank without items would hang the gather (empty cat states)
        raise ValueError(f"{n} reference images cannot be shared by {world_size} ranks")
    bank = FeatureBank().to(device)
    indices = shard(n, rank, world_size)
    subset = Subset(dataset, indices)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    start = 0
    with progress.bar(description, total=len(indices)) as bar:
        for batch in loader:
            images = batch["image"]
            index = torch.tensor(indices[start : start + len(images)], device=device)
            bank.update(extract(images.to(device)).to(device), index)
            start += len(images)
            bar.advance(len(images))
    return bank.compute().float().cpu()
