"""How much of an image its unCLIP variations keep: CLIP similarity to the source against a random
image, and the shapes oracle's reading of the variations against the source's scene.

For the first ``--images`` items of the shapes test split, the decoder draws ``--k`` variations
of each (its CLIP image embedding decoded with different seeds, ``UnCLIPDecoder.variations``).
Reported:

* ``cos(var, source)`` and ``cos(var, other)``: the mean CLIP cosine of a variation with its own
  source and with another source image (the next one in the split: a random image of the same
  distribution); ``closer`` is the share of variations nearer their source than that image;
* ``scene exact / shape / colour / size / cell / extra``: the oracle's parse of each variation
  against the source's caption (``CaptionAccuracy``: the scene kept exactly, per attribute, and
  objects nobody asked for), and the same for the source images themselves (the oracle's floor).

    python bench/unclip_variations.py --decoder logs/<run>/checkpoints/last.ckpt [--images 64 --k 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import genlab
from genlab.data.shapes import ShapesDataModule, caption_cells
from genlab.metrics.text_image import CaptionAccuracy
from genlab.models.evaluators.shapes_oracle import WEIGHTS


def scene_scores(oracle, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    metric = CaptionAccuracy()
    wanted = torch.from_numpy(np.stack([caption_cells(c) for c in captions]))
    metric.update(oracle.parse(images).cpu(), wanted)
    return {k: float(v) for k, v in metric.compute().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decoder", required=True, help="an unclip_decoder checkpoint")
    parser.add_argument("--oracle", default=str(WEIGHTS))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--k", type=int, default=4, help="variations per image")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    decoder, oracle = genlab.load(args.decoder), genlab.load(args.oracle)
    data = ShapesDataModule(resolution=decoder.image_size, test_size=max(args.images, 2))
    data.setup("test")
    items = [data.data_test[i] for i in range(args.images)]
    sources = torch.stack([item["image"] for item in items])
    captions = [item["caption"] for item in items]
    options = {"steps": args.steps, "guidance_scale": args.guidance}
    options = {k: v for k, v in options.items() if v is not None}
    start = time.monotonic()
    variations = decoder.variations(
        sources, n=args.k, generator=torch.Generator().manual_seed(args.seed), **options
    )
    seconds = time.monotonic() - start
    z_var = decoder.clip.encode_images(variations).view(args.images, args.k, -1)
    z_src = decoder.clip.encode_images(sources)
    own = (z_var * z_src[:, None]).sum(-1)  # (N, k)
    other = (z_var * z_src.roll(1, dims=0)[:, None]).sum(-1)
    repeated = [c for c in captions for _ in range(args.k)]
    var_scene = scene_scores(oracle, variations, repeated)
    src_scene = scene_scores(oracle, sources, captions)

    print(
        f"decoder {args.decoder}: {args.images} images x {args.k} variations, {options or 'defaults'}"
    )
    print(f"sampling: {seconds:.1f} s ({seconds / len(variations):.2f} s / image)")
    print(
        f"cos(var, source) {own.mean():.3f}  cos(var, other) {other.mean():.3f}  closer {(own > other).float().mean():.3f}"
    )
    header = "| images | scene exact | shape | colour | size | cell | extra objects |"
    print(header + "\n|" + " --- |" * 7)
    for name, s in (("sources (oracle floor)", src_scene), ("variations", var_scene)):
        print(
            f"| {name} | {s['exact']:.3f} | {s['shape']:.3f} | {s['color']:.3f} | {s['size']:.3f} "
            f"| {s['cell']:.3f} | {s['extra']:.2f} |"
        )


if __name__ == "__main__":
    main()
