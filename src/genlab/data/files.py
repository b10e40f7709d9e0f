"""Image files: the transform, reading, and the bad-file policy.

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

import logging
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import v2

from genlab.data.checks import check_bad_file_args

log = logging.getLogger(__name__)

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
