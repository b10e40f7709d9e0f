"""Any folder of images, with optional captions and class folders.

Layout: ``root`` (absolute, or relative to ``data_dir``) holds image files at any depth.
Captions come from ``root/captions.jsonl``, one JSON object per line,
``{"file_name": "relative/path.jpg", "text": "..."}`` (``caption`` is accepted for ``text``;
several lines may caption one image), or from a ``<image stem>.txt`` beside each image (one
caption per non-empty line). With ``class_folders`` the first-level subfolder names are the
classes. Images are resized (shorter side) and cropped to ``resolution``; the val (and optional
test) split is a seeded fraction of the files.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from genlab.data.arrays import split_indices
from genlab.data.checks import (
    CROPS,
    BadFiles,
    Crop,
    check_arg,
    check_bad_file_args,
    check_choice,
    missing_dataset,
)
from genlab.data.datamodule import GenDataModule
from genlab.data.files import IMAGE_EXTENSIONS, ImageFiles, check_image_files, image_transform

log = logging.getLogger(__name__)

CAPTION_SOURCES = ("auto", "jsonl", "txt", "none")
CAPTIONS_FILE = "captions.jsonl"
LAYOUT = """  <root>/**/<name>.{jpg,jpeg,png,bmp,gif,webp,tif,tiff}   images, at any depth
  <root>/captions.jsonl   optional: {"file_name": "relative/path.jpg", "text": "..."} per line
  <root>/**/<name>.txt    optional: the captions of <name>.<ext>, one per line
  <root>/<class>/...      with class_folders=true: one first-level folder per class"""
SHOWN = 5


@dataclass
class FolderIndex:
    """The files of a folder and what they carry: captions (several per file) and labels."""

    paths: list[Path]
    captions: list[list[str]] | None
    labels: list[int] | None
    class_names: list[str] | None


def find_images(root: Path) -> list[Path]:
    """All image files under ``root``, recursively, in sorted order."""
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def read_captions_jsonl(path: Path) -> dict[Path, list[str]]:
    """Read ``captions.jsonl``: the captions of each file it names, in line order.

    Raises:
        ValueError: naming the file and line of a line that is not a JSON object with a
            ``file_name`` and a ``text`` (or ``caption``) string, or that names a missing file.
    """
    captions: dict[Path, list[str]] = {}
    empty = 0
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                file, text = parse_caption_line(line, f"{path}:{number}")
                if not (path.parent / file).is_file():
                    raise ValueError(
                        f"{path}:{number}: names {file!r}, which is not a file under {path.parent}"
                    )
                if not text.strip():  # no caption: an image left with none is left out
                    empty += 1
                    continue
                captions.setdefault(Path(os.path.normpath(path.parent / file)), []).append(
                    text.strip()
                )
    if empty:
        log.warning("%s: %d empty captions ignored", path, empty)
    return captions


def parse_caption_line(line: str, where: str) -> tuple[str, str]:
    """Read ``(file_name, text)`` from one line of ``captions.jsonl``; ``where`` names the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}): {line.strip()[:80]!r}") from None
    text = record.get("text", record.get("caption")) if isinstance(record, dict) else None
    file = record.get("file_name") if isinstance(record, dict) else None
    if not isinstance(file, str) or not isinstance(text, str):
        raise ValueError(
            f'{where}: expected {{"file_name": "<relative path>", "text": "<caption>"}} '
            f"(or the key 'caption'), got {line.strip()[:80]!r}"
        )
    return file, text


def read_caption_txt(image: Path) -> list[str]:
    """The captions of ``image`` from the ``.txt`` beside it, one per non-empty line."""
    text_file = image.with_suffix(".txt")
    captions = [line.strip() for line in text_file.read_text(encoding="utf-8").splitlines()]
    captions = [c for c in captions if c]
    if not captions:
        raise ValueError(f"{text_file}: caption file is empty")
    return captions


class ImageFolderDataModule(GenDataModule):
    """A folder of images, optionally with captions and class labels (see the module doc)."""

    name = "image_folder"

    def __init__(
        self,
        *,
        data_dir: str = "data/",
        root: str = "images",
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        resolution: int = 64,
        seed: int = 0,
        channels: int = 3,
        captions: Literal["auto", "jsonl", "txt", "none"] = "auto",
        class_folders: bool = False,
        crop: Crop = "center",
        random_flip: bool = False,
        val_fraction: float = 0.05,
        test_fraction: float = 0.0,
        bad_files: BadFiles = "skip",
        max_consecutive_bad: int = 20,
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
        check_arg(bool(root), "root", root, "a folder path (absolute, or relative to data_dir)")
        check_choice("channels", channels, (1, 3))
        check_choice("captions", captions, CAPTION_SOURCES)
        check_choice("crop", crop, CROPS)
        check_arg(0 < val_fraction < 1, "val_fraction", val_fraction, "a float in (0, 1)")
        check_arg(
            0 <= test_fraction < 1 - val_fraction,
            "test_fraction",
            test_fraction,
            f"a float in [0, 1 - val_fraction = {1 - val_fraction})",
        )
        check_bad_file_args(bad_files, max_consecutive_bad)
        self.root = Path(os.path.normpath(self.data_dir / root))
        self.channels = channels
        self.caption_source = captions
        self.class_folders = class_folders
        self.crop = crop
        self.random_flip = random_flip
        self.fractions = (val_fraction, test_fraction)
        self.bad_files = bad_files
        self.max_consecutive_bad = max_consecutive_bad
        self.folder_index: FolderIndex | None = None
        self.parts: dict[str, list[int]] | None = None

    @property
    def num_classes(self) -> int | None:
        """The number of class folders (with ``class_folders``), else ``None``."""
        names = self.class_names
        return None if names is None else len(names)

    @property
    def class_names(self) -> list[str] | None:
        """The sorted class folder names (``class_folders``; scans the folder), else ``None``."""
        return self.scan().class_names if self.class_folders else None

    def scan(self) -> FolderIndex:
        """Find the images, their captions and labels once; errors name the path and layout."""
        if self.folder_index is None:
            if not self.root.is_dir():
                raise missing_dataset("image folder", self.root, LAYOUT, "Set data.root=<folder>.")
            paths = find_images(self.root)
            if not paths:
                raise ValueError(
                    f"{self.root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found\n{LAYOUT}"
                )
            paths, captions = self.find_captions(paths)
            labels, class_names = self.find_classes(paths) if self.class_folders else (None, None)
            self.folder_index = FolderIndex(paths, captions, labels, class_names)
        return self.folder_index

    def find_captions(self, paths: list[Path]) -> tuple[list[Path], list[list[str]] | None]:
        """The captioned images and their captions, from the source ``captions`` selects."""
        source = self.caption_source
        jsonl = self.root / CAPTIONS_FILE
        if source == "auto":
            has_txt = any(p.with_suffix(".txt").is_file() for p in paths)
            source = "jsonl" if jsonl.is_file() else "txt" if has_txt else "none"
        if source == "none":
            return paths, None
        if source == "txt":
            missing = [p for p in paths if not p.with_suffix(".txt").is_file()]
            if missing:
                shown = ", ".join(str(p) for p in missing[:SHOWN])
                raise ValueError(
                    f"{len(missing)} images under {self.root} have no caption .txt beside them: "
                    f"{shown}"
                )
            return paths, [read_caption_txt(p) for p in paths]
        if not jsonl.is_file():
            raise missing_dataset("captions file", jsonl, LAYOUT, "Or set data.captions=auto.")
        by_file = read_captions_jsonl(jsonl)
        kept = [p for p in paths if p in by_file]
        if not kept:
            raise ValueError(f"{jsonl}: captions none of the {len(paths)} images under {self.root}")
        if len(kept) < len(paths):
            log.info(
                "%s: %d of %d images have no caption in %s and are left out",
                self.root,
                len(paths) - len(kept),
                len(paths),
                jsonl,
            )
        return kept, [by_file[p] for p in kept]

    def find_classes(self, paths: list[Path]) -> tuple[list[int], list[str]]:
        """Labels from first-level folder names (sorted), for ``class_folders``."""
        relative = [p.relative_to(self.root).parts for p in paths]
        loose = [paths[i] for i, parts in enumerate(relative) if len(parts) < 2]
        if loose:
            raise ValueError(
                f"class_folders=true, but {len(loose)} images lie directly in {self.root} "
                f"instead of a class folder, e.g. {loose[0]}"
            )
        class_names = sorted({parts[0] for parts in relative})
        return [class_names.index(parts[0]) for parts in relative], class_names

    def split_parts(self) -> dict[str, list[int]]:
        """The file positions of the train, val and test splits (test is val if no test part)."""
        if self.parts is None:
            n = len(self.scan().paths)
            sizes = [max(1, round(n * f)) if f > 0 else 0 for f in self.fractions]
            if n - sum(sizes) < 1:
                raise ValueError(
                    f"{self.root}: {n} images are too few for (val_fraction, test_fraction) = "
                    f"{self.fractions}: no training image is left"
                )
            train, val, test = split_indices(n, sizes, self.seed)
            self.parts = {"train": train, "val": val, "test": test or val}
        return self.parts

    def make_split(self, split: str) -> ImageFiles:
        """The dataset of ``split``, training with a random crop, flip and caption if configured."""
        index, ids = self.scan(), self.split_parts()[split]
        training = split == "train"
        transform = image_transform(
            self.resolution,
            channels=self.channels,
            crop=self.crop if training else "center",
            flip=self.random_flip and training,
        )
        return ImageFiles(
            [index.paths[i] for i in ids],
            transform=transform,
            channels=self.channels,
            captions=None if index.captions is None else [index.captions[i] for i in ids],
            labels=None if index.labels is None else [index.labels[i] for i in ids],
            random_caption=training,
            bad_files=self.bad_files,
            max_consecutive_bad=self.max_consecutive_bad,
            min_size=self.resolution,
        )

    def setup(self, stage: str | None = None) -> None:
        """Scan the folder, check every file under ``strict``, and build the splits."""
        if self.data_train is None:
            index = self.scan()
            if self.bad_files == "strict":
                check_image_files(index.paths, f"image folder {self.root}")
            self.data_train, self.data_val, self.data_test = (
                self.make_split(s) for s in ("train", "val", "test")
            )

    def train_captions(self) -> list[str]:
        """Every caption of every training image; ``[]`` without captions."""
        captions = self.scan().captions
        if captions is None:
            return []
        return [text for i in self.split_parts()["train"] for text in captions[i]]

    def sample_prompts(self, n: int) -> list[str] | None:
        """The first caption of the first ``n`` val images (cycling); ``None`` without captions."""
        captions = self.scan().captions
        if captions is None:
            return None
        val = self.split_parts()["val"]
        return [captions[val[i % len(val)]][0] for i in range(n)]

    def describe(self) -> dict[str, Any]:
        """The config, with the resolved root folder."""
        return {**super().describe(), "root": str(self.root)}
