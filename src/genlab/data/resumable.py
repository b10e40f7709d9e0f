"""Training batches that a resumed run continues exactly where the interrupted one stopped.

Three pieces make the data side of exact resume (README, "Reliability"):

* :class:`ResumableSampler` orders the train split by a permutation that depends on
  ``(seed, epoch)`` alone, shards it over DDP ranks (rank r takes items r, r+W, ... of the
  permutation, as ``DistributedSampler`` does, which it extends, so Lightning keeps it) and can
  start an epoch after its first ``k`` batches without reading them;
* :class:`SeededItems` makes an item's own randomness (a random flip, crop or caption) a function
  of ``(seed, epoch, index)``: the same in a resumed run, whichever process or loader worker reads
  it, and without touching the training process's random generators;
* :class:`ResumableLoader` is a DataLoader with ``state_dict`` / ``load_state_dict``, which
  Lightning saves in every checkpoint and restores before the first batch: the epoch and the
  number of batches the trainer has *trained on* (not the number the loader has prefetched).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from genlab.utils.seeding import derive_seed

log = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """Indices of the train split for one epoch, as ``(index, epoch)`` keys for
    :class:`SeededItems`, shuffled by ``(seed, epoch)`` and sharded over ``num_replicas`` ranks.

    ``len()`` is always the full epoch (so Lightning counts batches as usual); after
    :meth:`resume_at` the next iteration of that epoch starts ``skip`` items in.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.resume_epoch: int | None = None
        self.skip = 0

    def resume_at(self, epoch: int, skip: int) -> None:
        """Start the next iteration of ``epoch`` after its first ``skip`` items (once)."""
        self.resume_epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        start = 0
        if self.resume_epoch == self.epoch:
            start = self.skip
        self.resume_epoch, self.skip = None, 0
        epoch = self.epoch
        return iter([(index, epoch) for index in indices[start:]])


class SeededItems(Dataset):
    """``dataset`` read by ``(index, epoch)`` keys: item ``index`` is built under torch's random
    generator seeded from ``(seed, epoch, index)``, in a forked generator state so the reading
    process's own stream is left as it was. Plain integer keys read the item unseeded."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, int):
            return self.dataset[key]
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, "item", epoch, index))
            return self.dataset[index]


class ResumableLoader(DataLoader):
    """The training DataLoader: a DataLoader over :class:`SeededItems` with a
    :class:`ResumableSampler`, and a state that Lightning checkpoints.

    ``progress`` returns ``(epoch, batches trained on in that epoch)``, read from the trainer at
    save time; without it (no trainer) the state is that of the start of epoch 0.

    Lightning may rebuild the loader with a sampler of its own (``trainer.overfit_batches``
    swaps in a ``SequentialSampler``): the loader then reads the first items in order, unseeded,
    and its state says it cannot resume (``resumable: false``).
    """

    def __init__(
        self,
        dataset: SeededItems,
        *,
        sampler: ResumableSampler,
        progress: Callable[[], tuple[int, int]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.progress = progress

    def __iter__(self):
        # Lightning creates the first iterator of a run before it sets the sampler's epoch:
        # take the trainer's epoch here, so a resumed run reads the epoch it resumes.
        if self.progress is not None and self.resumable:
            self.sampler.set_epoch(self.progress()[0])
        return super().__iter__()

    @property
    def resumable(self) -> bool:
        """Whether the sampler is still the :class:`ResumableSampler` this loader was made with."""
        return isinstance(self.sampler, ResumableSampler)

    def state_dict(self) -> dict[str, int]:
        """Where training is in the data: epoch, batches trained on, and the sharding."""
        epoch, batches = self.progress() if self.progress is not None else (0, 0)
        if not self.resumable:
            return {"epoch": epoch, "batches": batches, "resumable": False}
        return {
            "epoch": epoch,
            "batches": batches,
            "batch_size": self.batch_size,
            "world_size": self.sampler.num_replicas,
            "seed": self.sampler.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the saved epoch after its trained batches; warn when that cannot be exact."""
        if not self.resumable or not state.get("resumable", True):
            log.warning(
                "the training data cannot resume exactly where the checkpoint stopped (a sampler "
                "replaced by Lightning, e.g. trainer.overfit_batches): epoch %d restarts from its "
                "first batch",
                state["epoch"],
            )
            return
        now = {
            "batch_size": self.batch_size,
            "world_size": self.sampler.num_replicas,
            "seed": self.sampler.seed,
        }
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            log.warning(
                "the training data cannot resume exactly where the checkpoint stopped (%s): "
                "epoch %d restarts from its first batch",
                what,
                state["epoch"],
            )
            return
        self.sampler.resume_at(state["epoch"], state["batches"] * self.batch_size)
        if state["batches"]:
            log.info(
                "resuming the training data at epoch %d after its first %d batches",
                state["epoch"],
                state["batches"],
            )
