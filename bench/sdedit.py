"""SDEdit (Meng et al. 2022) at several strengths: how far an edit moves from its input image
towards a new prompt, measured on shapes and shown as a picture.

For each of ``--n`` val scenes of one object, the input is the scene's image and the new prompt
the same caption with another colour (and, with ``--shape``, another shape). Every strength edits
every input with the same seed (strength 0 returns the input, 1 draws from noise), and the shipped
shapes oracle scores the result against the new prompt (caption exact, colour) and against the
input's (the old caption kept), with the PSNR to the input:

    python bench/sdedit.py CKPT [--n 128] [--strengths 0,0.25,0.5,0.75,1] [--out docs/sdedit.png]

The picture has one row per strength for the first 8 inputs, each image captioned with the
strength, upscaled (nearest neighbour).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import genlab
from genlab.data.shapes import ShapesDataModule, caption_cells, caption_scene
from genlab.metrics.reconstruction import psnr
from genlab.metrics.text_image import CaptionAccuracy
from genlab.models.evaluators.shapes_oracle import WEIGHTS
from genlab.utils.checkpoint import DATA_CONFIG_KEY, read_checkpoint
from genlab.utils.images import save_image_grid


def edits(data: ShapesDataModule, n: int, shape: bool) -> tuple[list[str], list[str], torch.Tensor]:
    """(old captions, new captions, images) of the first ``n`` one-object val scenes; the new
    caption recolours the object (the next colour of the data's list) and, with ``shape``, also
    reshapes it."""
    dataset = data.split("val")
    old, new, images = [], [], []
    for i in range(50 * n):
        scene, _ = dataset.scene(i)
        if len(scene) != 1:
            continue
        obj = scene[0]
        color = data.colors[(data.colors.index(obj.color) + 1) % len(data.colors)]
        other = data.shapes[(data.shapes.index(obj.shape) + 1) % len(data.shapes)]
        edited = (type(obj)(other if shape else obj.shape, color, obj.size, obj.cell, obj.offset),)
        old.append(caption_scene(scene, template=0))
        new.append(caption_scene(edited, template=0))
        images.append(dataset[i]["image"])
        if len(old) == n:
            break
    return old, new, torch.stack(images)


def accuracy(oracle, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    metric = CaptionAccuracy()
    metric.update(
        oracle.parse(images), torch.from_numpy(np.stack([caption_cells(c) for c in captions]))
    )
    return {k: float(v) for k, v in metric.compute().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--strengths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--shape", action="store_true", help="change the shape as well")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="logs/sdedit.png")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    config = dict(read_checkpoint(args.ckpt)[DATA_CONFIG_KEY])
    config.pop("_target_", None)
    data = ShapesDataModule(**{**config, "val_size": 50 * args.n})
    model, oracle = genlab.load(args.ckpt), genlab.load(WEIGHTS)
    old, new, inputs = edits(data, args.n, args.shape)
    strengths = [float(s) for s in args.strengths.split(",")]
    print(
        f"checkpoint {args.ckpt}; {len(new)} one-object inputs, new prompt: another colour"
        + (" and shape" if args.shape else "")
    )
    print(f"{'strength':>8}{'new exact':>10}{'new colour':>11}{'old exact':>10}{'PSNR':>7}{'s':>6}")
    rows, results = [], {}
    for strength in strengths:
        start = time.monotonic()
        generator = torch.Generator().manual_seed(args.seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            drawn = model.generate(new, init_image=inputs, strength=strength, generator=generator)
        drawn = drawn.float()
        to_new, to_old = accuracy(oracle, drawn, new), accuracy(oracle, drawn, old)
        closeness = float(psnr(drawn, inputs).mean())
        results[strength] = {
            "new_exact": to_new["exact"],
            "new_color": to_new["color"],
            "old_exact": to_old["exact"],
            "psnr_to_input": closeness,
        }
        print(
            f"{strength:>8.2f}{to_new['exact']:>10.3f}{to_new['color']:>11.3f}"
            f"{to_old['exact']:>10.3f}{closeness:>7.1f}{time.monotonic() - start:>6.0f}"
        )
        rows.append(drawn[:8])
    images = torch.cat([inputs[:8], *rows])
    captions = [f"input: {c}" for c in old[:8]] + [
        f"s={s:g}: {c}" for s in strengths for c in new[:8]
    ]
    save_image_grid(images, args.out, nrow=8, cell=128, captions=captions)
    print(f"picture: {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.ckpt, "n": len(new), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
