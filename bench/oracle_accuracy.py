"""Accuracy of a shapes oracle checkpoint on real held-out shapes images.

Loads the checkpoint with ``genlab.load`` and parses three splits that training never shows as
items: (a) the test split of the default data config (conf/data/shapes.yaml: 3 shapes, 6 colours,
1-2 objects, held-out pairs), (b) its compositional split (every image shows a held-out pair),
(c) the test split of the oracle's own training data (the data config stored in the checkpoint).
Prints, per split, the share of images parsed exactly (all 9 cells), the per-cell occupancy
accuracy and the shape, colour and size accuracies on occupied cells, and the parse time.

    python bench/oracle_accuracy.py CKPT [--size 1024] [--batch 256]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Dataset

import genlab
from genlab.data.shapes import ShapesDataModule, cells_from_attributes
from genlab.utils.checkpoint import DATA_CONFIG_KEY, read_checkpoint


def accuracies(oracle, dataset: Dataset, batch: int) -> dict[str, float]:
    """Exact-parse rate, occupancy accuracy per cell, attribute accuracies on occupied cells."""
    hits = {"exact": [], "occupancy": [], "shape": [], "color": [], "size": []}
    for items in DataLoader(dataset, batch_size=batch):
        cells = cells_from_attributes(items["attributes"])  # (B, 9, 3)
        parsed = oracle.parse(items["image"]).cpu()
        occupied = cells[..., 0] >= 0  # (B, 9)
        hits["exact"].append((parsed == cells).all(dim=2).all(dim=1))
        hits["occupancy"].append(((parsed[..., 0] >= 0) == occupied).flatten())
        for k, name in enumerate(("shape", "color", "size")):
            hits[name].append((parsed[..., k] == cells[..., k])[occupied])
    return {name: torch.cat(h).float().mean().item() for name, h in hits.items()}


def own_data_config(path: str) -> dict:
    """The data config stored in the checkpoint (the oracle's training distribution)."""
    config = dict(read_checkpoint(path).get(DATA_CONFIG_KEY) or {})
    if not config:
        raise ValueError(f"{path} stores no data config: cannot rebuild its training data")
    config.pop("_target_", None)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--size", type=int, default=1024, help="images per split")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    oracle = genlab.load(args.ckpt)
    default = ShapesDataModule(test_size=args.size, compositional_size=args.size)
    own = ShapesDataModule(**{**own_data_config(args.ckpt), "test_size": args.size})
    splits = {
        "(a) default test": default.split("test"),
        "(b) default compositional": default.split("compositional"),
        "(c) oracle's own test": own.split("test"),
    }
    print(f"checkpoint: {args.ckpt}")
    print(
        f"{'split':28s} {'images':>6s} {'exact':>7s} {'occup.':>7s} {'shape':>7s} "
        f"{'color':>7s} {'size':>7s} {'s':>6s}"
    )
    for name, dataset in splits.items():
        start = time.perf_counter()
        acc = accuracies(oracle, dataset, args.batch)
        seconds = time.perf_counter() - start
        figures = " ".join(
            f"{acc[k]:7.4f}" for k in ("exact", "occupancy", "shape", "color", "size")
        )
        print(f"{name:28s} {len(dataset):6d} {figures} {seconds:6.1f}")


if __name__ == "__main__":
    main()
