"""MS-COCO 2017 captions (Chen et al. 2015): 118k train and 5k val images, ~5 captions each.

Layout under ``data_dir``: ``coco/annotations/captions_{train,val}2017.json`` and
``coco/{train,val}2017/*.jpg`` (the official archives, unpacked). The train split reads
train2017 and draws one of an image's captions at every access; val (the first ``val_size``
images of val2017 by image id) and test (the first ``test_size``, or all) read val2017 with the
first caption by annotation id. Images are resized (shorter side) and cropped as in
:mod:`genlab.data.image_folder`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

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
from genlab.data.files import ImageFiles, check_image_files, image_transform

LAYOUT = """  <root>/annotations/captions_train2017.json
  <root>/annotations/captions_val2017.json
  <root>/train2017/<image id>.jpg
  <root>/val2017/<image id>.jpg
(root = data_dir/coco by default: unpack the official annotations_trainval2017.zip,
train2017.zip and val2017.zip from cocodataset.org there)"""
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}


@dataclass
class CocoCaptions:
    """The captioned images of one annotation file: file names and captions, by image id."""

    files: list[str]
    captions: list[list[str]]


def read_coco_captions(path: Path) -> CocoCaptions:
    """Read a ``captions_*.json``: images sorted by id, each with its captions by annotation id.

    Images without a caption are left out.

    Raises:
        ValueError: naming the file if it is not JSON in the COCO captions format.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        by_image = defaultdict(list)
        for annotation in sorted(data["annotations"], key=lambda a: a["id"]):
            by_image[annotation["image_id"]].append(annotation["caption"].strip())
        images = sorted(data["images"], key=lambda image: image["id"])
        files = [image["file_name"] for image in images if by_image[image["id"]]]
        captions = [by_image[image["id"]] for image in images if by_image[image["id"]]]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"{path}: not a COCO captions file: expected {{'images': [{{'id', 'file_name'}}], "
            f"'annotations': [{{'id', 'image_id', 'caption'}}]}} ({type(err).__name__}: {err})"
        ) from None
    if not files:
        raise ValueError(f"{path}: no image has a caption")
    return CocoCaptions(files, captions)


class CocoDataModule(GenDataModule):
    """MS-COCO 2017 captions (see the module doc). ``seed`` is unused: the splits are fixed."""

    name = "coco"

    def __init__(
        self,
        *,
        data_dir: str = "data/",
        root: str = "coco",
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        resolution: int = 64,
        seed: int = 0,
        crop: Crop = "center",
        random_flip: bool = False,
        val_size: int = 1000,
        test_size: int | None = None,
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
        check_choice("crop", crop, CROPS)
        check_arg(val_size >= 1, "val_size", val_size, "an int >= 1")
        check_arg(
            test_size is None or test_size >= 1, "test_size", test_size, "null or an int >= 1"
        )
        check_bad_file_args(bad_files, max_consecutive_bad)
        self.root = self.data_dir / root
        self.crop = crop
        self.random_flip = random_flip
        self.sizes = {"val": val_size, "test": test_size}
        self.bad_files = bad_files
        self.max_consecutive_bad = max_consecutive_bad
        self.annotations: dict[str, CocoCaptions] = {}

    def read(self, part: str) -> CocoCaptions:
        """The captions of ``train2017`` or ``val2017`` (``part``: train/val), read once."""
        if part not in self.annotations:
            path = self.root / "annotations" / f"captions_{part}2017.json"
            for needed in (path, self.root / f"{part}2017"):
                if not needed.exists():
                    raise missing_dataset(f"COCO {part}2017", needed, LAYOUT)
            self.annotations[part] = read_coco_captions(path)
        return self.annotations[part]

    def make_split(self, split: str) -> ImageFiles:
        """The dataset of ``split``: train2017, or the first val/test images of val2017."""
        part = "train" if split == "train" else "val"
        coco = self.read(part)
        count = len(coco.files) if self.sizes.get(split) is None else self.sizes[split]
        if count > len(coco.files):
            raise ValueError(
                f"{split}_size={count} is larger than the {len(coco.files)} captioned images of "
                f"{self.root / f'{part}2017'}"
            )
        paths = [self.root / f"{part}2017" / name for name in coco.files[:count]]
        if self.bad_files == "strict":
            check_image_files(paths, f"COCO {split} split")
        training = split == "train"
        transform = image_transform(
            self.resolution,
            crop=self.crop if training else "center",
            flip=self.random_flip and training,
        )
        return ImageFiles(
            paths,
            transform=transform,
            captions=coco.captions[:count],
            random_caption=training,
            bad_files=self.bad_files,
            max_consecutive_bad=self.max_consecutive_bad,
            min_size=self.resolution,
        )

    def setup(self, stage: str | None = None) -> None:
        """Read the annotations and build the splits that ``stage`` needs."""
        splits = STAGE_SPLITS.get(stage, ("train", "val", "test"))
        for split in splits:
            attribute = f"data_{split}"
            if getattr(self, attribute) is None:
                setattr(self, attribute, self.make_split(split))

    def train_captions(self) -> list[str]:
        """Every caption of every train2017 image."""
        return [text for captions in self.read("train").captions for text in captions]

    def caption_pool(self, split: str) -> list[str]:
        """Every caption of every image of ``split`` (val / test: of val2017; train: train2017),
        images by id, captions by annotation id: what random-caption protocols draw from."""
        part = "train" if split == "train" else "val"
        coco = self.read(part)
        count = len(coco.files) if self.sizes.get(split) is None else self.sizes[split]
        return [text for captions in coco.captions[:count] for text in captions]

    def sample_prompts(self, n: int) -> list[str]:
        """The first caption of the first ``n`` val images (cycling past ``val_size``)."""
        captions = self.read("val").captions[: self.sizes["val"]]
        return [captions[i % len(captions)][0] for i in range(n)]
