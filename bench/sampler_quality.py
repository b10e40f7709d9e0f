"""The speed/quality trade of the samplers on one trained shapes checkpoint.

For each sampler, draws one image per prompt for ``--n`` prompts of the shapes validation split
(the same prompts and starting noise for every sampler) and reports wall time, network
evaluations, prompt fidelity (the analytic parser of ``prompt_fidelity.py``: exact-match rate and
per-attribute accuracy) and two nearest-neighbour distances to real images, until the trained
shapes oracle gives FID (issue 4):

* ``nn_gen``: mean RMS pixel distance (images in [0, 1]) from each generated image to its
  nearest of ``--reference`` real test images (precision-like: are samples realistic?);
* ``nn_real``: the same from each real validation image to its nearest generated one
  (recall-like: is the data covered?).

The first row, ``real``, puts ``--n`` further real test images in the place of the samples: what
a perfect model would get for fidelity and nn_gen (nn_real has no such floor: the samples share
their prompts with the real images, other real images do not).

    python bench/sampler_quality.py --ckpt logs/train/runs/<run>/checkpoints/last.ckpt
    python bench/sampler_quality.py --ckpt ... --samplers ddim-20,heun-18 --n 64
"""

from __future__ import annotations

import argparse
import time

import torch
from prompt_fidelity import score

import genlab
from genlab.data.shapes import ShapesDataModule, caption_scene
from genlab.diffusion.samplers import Sampler

DEFAULT = "ddpm-1000,ddim-50,ddim-20,dpmpp_2m-20,heun-18"


def parse_sampler(text: str) -> Sampler:
    """``name-steps`` (e.g. ``heun-18``) as a Sampler with that sampler's default grid."""
    name, _, steps = text.rpartition("-")
    return Sampler(name=name, steps=int(steps))


def nearest_distance(queries: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """RMS pixel distance of each query to its nearest image in ``pool`` (both in [-1, 1])."""
    q = (queries.flatten(1).float() + 1) / 2
    p = (pool.flatten(1).float() + 1) / 2
    d2 = torch.cdist(q, p).pow(2) / q.shape[1]  # (Q, P) mean squared error per pixel
    return d2.min(dim=1).values.sqrt()


def row(label, seconds, nfe, prompts, images, real, reference, data) -> str:
    """One table row; ``real`` None leaves nn_real out (real images share no prompts with it)."""
    fidelity = score(prompts, images, data.shapes, data.colors)
    nn_gen = f"{nearest_distance(images, reference).mean().item():.4f}"
    nn_real = "n/a" if real is None else f"{nearest_distance(real, images).mean().item():.4f}"
    attrs = " | ".join(f"{fidelity[k]:.3f}" for k in ("shape", "color", "size", "cell"))
    return (
        f"| {label} | {nfe} | {seconds:.1f} | {fidelity['exact']:.3f} | {attrs} | "
        f"{nn_gen} | {nn_real} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--samplers", default=DEFAULT, help=f"comma-separated (default {DEFAULT})")
    parser.add_argument("--n", type=int, default=128, help="prompts (one image each)")
    parser.add_argument("--reference", type=int, default=2000, help="real images for nn_gen")
    parser.add_argument("--max-objects", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = genlab.load(args.ckpt)
    data = ShapesDataModule(
        resolution=model.image_size,
        max_objects=args.max_objects,
        val_size=args.n,
        test_size=args.reference + args.n,
    )
    val, test = data.split("val"), data.split("test")
    real = torch.stack([val[i]["image"] for i in range(args.n)])
    prompts = [caption_scene(val.scene(i)[0]) for i in range(args.n)]
    reference = torch.stack([test[i]["image"] for i in range(args.reference)])
    extra = range(args.reference, args.reference + args.n)
    perfect = torch.stack([test[i]["image"] for i in extra])
    perfect_prompts = [caption_scene(test.scene(i)[0]) for i in extra]
    print(
        f"checkpoint {args.ckpt}: n={args.n} prompts (max {args.max_objects} objects), guidance "
        f"{args.guidance}, {args.reference} reference images, {torch.get_num_threads()} threads"
    )
    print(
        "| sampler | NFE | wall s | exact | shape | color | size | cell | nn_gen | nn_real |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    print(row("real", 0.0, 0, perfect_prompts, perfect, None, reference, data))
    for text in args.samplers.split(","):
        sampler = parse_sampler(text)
        start = time.perf_counter()
        images = model.generate(
            prompts,
            sampler=sampler,
            guidance_scale=args.guidance,
            generator=torch.Generator().manual_seed(args.seed),
        )
        seconds = time.perf_counter() - start
        label = str(sampler)
        print(
            row(
                label,
                seconds,
                sampler.network_evaluations(),
                prompts,
                images,
                real,
                reference,
                data,
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
