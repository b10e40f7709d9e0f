"""DALL-E sampling speed with and without the key/value cache (``generate(use_cache=...)``).

Loads a DALL-E checkpoint (``python src/train.py experiment=dalle_shapes ...``) and draws the image
tokens of ``--batch`` prompts (val captions of shapes), ``--repeats`` times per variant, with the
model's sampling settings (guidance doubles the sequences decoded):

* ``cache``: the caption is read once, then each new image token runs one position through the
  Transformer, attending to the cached keys and values;
* ``no cache``: each new image token re-runs the whole prefix (caption and tokens so far).

Both draw the same tokens for the same generator (tests/test_dalle.py); the script checks that too.
Prints image tokens per second (median over repeats) and the ratio cache / no cache.

    python bench/dalle_sampling.py --ckpt <dalle ckpt> [--batch 1 16] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import genlab
from genlab.data.shapes import ShapesDataModule


def tokens_per_second(model, prompts, cached: bool, repeats: int) -> tuple[float, torch.Tensor]:
    """Median image tokens per second of ``sample_tokens`` on ``prompts``, and the tokens."""
    opts = model.resolve_options({})
    seconds, tokens = [], None
    for _ in range(repeats):
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        tokens = model.sample_tokens(prompts, generator, opts, cached)
        seconds.append(time.perf_counter() - start)
    return tokens.numel() / statistics.median(seconds), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a DALL-E checkpoint")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = genlab.load(args.ckpt)
    data = ShapesDataModule(resolution=model.image_size, val_size=max(args.batch))
    print(
        f"{args.ckpt}: {model.grid**2} image tokens after {model.text_length} text positions, "
        f"guidance {model.guidance_scale}, {args.threads} thread(s)"
    )
    print("| prompts | cache tokens/s | no cache tokens/s | ratio | same tokens |")
    print("| --- | --- | --- | --- | --- |")
    with torch.no_grad():
        for batch in args.batch:
            prompts = data.sample_prompts(batch)
            fast, a = tokens_per_second(model, prompts, True, args.repeats)
            slow, b = tokens_per_second(model, prompts, False, args.repeats)
            same = torch.equal(a, b)
            print(f"| {batch} | {fast:.0f} | {slow:.0f} | {fast / slow:.2f} | {same} |")


if __name__ == "__main__":
    main()
