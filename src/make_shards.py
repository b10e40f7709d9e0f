"""Write WebDataset tar shards for ``data=webdataset`` from an image folder, COCO or shapes.

    python src/make_shards.py --source image_folder --input data/my_images \\
        --output data/shards/train-%06d.tar --maxcount 1000 [--split train] [--class-folders]
    python src/make_shards.py --source coco --input data/coco --split val \\
        --output data/shards/coco-val-%06d.tar
    python src/make_shards.py --source shapes --count 20000 --resolution 32 \\
        --output data/shards/shapes-train-%06d.tar

Each sample is ``<key>.<image extension>`` (the original file's bytes for an image folder and
COCO, a PNG for shapes), ``<key>.txt`` (its captions, one per line) and, with labels
(``--class-folders``, or ``--label`` for shapes), ``<key>.cls``. Samples are written in a random
order (``--seed``; ``--no-shuffle`` keeps the source order), because a stream mixes only within
its shuffle buffer. Each shard is written to a temporary file and renamed when complete, so a
shard that exists is whole. The command prints the ``data.urls`` pattern of what it wrote.

Splits: an image folder's ``train``/``val``/``test`` are those of ``data=image_folder`` (its
``--val-fraction``/``--test-fraction`` and ``--seed``); COCO's ``train`` is train2017 and
``val`` is val2017; shapes writes the split it is asked for.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

SOURCES = ("image_folder", "coco", "shapes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write WebDataset tar shards (image, caption, label) for data=webdataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--source", choices=SOURCES, required=True)
    parser.add_argument(
        "--input", help="the image folder, or the COCO root (with annotations/, train2017/ ...)"
    )
    parser.add_argument(
        "--output", required=True, help="shard path with a %%d field: out/train-%%06d.tar"
    )
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    parser.add_argument("--split", default="train", help="train | val | test (see the doc)")
    parser.add_argument("--seed", type=int, default=0, help="sample order and folder splits")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    parser.add_argument("--limit", type=int, default=None, help="write at most this many")
    group = parser.add_argument_group("image_folder")
    group.add_argument("--captions", default="auto", help="auto | jsonl | txt | none")
    group.add_argument("--class-folders", action="store_true", help="labels from subfolders")
    group.add_argument("--val-fraction", type=float, default=0.05)
    group.add_argument("--test-fraction", type=float, default=0.0)
    group = parser.add_argument_group("shapes")
    group.add_argument("--count", type=int, default=20000, help="samples of the split")
    group.add_argument("--resolution", type=int, default=32, help="16, 32 or 64")
    group.add_argument("--label", default=None, help="shape | color | shape_color")
    args = parser.parse_args(argv)
    if args.source != "shapes" and not args.input:
        parser.error(f"--source {args.source} needs --input")
    if args.maxcount < 1:
        parser.error("--maxcount must be >= 1")
    try:
        args.output % 0
    except TypeError:
        parser.error(f"--output {args.output!r} needs a %d field for the shard number")
    return args


def folder_samples(args: argparse.Namespace) -> list[tuple[str, bytes, list[str], int | None]]:
    """``(extension, file bytes, captions, label)`` of the image-folder split ``--split``."""
    from genlab.data.image_folder import ImageFolderDataModule

    dm = ImageFolderDataModule(
        data_dir=".",
        root=str(Path(args.input).resolve()),
        captions=args.captions,
        class_folders=args.class_folders,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )
    index, ids = dm.scan(), dm.split_parts()[args.split]
    return [
        (
            index.paths[i].suffix.lower().lstrip("."),
            index.paths[i],
            index.captions[i] if index.captions is not None else [],
            index.labels[i] if index.labels is not None else None,
        )
        for i in ids
    ]


def coco_samples(args: argparse.Namespace) -> list[tuple[str, Path, list[str], None]]:
    """``(extension, path, captions, None)`` of train2017 or val2017 (``--split``)."""
    from genlab.data.coco import CocoDataModule

    if args.split not in ("train", "val"):
        raise SystemExit(f"--source coco: --split must be train or val, not {args.split!r}")
    root = Path(args.input).resolve()
    coco = CocoDataModule(data_dir=str(root.parent), root=root.name).read(args.split)
    folder = root / f"{args.split}2017"
    return [
        (Path(name).suffix.lower().lstrip("."), folder / name, captions, None)
        for name, captions in zip(coco.files, coco.captions, strict=True)
    ]


def shapes_samples(args: argparse.Namespace) -> Iterator[tuple[str, bytes, list[str], int | None]]:
    """PNGs of the shapes split ``--split`` (``--count`` scenes at ``--resolution``)."""
    from genlab.data.shapes import ShapesDataModule

    dm = ShapesDataModule(resolution=args.resolution, seed=args.seed, label=args.label)
    dm.sizes[args.split] = args.count
    dataset = dm.split(args.split)
    for i in range(len(dataset)):
        item = dataset[i]
        pixels = item["image"].add(1).mul(127.5).round().clamp(0, 255).byte()
        buffer = io.BytesIO()
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        yield "png", buffer.getvalue(), [item["caption"]], item.get("label")


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes samples into shards of ``maxcount``, each to a temporary file renamed when whole."""

    def __init__(self, pattern: str, maxcount: int) -> None:
        self.pattern, self.maxcount = pattern, maxcount
        self.shards: list[str] = []
        self.tar: tarfile.TarFile | None = None
        self.temp = ""
        self.count = 0
        self.total = 0

    def write(self, key: str, ext: str, image: bytes, captions: list[str], label: int | None):
        if self.tar is None or self.count == self.maxcount:
            self.finish()
            path = self.pattern % len(self.shards)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.shards.append(path)
            self.temp = f"{path}.tmp-{os.getpid()}"
            self.tar = tarfile.open(self.temp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
            self.count = 0
        add_member(self.tar, f"{key}.{ext}", image)
        if captions:
            add_member(self.tar, f"{key}.txt", "\n".join(captions).encode("utf-8"))
        if label is not None:
            add_member(self.tar, f"{key}.cls", str(int(label)).encode())
        self.count += 1
        self.total += 1

    def finish(self) -> None:
        if self.tar is not None:
            self.tar.close()
            os.replace(self.temp, self.shards[-1])
            self.tar = None

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            Path(self.temp).unlink(missing_ok=True)
            self.tar = None


def brace_pattern(pattern: str, count: int) -> str:
    """The ``data.urls`` brace pattern of shards ``0..count-1`` written with ``pattern``."""
    if count == 1:
        return pattern % 0
    first, last = pattern % 0, pattern % (count - 1)
    start = len(os.path.commonprefix([first, last]))
    end = len(os.path.commonprefix([first[::-1], last[::-1]]))
    # widen to whole numbers: back to the first digit of the differing run
    while start > 0 and first[start - 1].isdigit():
        start -= 1
    while end > 0 and first[len(first) - end].isdigit():
        end -= 1
    return f"{first[:start]}{{{first[start : len(first) - end]}..{last[start : len(last) - end]}}}{first[len(first) - end :]}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = {"image_folder": folder_samples, "coco": coco_samples, "shapes": shapes_samples}
    samples = source[args.source](args)
    if not isinstance(samples, list):
        samples = list(samples)
    if not args.no_shuffle:
        order = np.random.default_rng(args.seed).permutation(len(samples))
        samples = [samples[k] for k in order]
    if args.limit is not None:
        samples = samples[: args.limit]
    if not samples:
        raise SystemExit(f"no samples to write from {args.source} {args.input or ''}")
    writer = ShardWriter(args.output, args.maxcount)
    start = time.monotonic()
    try:
        for number, (ext, image, captions, label) in enumerate(samples):
            data = image if isinstance(image, bytes) else Path(image).read_bytes()
            writer.write(f"{number:09d}", ext, data, captions, label)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    seconds = time.monotonic() - start
    print(
        f"wrote {writer.total} samples in {len(writer.shards)} shards ({seconds:.1f} s): "
        f"data.urls='{brace_pattern(args.output, len(writer.shards))}'"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
