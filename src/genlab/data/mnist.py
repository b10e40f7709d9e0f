"""MNIST (LeCun et al. 1998): 60k training and 10k test handwritten digits, 28x28 grey.

Layout: ``data_dir/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (each file may also be
gzipped, ``.gz``), the official idx files. Nothing is downloaded unless ``download=true``.
Images are padded (``resize="pad"``, the usual 28 -> 32) or interpolated to ``resolution``. Val
is the fixed slice of the last ``val_size`` official training images, test the official test
set. Captions: ``a handwritten seven``, as for :mod:`genlab.data.digits`.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from genlab.data.arrays import (
    DIGIT_CAPTIONS,
    DIGIT_NAMES,
    InMemoryImages,
    labelled_splits,
    resize_images,
)
from genlab.data.checks import check_arg, check_choice, missing_dataset
from genlab.data.datamodule import LabelledArraysDataModule

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SIDE = 28
IDX_UBYTE = 0x08  # the idx type code of unsigned bytes
LAYOUT = """  <data_dir>/MNIST/raw/train-images-idx3-ubyte[.gz]
  <data_dir>/MNIST/raw/train-labels-idx1-ubyte[.gz]
  <data_dir>/MNIST/raw/t10k-images-idx3-ubyte[.gz]
  <data_dir>/MNIST/raw/t10k-labels-idx1-ubyte[.gz]"""


def read_idx(path: Path) -> np.ndarray:
    """Read an unsigned-byte idx file (gzipped if it ends in ``.gz``) as an array.

    The format: two zero bytes, the type code 0x08, the number of dimensions, one big-endian
    uint32 per dimension, then the data in C order.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != IDX_UBYTE:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: idx header cut short")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise ValueError(f"{path}: {len(data) - header} data bytes for shape {shape}: truncated?")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class MNISTDataModule(LabelledArraysDataModule):
    """MNIST with labels and captions (see the module doc). ``seed`` is unused."""

    name = "mnist"
    num_classes = 10
    class_names = DIGIT_NAMES

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
        resize: Literal["pad", "resize"] = "pad",
        download: bool = False,
        val_size: int = 1000,
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
        check_choice("channels", channels, (1, 3))
        check_choice("resize", resize, ("pad", "resize"))
        if resize == "pad":
            check_arg(resolution >= SIDE, "resolution", resolution, "an int >= 28 with resize=pad")
        check_arg(resolution >= 8, "resolution", resolution, "an int >= 8")
        check_arg(val_size >= 1, "val_size", val_size, "an int >= 1")
        self.raw = self.data_dir / "MNIST" / "raw"
        self.channels = channels
        self.resize = resize
        self.download = download
        self.val_size = val_size
        self.splits: dict[str, InMemoryImages] | None = None

    def find(self, name: str) -> Path | None:
        """The idx file ``name`` in ``MNIST/raw``, plain or gzipped, if present."""
        for candidate in (self.raw / name, self.raw / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def missing_files(self) -> list[str]:
        """The official idx files found neither plain nor gzipped."""
        return [name for pair in FILES.values() for name in pair if self.find(name) is None]

    def prepare_data(self) -> None:
        """Download MNIST into ``data_dir/MNIST/raw`` if ``download`` and it is missing."""
        if self.download and self.missing_files():
            from torchvision.datasets import MNIST

            MNIST(root=str(self.data_dir), train=True, download=True)

    def read_part(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(N, C, R, R)`` uint8 and labels ``(N,)`` of the official ``train``/``test``."""
        image_file, label_file = (self.find(name) for name in FILES[part])
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.shape[1:] != (SIDE, SIDE) or labels.shape != images.shape[:1]:
            raise ValueError(
                f"{image_file}, {label_file}: shapes {images.shape} and {labels.shape}; "
                "expected (N, 28, 28) images and (N,) labels"
            )
        pixels = torch.from_numpy(images.copy())[:, None]  # (N, 1, 28, 28)
        if self.resize == "pad":
            before = (self.resolution - SIDE) // 2
            after = self.resolution - SIDE - before
            pixels = torch.nn.functional.pad(pixels, (before, after, before, after))
        else:
            pixels = resize_images(pixels, self.resolution)
        return pixels.expand(-1, self.channels, -1, -1), torch.from_numpy(labels.astype(np.int64))

    def build_splits(self) -> dict[str, InMemoryImages]:
        """Read the idx files once and split off val."""
        if self.splits is None:
            self.prepare_data()
            missing = self.missing_files()
            if missing:
                raise missing_dataset(
                    f"MNIST (missing {', '.join(missing)})",
                    self.raw / missing[0],
                    LAYOUT,
                    "Put the files there, or set data.download=true to download them.",
                )
            self.splits = labelled_splits(
                self.read_part("train"),
                self.read_part("test"),
                val_size=self.val_size,
                class_captions=DIGIT_CAPTIONS,
            )
        return self.splits
