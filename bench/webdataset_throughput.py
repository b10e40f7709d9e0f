"""Reading speed of ``data=webdataset`` against the map-style ``data=image_folder`` on the same
images, and what a resume costs.

Writes ``--count`` shapes scenes as PNGs at ``--resolution`` into an image folder (captions in
``captions.jsonl``) and, with ``src/make_shards.py``, into shards of ``--maxcount``; then reads
one training epoch of each with ``--workers`` loader workers and prints samples/s (the batches as
a training step receives them: decoded, cropped, collated). Finally it resumes the stream in the
middle of a shard and prints the time to the first batch against a fresh start, and the
samples replayed (read from the tar, not decoded).

    python bench/webdataset_throughput.py [--count 4000] [--resolution 64] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch

from genlab.data.image_folder import ImageFolderDataModule
from genlab.data.shapes import ShapesDataset
from genlab.data.webdataset import WebDataModule

ROOT = Path(__file__).resolve().parents[1]


def make_shards_module():
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "src" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_folder(folder: Path, count: int, resolution: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    dataset = ShapesDataset("train", size=count, resolution=resolution)
    with (folder / "captions.jsonl").open("w") as captions:
        for i in range(count):
            item = dataset[i]
            pixels = item["image"].add(1).mul(127.5).round().clamp(0, 255).byte()
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")
            captions.write(json.dumps({"file_name": f"{i:06d}.png", "text": item["caption"]}))
            captions.write("\n")


def rate(loader, epoch_samples: int) -> float:
    start = time.perf_counter()
    n = sum(len(batch["caption"]) for batch in loader)
    assert n <= epoch_samples
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--maxcount", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder, shards = Path(tmp) / "images", Path(tmp) / "shards" / "train-%06d.tar"
        write_folder(folder, args.count, args.resolution)
        make_shards = make_shards_module()
        make_shards.main(
            ["--source", "image_folder", "--input", str(folder), "--output", str(shards)]
            + ["--maxcount", str(args.maxcount), "--split", "train", "--val-fraction", "0.01"]
        )
        urls = make_shards.brace_pattern(str(shards), len(list(shards.parent.iterdir())))
        common = dict(batch_size=args.batch_size, resolution=args.resolution)
        print(f"{args.count} images at {args.resolution} px, batch {args.batch_size}")
        for workers in args.workers:
            folder_dm = ImageFolderDataModule(
                data_dir=tmp, root="images", val_fraction=0.01, num_workers=workers, **common
            )
            folder_dm.setup("fit")
            stream_dm = WebDataModule(urls=urls, num_workers=workers, val_size=8, **common)
            stream_dm.setup("fit")
            samples = len(folder_dm.data_train)
            folder_rate = rate(folder_dm.train_dataloader(), samples)
            stream_rate = rate(stream_dm.train_dataloader(), samples)
            print(
                f"workers={workers}: image_folder {folder_rate:7.0f} samples/s, "
                f"webdataset {stream_rate:7.0f} samples/s ({stream_rate / folder_rate:.2f}x)"
            )
        # resume half-way through the first shard of each worker
        stream_dm = WebDataModule(urls=urls, val_size=8, **common)
        loader = stream_dm.train_dataloader()
        progress = [0, 0]
        loader.progress = lambda: tuple(progress)
        iterator = iter(loader)
        start = time.perf_counter()
        next(iterator)
        fresh = time.perf_counter() - start
        stop_at = args.maxcount // 2 // args.batch_size
        for _ in range(stop_at - 1):
            next(iterator)
        progress[1] = stop_at
        state = loader.state_dict()
        resumed = stream_dm.train_dataloader()
        resumed.progress = lambda: tuple(progress)
        resumed.load_state_dict(state)
        start = time.perf_counter()
        next(iter(resumed))
        again = time.perf_counter() - start
        print(
            f"resume after {stop_at} batches ({stop_at * args.batch_size} samples replayed "
            f"without decoding): first batch in {again:.3f} s, against {fresh:.3f} s from the "
            "epoch start"
        )


if __name__ == "__main__":
    main()
