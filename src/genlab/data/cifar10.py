"""CIFAR-10 (Krizhevsky 2009): 50k training and 10k test colour images, 32x32, 10 classes.

Layout: ``data_dir/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``, the
official "python version" (pickled dicts with ``data`` ``(N, 3072)`` uint8, ``labels``,
``batch_label``, ``filenames``; ``batches.meta`` holds ``label_names``). Nothing is downloaded
unless ``download=true``. Val is the fixed slice of the last ``val_size`` official training
images, test the official test batch. Captions: ``a photo of a cat``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genlab.data.arrays import InMemoryImages, labelled_splits, resize_images
from genlab.data.checks import check_arg, missing_dataset, with_article
from genlab.data.datamodule import LabelledArraysDataModule

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{k}" for k in range(1, 6)]
FILES = [*TRAIN_FILES, "test_batch", "batches.meta"]
CLASS_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
LAYOUT = f"""  <data_dir>/{FOLDER}/data_batch_1 ... data_batch_5
  <data_dir>/{FOLDER}/test_batch
  <data_dir>/{FOLDER}/batches.meta
(the CIFAR-10 python version, cifar-10-python.tar.gz, unpacked in data_dir)"""


def read_pickle(path: Path) -> dict[str, Any]:
    """Load one CIFAR pickle (written by Python 2 or 3) as a dict with ``str`` keys."""
    try:
        with path.open("rb") as file:
            content = pickle.load(file, encoding="latin1")  # noqa: S301 - the official format
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as err:
        raise ValueError(f"{path}: not a CIFAR-10 pickle ({type(err).__name__}: {err})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: not a CIFAR-10 pickle (holds a {type(content).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR-10 batch file: uint8 images ``(N, 3, 32, 32)`` and long labels ``(N,)``."""
    batch = read_pickle(path)
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: a CIFAR-10 batch needs 'data' and 'labels', has {list(batch)}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected 'data' (N, 3072) and N 'labels', got {data.shape} and {len(labels)}"
        )
    if labels.size and not 0 <= labels.min() <= labels.max() < len(CLASS_NAMES):
        raise ValueError(f"{path}: labels outside [0, {len(CLASS_NAMES)})")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32))  # rows are R, G, B planes
    return images, torch.from_numpy(labels)


def read_cifar10(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read the official train (5 batches) and test arrays; check the class names."""
    label_names = read_pickle(folder / "batches.meta").get("label_names")
    if label_names != CLASS_NAMES:
        raise ValueError(f"{folder / 'batches.meta'}: label_names {label_names} are not CIFAR-10's")
    batches = [read_batch(folder / name) for name in TRAIN_FILES]
    train = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    return {"train": train, "test": read_batch(folder / "test_batch")}


class CIFAR10DataModule(LabelledArraysDataModule):
    """CIFAR-10 with labels and captions (see the module doc). ``seed`` is unused."""

    name = "cifar10"
    num_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES

    def __init__(
        self,
        *,
        data_dir: str = "data/",
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        resolution: int = 32,
        seed: int = 0,
        download: bool = False,
        val_size: int = 1000,
        random_flip: bool = True,
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
        check_arg(val_size >= 1, "val_size", val_size, "an int >= 1")
        self.folder = self.data_dir / FOLDER
        self.download = download
        self.val_size = val_size
        self.random_flip = random_flip
        self.splits: dict[str, InMemoryImages] | None = None

    def missing_files(self) -> list[str]:
        """The official files that are not in ``data_dir/cifar-10-batches-py``."""
        return [name for name in FILES if not (self.folder / name).is_file()]

    def prepare_data(self) -> None:
        """Download and unpack CIFAR-10 into ``data_dir`` if ``download`` and it is missing."""
        if self.download and self.missing_files():
            from torchvision.datasets import CIFAR10

            CIFAR10(root=str(self.data_dir), train=True, download=True)

    def build_splits(self) -> dict[str, InMemoryImages]:
        """Read the files once, resize if needed, and split off val."""
        if self.splits is None:
            self.prepare_data()
            missing = self.missing_files()
            if missing:
                raise missing_dataset(
                    f"CIFAR-10 (missing {', '.join(missing)})",
                    self.folder / missing[0],
                    LAYOUT,
                    "Put the files there, or set data.download=true to download them.",
                )
            arrays = read_cifar10(self.folder)
            sized = {k: (resize_images(x, self.resolution), y) for k, (x, y) in arrays.items()}
            captions = [f"a photo of {with_article(name)}" for name in CLASS_NAMES]
            self.splits = labelled_splits(
                sized["train"],
                sized["test"],
                val_size=self.val_size,
                class_captions=captions,
                flip=self.random_flip,
            )
        return self.splits
