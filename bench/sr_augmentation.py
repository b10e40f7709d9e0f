"""Super-resolution stages side by side on real low-resolution inputs: what the conditioning
augmentation (noise, CDM's blur, or both) buys, separated from the base stage.

For N val scenes at the stages' output size, the input is the real image area-downsampled to
the stages' low resolution, either as it is (``clean``) or degraded the way a base stage's output
may be (``degraded``: a Gaussian blur of ``--blur`` low-res pixels plus Gaussian noise of std
``--noise``). Each stage super-resolves both with its own sampler, guidance and augmentation
level and the same seed; the shipped shapes oracle parses the results against the scenes'
captions, its features give the FID against the real images, and PSNR compares to them:

    python bench/sr_augmentation.py NOISE_SR.ckpt BLUR_SR.ckpt [--n 128] [--blur 1.0] [--noise 0.05]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import genlab
from genlab.data.shapes import ShapesDataModule, caption_cells, caption_scene
from genlab.metrics.fid import feature_statistics, frechet_distance
from genlab.metrics.reconstruction import psnr
from genlab.metrics.text_image import CaptionAccuracy
from genlab.models.diffusion.conditioners import LowResConditioner, gaussian_blur
from genlab.models.evaluators.shapes_oracle import WEIGHTS
from genlab.utils.checkpoint import DATA_CONFIG_KEY, read_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpts", nargs="+", help="super-resolution stage checkpoints")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--blur", type=float, default=1.0, help="degradation: blur std (low px)")
    parser.add_argument("--noise", type=float, default=0.05, help="degradation: noise std")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = dict(read_checkpoint(args.ckpts[0])[DATA_CONFIG_KEY])
    config.pop("_target_", None)
    data = ShapesDataModule(**{**config, "val_size": args.n})
    dataset = data.split("val")
    real = torch.stack([dataset[i]["image"] for i in range(args.n)])
    captions = [caption_scene(dataset.scene(i)[0], template=0) for i in range(args.n)]
    wanted = torch.from_numpy(np.stack([caption_cells(c) for c in captions]))
    oracle = genlab.load(WEIGHTS)
    real_stats = feature_statistics(oracle.features(real).float())
    print(
        f"N = {args.n} val scenes at {real.shape[-1]} px; degraded input: blur {args.blur} "
        f"low-res px + noise {args.noise}"
    )
    print(
        f"{'stage':<34}{'input':<10}{'FID':>7}{'exact':>7}{'shape':>7}{'colour':>7}"
        f"{'PSNR':>7}{'s':>6}"
    )
    for ckpt in args.ckpts:
        model = genlab.load(ckpt)
        stage = model.conditioner(LowResConditioner)
        low = stage.downsample(real)
        generator = torch.Generator().manual_seed(args.seed + 1)
        noise = torch.randn(low.shape, generator=generator)
        inputs = {
            "clean": low,
            "degraded": (
                gaussian_blur(low, torch.full((args.n,), args.blur)) + args.noise * noise
            ).clamp(-1, 1),
        }
        name = (
            f"{Path(ckpt).parts[-4] if len(Path(ckpt).parts) > 3 else ckpt} ({stage.augmentation})"
        )
        for kind, low_res in inputs.items():
            start = time.monotonic()
            generator = torch.Generator().manual_seed(args.seed)
            chunks = []
            for s in range(0, args.n, args.batch):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    chunks.append(
                        model.generate(
                            captions[s : s + args.batch],
                            low_res=low_res[s : s + args.batch],
                            generator=generator,
                        ).float()
                    )
            drawn = torch.cat(chunks)
            metric = CaptionAccuracy()
            metric.update(oracle.parse(drawn), wanted)
            acc = {k: float(v) for k, v in metric.compute().items()}
            stats = feature_statistics(oracle.features(drawn).float())
            fid = frechet_distance(*stats, *real_stats)
            closeness = float(psnr(drawn, real).mean())
            print(
                f"{name:<34}{kind:<10}{fid:>7.2f}{acc['exact']:>7.3f}{acc['shape']:>7.3f}"
                f"{acc['color']:>7.3f}{closeness:>7.1f}{time.monotonic() - start:>6.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
