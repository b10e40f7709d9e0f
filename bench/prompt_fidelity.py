"""How often a shapes model draws what its prompt says: a heuristic, analytic scene parser.

A stand-in until the trained shapes oracle exists (issue 4): each 3×3 cell that holds enough
foreground is one object; its colour is the nearest palette colour to its brightest pixels, its
coverage (α in pixel = α·colour) gives its area and so its size, and its shape is the rendered
shape of that size, centred on the object's centroid, whose coverage mask is closest (L1).
``--real`` checks the parser itself on real dataset images (it should be ~100%).

    python bench/prompt_fidelity.py --ckpt logs/train/runs/<run>/checkpoints/last.ckpt [--n 256]
    python bench/prompt_fidelity.py --real [--max-objects 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import genlab
from genlab.data.shapes import (
    COLORS,
    SIZES,
    ShapeObject,
    ShapesDataModule,
    caption_scene,
    parse_caption,
    render_scene,
)

ATTRIBUTES = ("shape", "color", "size", "cell")


def coverage_template(shape: str, size: str, cell: int, offset, resolution: int) -> np.ndarray:
    white = ShapeObject(shape, "white", size, cell, offset)
    return render_scene((white,), resolution)[..., 0] / 240.0  # white is (240, 240, 240)


def centroid(alpha: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of mass of a coverage map, in pixels."""
    ys, xs = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]]
    total = alpha.sum()
    return (alpha * (xs + 0.5)).sum() / total, (alpha * (ys + 0.5)).sum() / total


def fit_template(shape, size, cell, alpha) -> float:
    """L1 distance of ``alpha`` to the shape rendered with its centroid on alpha's centroid."""
    res, side = alpha.shape[0], alpha.shape[0] / 3
    row, col = divmod(cell, 3)
    bx, by = centroid(coverage_template(shape, size, cell, (0.0, 0.0), res))
    cx, cy = centroid(alpha)
    offset = ((cx - bx) / side, (cy - by) / side)
    return np.abs(coverage_template(shape, size, cell, offset, res) - alpha).sum()


def parse_image(image: np.ndarray, shapes: list[str], colors: list[str]) -> dict[int, ShapeObject]:
    """Objects found in a uint8 (H, W, 3) image, keyed by cell."""
    res = image.shape[0]
    found = {}
    palette = np.array([COLORS[c] for c in colors], dtype=np.float64)  # (K, 3)
    for cell in range(9):
        row, col = divmod(cell, 3)
        rows = slice(round(row * res / 3), round((row + 1) * res / 3))
        cols = slice(round(col * res / 3), round((col + 1) * res / 3))
        patch = np.zeros(image.shape, dtype=np.float64)
        patch[rows, cols] = image[rows, cols]
        bright = patch.max(-1)
        if bright.max() < 100 or (bright > 60).sum() < max(2, res * res / 400):
            continue
        core = patch[bright >= 0.7 * bright.max()].mean(0)
        color = colors[int(np.argmin(((palette - core) ** 2).sum(1)))]
        rgb = np.array(COLORS[color], dtype=np.float64)
        alpha = np.clip(patch @ rgb / (rgb @ rgb), 0, 1)  # (H, W) coverage
        best = min(
            ((s, z) for s in shapes for z in SIZES),
            key=lambda sz: fit_template(sz[0], sz[1], cell, alpha),
        )
        found[cell] = ShapeObject(best[0], color, best[1], cell)
    return found


def score(prompts: list[str], images: torch.Tensor, shapes, colors) -> dict[str, float]:
    """Exact-match rate and per-attribute accuracies of images (in [-1, 1]) against prompts."""
    arrays = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    exact, hits, total = 0, dict.fromkeys(ATTRIBUTES, 0), 0
    for prompt, array in zip(prompts, arrays, strict=True):
        wanted = {o.cell: o for o in parse_caption(prompt)}
        found = parse_image(array, shapes, colors)
        exact += found == wanted
        for cell, obj in wanted.items():
            total += 1
            got = found.get(cell)
            hits["cell"] += got is not None
            for attr in ("shape", "color", "size"):
                hits[attr] += got is not None and getattr(got, attr) == getattr(obj, attr)
    return {"exact": exact / len(prompts), **{k: v / total for k, v in hits.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt")
    parser.add_argument("--real", action="store_true")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--max-objects", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--sampler", default="ddim")
    args = parser.parse_args()
    data = ShapesDataModule(max_objects=args.max_objects, val_size=args.n)
    prompts = data.sample_prompts(args.n)
    if args.real:
        val = data.split("val")
        images = torch.stack([val[i]["image"] for i in range(args.n)])
        prompts = [caption_scene(val.scene(i)[0]) for i in range(args.n)]
        label = "real val images"
    else:
        model = genlab.load(args.ckpt)
        start = time.perf_counter()
        images = model.generate(
            prompts,
            generator=torch.Generator().manual_seed(0),
            sampler=args.sampler,
            steps=args.steps,
            guidance_scale=args.guidance,
        )
        label = (
            f"{args.sampler}-{args.steps} w={args.guidance} ({time.perf_counter() - start:.0f}s)"
        )
    result = score(prompts, images, data.shapes, data.colors)
    print(f"{label}: n={args.n} " + " ".join(f"{k}={v:.3f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
