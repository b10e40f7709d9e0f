"""What every genlab DataModule shares: the base class, argument checks, image files, transforms.

The data contract (DESIGN.md): batches are dicts with ``image`` ``(B, C, H, W)`` in ``[-1, 1]``,
``caption`` (``list[str]``, captioned datasets), ``label`` (long ``(B,)``, class-labelled
datasets) and ``index`` (long ``(B,)``, the position of the item in its split).

Unreadable image files follow the ``bad_files`` policy of the DataModule:

* ``"strict"``: :func:`check_image_files` decodes every file at ``setup()`` (JPEGs at 1/8 scale,
  which reads the whole stream and so finds truncated files) and raises a ``ValueError`` listing
  the first bad paths and their count; a file that still fails later raises a ``RuntimeError``.
* ``"skip"``: :class:`ImageFiles` replaces a bad item by the next readable one (``i+1, i+2, ...``,
  so the replacement is deterministic), logs a warning naming the file and flags it in a
  shared-memory tensor. Loader worker processes write into the same tensor, so
  :meth:`GenDataModule.skipped_files` in the main process counts the distinct bad files that any
  worker of this process met; every DDP rank counts its own share. ``max_consecutive_bad`` bad
  files in a row raise a ``RuntimeError``: the dataset is broken, not noisy.
"""

from __future__ import annotations

import copy
import functools
import logging
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning import LightningDataModule
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from genlab.data.resumable import ResumableLoader, ResumableSampler, SeededItems

log = logging.getLogger(__name__)

BadFiles = Literal["strict", "skip"]
Crop = Literal["center", "random"]
BAD_FILE_POLICIES = ("strict", "skip")
CROPS = ("center", "random")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# What PIL raises on a missing, truncated or garbled file, depending on the format.
READ_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)
SHOWN_BAD_FILES = 5
RESIZE_CHUNK = 2048  # images per interpolation call in resize_images
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_CAPTIONS = [f"a handwritten {name}" for name in DIGIT_NAMES]  # digits and mnist
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


def check_arg(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise a ``ValueError`` naming the argument, its value and what is allowed, unless ``ok``."""
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: expected {allowed}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Check that ``value`` is one of ``choices``."""
    check_arg(value in choices, name, value, f"one of {list(choices)}")


def check_bad_file_args(bad_files: str, max_consecutive_bad: int) -> None:
    """Check the two arguments of the bad-file policy."""
    check_choice("bad_files", bad_files, BAD_FILE_POLICIES)
    check_arg(max_consecutive_bad >= 1, "max_consecutive_bad", max_consecutive_bad, "an int >= 1")


def with_article(phrase: str) -> str:
    """Prefix ``phrase`` with the indefinite article it takes: ``an orange``, ``a red circle``."""
    return f"{'an' if phrase[:1].lower() in 'aeiou' else 'a'} {phrase}"


def jsonable(value: Any) -> Any:
    """Turn config values (OmegaConf lists and dicts, tuples, paths) into plain JSON types."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def missing_dataset(what: str, looked_at: Path, layout: str, hint: str = "") -> FileNotFoundError:
    """Build the error for a dataset that is not on disk: the path, the layout, what to do."""
    message = f"{what} not found: {looked_at} does not exist.\nExpected layout:\n{layout}"
    return FileNotFoundError(message + (f"\n{hint}" if hint else ""))


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


def check_batch(
    batch: Mapping[str, Any], *, channels: int, resolution: int, captions: bool, labels: bool
) -> None:
    """Check a batch against the data contract; raise a ``ValueError`` saying what breaks it.

    Args:
        batch: a collated batch.
        channels: the expected number of image channels.
        resolution: the expected image height and width.
        captions: whether ``caption`` must be present (else it must be absent).
        labels: whether ``label`` must be present (else it must be absent).
    """
    image = batch.get("image")
    problems = image_problems(image, channels, resolution)
    size = image.shape[0] if not problems else None
    expected = {"index": True, "label": labels, "caption": captions}
    for key, wanted in expected.items():
        value = batch.get(key)
        if not wanted and value is not None:
            problems.append(f"{key} is present, but this dataset has no {key}s")
        elif wanted and not fits_key(key, value, size):
            problems.append(f"{key} does not fit the contract: {describe_value(value)}")
    if problems:
        raise ValueError("batch breaks the data contract: " + "; ".join(problems))


def image_problems(image: Any, channels: int, resolution: int) -> list[str]:
    """What is wrong with a batch's ``image`` under the data contract."""
    if not isinstance(image, torch.Tensor) or image.dtype != torch.float32 or image.ndim != 4:
        return [f"image must be a float32 (B, C, H, W) tensor, got {describe_value(image)}"]
    problems = []
    if tuple(image.shape[1:]) != (channels, resolution, resolution):
        shape = (channels, resolution, resolution)
        problems.append(f"image shape {tuple(image.shape)} is not (B, *{shape})")
    if image.numel() and (image.min() < -1 or image.max() > 1):
        problems.append(f"image values span [{image.min():.3f}, {image.max():.3f}], not [-1, 1]")
    return problems


def fits_key(key: str, value: Any, size: int | None) -> bool:
    """Whether ``value`` fits the contract of ``index``/``label`` (long (B,)) or ``caption``."""
    if key == "caption":
        is_list = isinstance(value, list) and all(isinstance(c, str) for c in value)
        return is_list and (size is None or len(value) == size)
    is_long = isinstance(value, torch.Tensor) and value.dtype == torch.long and value.ndim == 1
    return is_long and (size is None or value.shape[0] == size)


def describe_value(value: Any) -> str:
    """A short description of a value for error messages: type, dtype and shape."""
    if isinstance(value, torch.Tensor):
        return f"tensor {value.dtype} {tuple(value.shape)}"
    if isinstance(value, list):
        return f"list of {len(value)} ({', '.join(sorted({type(v).__name__ for v in value}))})"
    return type(value).__name__


def image_transform(
    resolution: int, *, channels: int = 3, crop: str = "center", flip: bool = False
) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the shorter side to ``resolution``, crop a square, flip, scale to ``[-1, 1]``."""
    steps = [
        v2.Resize(resolution, antialias=True),
        v2.CenterCrop(resolution) if crop == "center" else v2.RandomCrop(resolution),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize([0.5] * channels, [0.5] * channels),
    ]
    return v2.Compose(steps)


def read_image(path: str | Path, *, channels: int = 3, min_size: int | None = None) -> Image.Image:
    """Decode an image file as RGB (``channels=3``) or grey, upright by its EXIF orientation.

    ``min_size`` lets JPEG decode at a reduced scale (1/2 to 1/8, a DCT-domain downsampling)
    while both sides stay at least ``min_size``: much faster when the target is small.
    """
    mode = "RGB" if channels == 3 else "L"
    with Image.open(path) as image:
        if min_size is not None:
            image.draft(mode, (min_size, min_size))
        return to_mode(ImageOps.exif_transpose(image), mode)


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """``image`` as 8-bit ``mode`` (``RGB`` or ``L``), whatever it was stored as.

    * transparency (RGBA, LA, a palette with a transparent index) is composited onto white, as
      an image viewer shows it, instead of keeping the colours under the transparent pixels;
    * 16- and 32-bit integer and float greys (``I;16``, ``I``, ``F``) are scaled to 0-255 by
      their bit depth (PIL's own conversion clips them, which turns most 16-bit images white).
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" else 65535.0 if image.mode.startswith("I;16") else None
        if top is None:  # 32-bit integers: by the range they use, 16 bits when they fit
            top = 65535.0 if values.max(initial=0) > 255 else 255.0
        scaled = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(scaled, mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert(mode)


def image_error(path: str | Path) -> str | None:
    """Why the image at ``path`` cannot be decoded, or ``None`` if it can.

    JPEGs decode at 1/8 scale, which still reads the whole stream: truncation is found.
    """
    try:
        with Image.open(path) as image:
            image.draft(image.mode, (1, 1))
            image.load()
    except READ_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return None


def check_image_files(paths: Sequence[str | Path], what: str) -> None:
    """Decode every file of ``paths`` (the ``strict`` policy); raise listing the bad ones."""
    log.info("%s: checking %d image files (bad_files='strict')", what, len(paths))
    bad = [(p, err) for p in paths if (err := image_error(p)) is not None]
    if bad:
        shown = "\n".join(f"  {p}: {err}" for p, err in bad[:SHOWN_BAD_FILES])
        raise ValueError(
            f"{what}: {len(bad)} of {len(paths)} image files cannot be read (bad_files='strict'); "
            f"the first {min(len(bad), SHOWN_BAD_FILES)}:\n{shown}\n"
            "Fix or remove them, or set data.bad_files=skip to skip them with a warning."
        )


class ImageFiles(Dataset):
    """Image files with optional captions and labels, read under a bad-file policy.

    An item is ``{"image", "index"[, "caption"][, "label"]}``. With several captions per image,
    training (``random_caption``) draws one per access and evaluation takes the first. Under
    ``bad_files="skip"`` an unreadable item ``i`` is replaced by the next readable one, and the
    returned ``index`` is that of the item actually returned, so image, caption and label agree.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        *,
        transform: Callable[[Image.Image], torch.Tensor],
        channels: int = 3,
        captions: Sequence[Sequence[str]] | None = None,
        labels: Sequence[int] | None = None,
        random_caption: bool = False,
        bad_files: str = "skip",
        max_consecutive_bad: int = 20,
        min_size: int | None = None,
    ) -> None:
        check_bad_file_args(bad_files, max_consecutive_bad)
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.channels = channels
        self.captions = captions
        self.labels = labels
        self.random_caption = random_caption
        self.bad_files = bad_files
        self.max_consecutive_bad = max_consecutive_bad
        self.min_size = min_size
        # One flag per file, in shared memory: loader workers flag, the main process counts.
        self.bad = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        tries = min(self.max_consecutive_bad, len(self))
        for step in range(tries):
            j = (index + step) % len(self)
            image = self.load(j)
            if image is not None:
                return self.item(j, image)
        raise RuntimeError(
            f"{tries} image files in a row cannot be read (items {index} to {index + tries - 1} "
            f"mod {len(self)}, first {self.paths[index]}); max_consecutive_bad="
            f"{self.max_consecutive_bad} stops here: the dataset looks broken, not noisy"
        )

    def load(self, j: int) -> Image.Image | None:
        """Decode file ``j``; under ``skip``, flag and warn about a bad file and return ``None``."""
        if self.bad[j]:
            return None
        try:
            return read_image(self.paths[j], channels=self.channels, min_size=self.min_size)
        except READ_ERRORS as err:
            if self.bad_files == "strict":
                raise RuntimeError(f"cannot read image {self.paths[j]}: {err}") from err
            self.bad[j] = True
            log.warning(
                "skipping unreadable image %s (%s: %s); %d bad files skipped so far",
                self.paths[j],
                type(err).__name__,
                err,
                int(self.bad.sum()),
            )
            return None

    def item(self, j: int, image: Image.Image) -> dict[str, Any]:
        """The dict item of file ``j`` from its decoded image."""
        item: dict[str, Any] = {"image": self.transform(image), "index": j}
        if self.captions is not None:
            options = self.captions[j]
            pick = int(torch.randint(len(options), ())) if self.random_caption else 0
            item["caption"] = options[pick]
        if self.labels is not None:
            item["label"] = self.labels[j]
        return item

    def bad_paths(self) -> list[str]:
        """The files flagged unreadable so far (by this process or its loader workers)."""
        return [self.paths[j] for j in torch.nonzero(self.bad).flatten().tolist()]


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
