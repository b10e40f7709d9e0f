"""scikit-learn's bundled handwritten digits (1,797 images, 8x8, 17 grey levels), upscaled.

No files needed: ``sklearn.datasets.load_digits`` ships with scikit-learn. Images are upscaled to
``resolution`` by interpolation, captioned ``"a handwritten seven"`` and labelled 0-9; the
train/val/test split is a seeded permutation.
"""

from __future__ import annotations

from typing import Literal

import torch
from sklearn.datasets import load_digits

from genlab.data.arrays import (
    DIGIT_CAPTIONS,
    DIGIT_NAMES,
    InMemoryImages,
    resize_images,
    split_indices,
)
from genlab.data.checks import check_arg, check_choice
from genlab.data.datamodule import LabelledArraysDataModule

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
MAX_LEVEL = 16  # load_digits pixels are counts 0..16 of an 4x4 block of a 32x32 bitmap


class DigitsDataModule(LabelledArraysDataModule):
    """The scikit-learn digits, upscaled to ``resolution``, with labels and captions."""

    name = "digits"

    def __init__(
        self,
        *,
        data_dir: str = "data/",
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        resolution: int = 32,
        seed: int = 0,
        channels: int = 1,
        interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            resolution=resolution,
            seed=seed,
        )
        self.save_hyperparameters(logger=False)
        check_arg(resolution >= 8, "resolution", resolution, "an int >= 8")
        check_choice("channels", channels, (1, 3))
        check_choice("interpolation", interpolation, INTERPOLATIONS)
        check_arg(0 < val_fraction < 1, "val_fraction", val_fraction, "a float in (0, 1)")
        check_arg(0 < test_fraction < 1, "test_fraction", test_fraction, "a float in (0, 1)")
        check_arg(
            val_fraction + test_fraction < 1,
            "test_fraction",
            test_fraction,
            f"a float below 1 - val_fraction = {1 - val_fraction}",
        )
        self.channels = channels
        self.interpolation = interpolation
        self.fractions = (val_fraction, test_fraction)
        self.num_classes = 10
        self.class_names = list(DIGIT_NAMES)
        self.splits: dict[str, InMemoryImages] | None = None

    def build_splits(self) -> dict[str, InMemoryImages]:
        """Load, upscale and split the digits once."""
        if self.splits is None:
            digits = load_digits()
            levels = torch.from_numpy(digits.images)[:, None] * (255.0 / MAX_LEVEL)  # (N, 1, 8, 8)
            images = resize_images(
                levels.round().to(torch.uint8), self.resolution, self.interpolation
            )
            images = images.expand(-1, self.channels, -1, -1)  # (N, C, H, W)
            labels = torch.from_numpy(digits.target).long()
            sizes = [round(len(labels) * f) for f in self.fractions]
            parts = split_indices(len(labels), sizes, self.seed)
            self.splits = {
                split: self.subset(images, labels, ids)
                for split, ids in zip(("train", "val", "test"), parts, strict=True)
            }
        return self.splits

    @staticmethod
    def subset(images: torch.Tensor, labels: torch.Tensor, ids: list[int]) -> InMemoryImages:
        """The items ``ids`` as an in-memory dataset with labels and captions."""
        chosen = labels[ids]
        captions = [DIGIT_CAPTIONS[label] for label in chosen.tolist()]
        return InMemoryImages(images[ids].contiguous(), labels=chosen, captions=captions)
