"""Does a text-to-image shapes model draw what one- and two-object prompts say? (issue 21)

For a checkpoint, draws one image per prompt for three groups of prompts and parses them with
the shipped shapes oracle (``genlab.models.evaluators.shapes_oracle.WEIGHTS``):

* ``1 object``: the first N one-object scenes of the val split;
* ``2 objects``: the first N two-object scenes of the val split (both objects' shape, colour,
  size and cell right, and no extra object, for "exact");
* ``compositional``: the first N scenes of the compositional split (each shows at least one
  held-out shape-colour pair that training never showed).

Captions use the canonical template (what the sample grids and the metrics use). Every group
reports exact, per-attribute rates (over the prompt's objects) and extra objects per image, by
``genlab.metrics.text_image.CaptionAccuracy``, and the FID of its images against the prompts' own
scenes (the shipped oracle's features; the real-image floor at N = 256 is about 0.03). The model's own sampler, steps and guidance are
used unless given.

    python bench/binding.py CKPT [--n 512] [--guidance 3] [--steps 50] [--sampler heun]
        [--thresholding dynamic] [--raw] [--groups 2,compositional] [--batch 128] [--json out.json]
        [--clip NOISY_CLIP_CKPT --clip-scale 100]   # GLIDE's CLIP guidance (usually --guidance 1)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import genlab
from genlab.data.shapes import ShapesDataModule, caption_cells, caption_scene
from genlab.metrics.fid import feature_statistics, frechet_distance
from genlab.metrics.text_image import CaptionAccuracy
from genlab.models.evaluators.shapes_oracle import WEIGHTS
from genlab.utils.checkpoint import DATA_CONFIG_KEY, read_checkpoint

COLUMNS = ("exact", "shape", "color", "size", "cell", "extra")
GROUPS = {  # --groups name: (row name, split, objects per scene or None for any)
    "1": ("1 object", "val", 1),
    "2": ("2 objects", "val", 2),
    "compositional": ("compositional", "compositional", None),
}


def prompts_of(
    data: ShapesDataModule, split: str, n: int, objects: int | None
) -> list[tuple[str, torch.Tensor]]:
    """Canonical captions of the first ``n`` scenes of ``split`` with ``objects`` objects
    (any number when None), scanning up to 50x n items, each with its rendered image."""
    dataset = data.split(split)
    found = []
    for i in range(min(len(dataset), 50 * n)):
        scene, _ = dataset.scene(i)
        if objects is None or len(scene) == objects:
            found.append((caption_scene(scene, template=0), dataset[i]["image"]))
            if len(found) == n:
                return found
    raise ValueError(f"only {len(found)} {split} scenes with {objects} objects; lower --n")


def score(model, oracle, items: list[tuple[str, torch.Tensor]], args, seed: int, clip=None):
    """Caption accuracy of one image per prompt, drawn in batches from a seeded generator, and
    the FID of the drawn images against the prompts' own scenes (shipped oracle features)."""
    prompts = [p for p, _ in items]
    metric, drawn, real = CaptionAccuracy(), [], []
    generator = torch.Generator().manual_seed(seed)
    options = {
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "sampler": args.sampler,
        "thresholding": args.thresholding,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if clip is not None:
        options |= {"clip": clip, "clip_guidance_scale": args.clip_scale}
    for start in range(0, len(prompts), args.batch):
        chunk = prompts[start : start + args.batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            images = model.generate(chunk, generator=generator, **options).float()
        wanted = torch.from_numpy(np.stack([caption_cells(p) for p in chunk]))
        metric.update(oracle.parse(images), wanted)
        drawn.append(oracle.features(images).float())
        reference = torch.stack([image for _, image in items[start : start + args.batch]])
        real.append(oracle.features(reference).float())
    values = {k: float(v) for k, v in metric.compute().items()}
    fid = frechet_distance(
        *feature_statistics(torch.cat(drawn)), *feature_statistics(torch.cat(real))
    )
    return {k: values[k] for k in COLUMNS} | {"fid": fid}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt")
    parser.add_argument("--n", type=int, default=512, help="prompts per group")
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--sampler", default=None, help="a sampler of conf/sampler (ddim, heun...)")
    parser.add_argument("--thresholding", default=None, choices=("none", "static", "dynamic"))
    parser.add_argument(
        "--groups", default="1,2,compositional", help="which of 1, 2, compositional to draw"
    )
    parser.add_argument("--raw", action="store_true", help="the trained weights, not the EMA")
    parser.add_argument("--clip", default=None, help="a noise-aware CLIP: CLIP guidance")
    parser.add_argument("--clip-scale", type=float, default=None, help="its guidance scale")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()

    config = dict(read_checkpoint(args.ckpt)[DATA_CONFIG_KEY])
    config.pop("_target_", None)
    scan = {"val_size": 50 * args.n, "compositional_size": args.n}
    data = ShapesDataModule(**{**config, **scan})
    model, oracle = genlab.load(args.ckpt), genlab.load(WEIGHTS)
    if args.raw:
        model.ema = None  # sample with the trained weights
    wanted = args.groups.split(",")
    unknown = sorted(set(wanted) - set(GROUPS))
    if unknown:
        parser.error(f"--groups: unknown {unknown}; choose from {', '.join(GROUPS)}")
    groups = {GROUPS[g][0]: prompts_of(data, GROUPS[g][1], args.n, GROUPS[g][2]) for g in wanted}
    print(f"checkpoint {args.ckpt}; N = {args.n} prompts per group; oracle {WEIGHTS.name}")
    clip = None if args.clip is None else genlab.load(args.clip)
    print(f"{'prompts':<15}" + "".join(f"{c:>8}" for c in (*COLUMNS, "fid")) + f"{'s':>8}")
    results = {}
    for k, (name, prompts) in enumerate(groups.items()):
        start = time.monotonic()
        results[name] = score(model, oracle, prompts, args, seed=args.seed + k, clip=clip)
        seconds = time.monotonic() - start
        results[name]["seconds"] = seconds
        row = "".join(f"{results[name][c]:>8.3f}" for c in (*COLUMNS, "fid"))
        print(f"{name:<15}{row}{seconds:>8.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.ckpt, "n": args.n, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
