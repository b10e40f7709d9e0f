"""The base of every genlab DataModule (the common arguments, the loaders and the
description), and the base of those whose splits are in-memory labelled arrays.

The data contract (docs/architecture.md): batches are dicts with ``image`` ``(B, C, H, W)`` in ``[-1, 1]``,
``caption`` (``list[str]``, captioned datasets), ``label`` (long ``(B,)``, class-labelled
datasets) and ``index`` (long ``(B,)``, the position of the item in its split).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from genlab.data.arrays import without_flips
from genlab.data.checks import check_arg, jsonable
from genlab.data.files import SHOWN_BAD_FILES, ImageFiles
from genlab.data.resumable import ResumableLoader, ResumableSampler, SeededItems

log = logging.getLogger(__name__)

# Arguments that change how data is loaded, not which data: left out of describe().
LOADING_ARGS = (
    "data_dir",
    "batch_size",
    "num_workers",
    "pin_memory",
    "bad_files",
    "max_consecutive_bad",
    "download",
)


def training_progress(trainer: Any) -> tuple[int, int]:
    """``(epoch, batches trained on in it)`` of a Lightning trainer: what a checkpoint's data
    position is (a batch counts once its training step has run, prefetched ones do not)."""
    return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed


class GenDataModule(LightningDataModule):
    """Base of every genlab DataModule: the common arguments, the loaders and the description.

    Subclasses set ``data_train``, ``data_val`` and ``data_test`` in ``setup()``, and, where
    they differ from the class defaults, ``channels``, ``num_classes`` and ``class_names``.
    """

    name = "dataset"
    channels: int = 3
    num_classes: int | None = None
    class_names: list[str] | None = None
    random_flip: bool = False  # random horizontal flips of training images (where offered)

    def __init__(
        self,
        *,
        data_dir: str = "data/",
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        resolution: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_arg(batch_size >= 1, "batch_size", batch_size, "an int >= 1")
        check_arg(num_workers >= 0, "num_workers", num_workers, "an int >= 0")
        check_arg(resolution >= 1, "resolution", resolution, "an int >= 1")
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.resolution = resolution
        self.seed = seed
        self.data_train: Dataset | None = None
        self.data_val: Dataset | None = None
        self.data_test: Dataset | None = None

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, the last incomplete batch dropped, resumable mid-epoch
        (:mod:`genlab.data.resumable`): the order depends on ``(seed, epoch)`` and each DDP rank
        reads its own shard."""
        dataset = self.split_or_raise(self.data_train, "train", "fit")
        if len(dataset) < self.batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the {len(dataset)} training items "
                f"of {self.name}: with drop_last the training loader would yield no batch"
            )
        trainer = self.trainer
        sampler = ResumableSampler(
            dataset,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            seed=self.seed,
        )
        return ResumableLoader(
            SeededItems(dataset, self.seed),
            sampler=sampler,
            progress=None if trainer is None else functools.partial(training_progress, trainer),
            batch_size=self.batch_size,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches in split order."""
        return self.loader(self.split_or_raise(self.data_val, "val", "validate"))

    def test_dataloader(self) -> DataLoader:
        """Test batches in split order."""
        return self.loader(self.split_or_raise(self.data_test, "test", "test"))

    def loader(self, dataset: Dataset) -> DataLoader:
        """An evaluation DataLoader over ``dataset`` in split order, every item kept."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def split_or_raise(self, dataset: Dataset | None, split: str, stage: str) -> Dataset:
        """Return ``dataset``, or say which ``setup`` call builds it."""
        if dataset is None:
            raise RuntimeError(
                f"{self.name}: the {split} split is not built; call setup({stage!r})"
            )
        return dataset

    def train_captions(self) -> list[str]:
        """All captions of the training split (to train a tokenizer); none for this dataset."""
        return []

    def sample_prompts(self, n: int) -> list[str] | None:
        """``n`` fixed prompts for sample grids; ``None``: this dataset has no captions."""
        return None

    def unflipped_train_split(self) -> Dataset:
        """The train split without its random flips (``random_flip``), so that the image of item
        i depends on i alone: what a cache of encoded images is built from."""
        dataset = self.split_or_raise(self.data_train, "train", "fit")
        return without_flips(dataset) if self.random_flip else dataset

    def describe(self) -> dict[str, Any]:
        """A JSON-able description of which data this module yields (for metric protocols)."""
        config = {k: v for k, v in self.hparams.items() if k not in LOADING_ARGS}
        return {"dataset": self.name, "channels": self.channels, **jsonable(config)}

    def skipped_files(self) -> list[str]:
        """Paths of the unreadable files skipped so far, by this process and its loader workers."""
        found = set()
        for dataset in (self.data_train, self.data_val, self.data_test):
            if isinstance(dataset, ImageFiles):
                found.update(dataset.bad_paths())
        return sorted(found)

    def teardown(self, stage: str) -> None:
        """Report the skipped files at the end of a stage, so that they never pass silently."""
        skipped = self.skipped_files()
        if skipped:
            shown = ", ".join(skipped[:SHOWN_BAD_FILES])
            log.warning(
                "%s: %d unreadable image files were skipped: %s", self.name, len(skipped), shown
            )


class LabelledArraysDataModule(GenDataModule):
    """A DataModule whose three splits are in-memory arrays with labels and class captions
    (digits, MNIST, CIFAR-10). Subclasses implement ``build_splits()``, cached on ``self``,
    returning ``{"train": ..., "val": ..., "test": ...}`` of :class:`InMemoryImages`."""

    def setup(self, stage: str | None = None) -> None:
        """Build the three splits."""
        splits = self.build_splits()
        self.data_train, self.data_val, self.data_test = (
            splits[k] for k in ("train", "val", "test")
        )

    def train_captions(self) -> list[str]:
        """The caption of every training item."""
        return list(self.build_splits()["train"].captions)

    def sample_prompts(self, n: int) -> list[str]:
        """The captions of the first ``n`` val items (cycling if ``n`` exceeds the split)."""
        captions = self.build_splits()["val"].captions
        return [captions[i % len(captions)] for i in range(n)]
