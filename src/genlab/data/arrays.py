"""In-memory labelled image arrays (digits, MNIST, CIFAR-10): their dataset, splits and
resizing, and the unflipped view of a split."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from genlab.data.files import ImageFiles

RESIZE_CHUNK = 2048  # images per interpolation call in resize_images
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_CAPTIONS = [f"a handwritten {name}" for name in DIGIT_NAMES]  # digits and mnist


class InMemoryImages(Dataset):
    """Images held as one uint8 tensor ``(N, C, H, W)``, with optional labels and captions."""

    def __init__(
        self,
        images: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
        flip: bool = False,
    ) -> None:
        self.images = images
        self.labels = labels
        self.captions = captions
        self.flip = flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.images[index].float().div(127.5).sub(1.0)  # (C, H, W) in [-1, 1]
        if self.flip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        item: dict[str, Any] = {"image": image, "index": index}
        if self.labels is not None:
            item["label"] = self.labels[index]
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item


def without_flips(dataset: Dataset) -> Dataset:
    """A shallow copy of an :class:`ImageFiles` or :class:`InMemoryImages` dataset that never
    flips its images (everything else, the bad-file flags included, is shared)."""
    unflipped = copy.copy(dataset)
    if isinstance(dataset, InMemoryImages):
        unflipped.flip = False
    elif isinstance(dataset, ImageFiles) and isinstance(dataset.transform, v2.Compose):
        steps = dataset.transform.transforms
        kept = [t for t in steps if not isinstance(t, v2.RandomHorizontalFlip)]
        unflipped.transform = v2.Compose(kept)
    else:
        raise NotImplementedError(f"cannot turn off the flips of a {type(dataset).__name__}")
    return unflipped


def labelled_splits(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    *,
    val_size: int,
    class_captions: Sequence[str],
    flip: bool = False,
) -> dict[str, InMemoryImages]:
    """Train, val and test splits of an official (train, test) pair of (images, labels).

    Val is the fixed slice of the last ``val_size`` official training items; only the train
    split flips. Captions are ``class_captions[label]``.
    """
    (train_images, train_labels), (test_images, test_labels) = train, test
    if not 1 <= val_size < len(train_labels):
        raise ValueError(
            f"val_size={val_size} is not allowed: expected an int in [1, {len(train_labels)}), "
            "the number of official training items"
        )
    cut = len(train_labels) - val_size
    parts = {
        "train": (train_images[:cut], train_labels[:cut]),
        "val": (train_images[cut:], train_labels[cut:]),
        "test": (test_images, test_labels),
    }
    return {
        split: InMemoryImages(
            images,
            labels=labels,
            captions=[class_captions[label] for label in labels.tolist()],
            flip=flip and split == "train",
        )
        for split, (images, labels) in parts.items()
    }


def resize_images(images: torch.Tensor, resolution: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize uint8 images ``(N, C, h, w)`` to ``(N, C, resolution, resolution)`` uint8.

    Works in chunks, so that the float copy of a whole dataset never sits in memory.
    """
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    smooth = mode in ("bilinear", "bicubic")
    chunks = [
        torch.nn.functional.interpolate(
            chunk.float(),
            size=(resolution, resolution),
            mode=mode,
            antialias=smooth,
            align_corners=False if smooth else None,
        )
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
        for chunk in images.split(RESIZE_CHUNK)
    ]
    return torch.cat(chunks)


def split_indices(n: int, sizes: Sequence[int], seed: int) -> list[list[int]]:
    """Split ``range(n)`` by a seeded permutation into the rest and parts of ``sizes``.

    Returns ``[rest, part_1, part_2, ...]``, each sorted; the same ``n``, ``sizes`` and ``seed``
    give the same split on any machine.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    parts, end = [], n
    for size in sizes:
        parts.append(sorted(order[end - size : end]))
        end -= size
    return [sorted(order[:end]), *parts]
