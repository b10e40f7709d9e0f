"""FID and KID floors and a text model's distance on shapes-oracle features, at several N.

For a text-conditional shapes checkpoint, draws one image for each of the first max(N) val
captions (bf16 autocast, the model's default sampler and guidance, a generator seeded 0, batches
of 64) and compares, on each oracle's features, with the first N val images (the reference):

* ``test floor``: N real test images (independent of the reference: the floor of an
  unconditional model);
* ``redrawn floor``: the N reference scenes drawn again (``ShapesDataModule.redrawn``: the floor
  of a text model prompted with the reference captions);
* ``model``: the N generated images (paired with the reference).

KID on paired sets uses the paired estimator (``genlab.metrics.kid``), subsets of N/2.

    python bench/feature_space.py CKPT [--n 256 1024] [--oracle PATH ...]

Without ``--oracle`` it uses the shipped evaluator; give an older (version-1) oracle checkpoint
to compare feature spaces: its raw features are used.
"""

from __future__ import annotations

import argparse

import torch

import genlab
from genlab.data.shapes import ShapesDataModule
from genlab.metrics.fid import feature_statistics, frechet_distance
from genlab.metrics.kid import kernel_inception_distance, subset_size_for
from genlab.models.evaluators.shapes_oracle import WEIGHTS
from genlab.utils.checkpoint import DATA_CONFIG_KEY, read_checkpoint


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def kid(a: torch.Tensor, b: torch.Tensor, paired: bool) -> str:
    mean, std = kernel_inception_distance(
        a, b, subset_size=subset_size_for(len(a), 1000), paired=paired
    )
    return f"{mean:.3g} ± {std:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt")
    parser.add_argument("--n", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--oracle", nargs="+", default=[str(WEIGHTS)])
    args = parser.parse_args()
    most = max(args.n)
    config = dict(read_checkpoint(args.ckpt)[DATA_CONFIG_KEY])
    config.pop("_target_", None)
    data = ShapesDataModule(**{**config, "val_size": most, "test_size": most})

    def images(dataset) -> torch.Tensor:
        return torch.stack([dataset[i]["image"] for i in range(most)])

    val, test = images(data.split("val")), images(data.split("test"))
    redrawn = images(data.redrawn("val"))
    model = genlab.load(args.ckpt)
    captions = [data.split("val")[i]["caption"] for i in range(most)]
    generator, drawn = torch.Generator().manual_seed(0), []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, most, 64):
            drawn.append(model.generate(captions[start : start + 64], generator=generator))
    generated = torch.cat(drawn).float()
    print(
        "| features | N | FID test floor | FID redrawn floor | FID model | KID test floor"
        " | KID redrawn floor (paired) | KID model (paired) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for path in args.oracle:
        oracle = genlab.load(path)
        features = oracle.features if bool(oracle.whitened) else oracle.raw_features
        name = f"v{oracle.version}, {'whitened' if bool(oracle.whitened) else 'raw'}"
        fv, ft, fr, fg = (features(x) for x in (val, test, redrawn, generated))
        for n in args.n:
            v, t, r, g = fv[:n], ft[:n], fr[:n], fg[:n]
            print(
                f"| {name} {fv.shape[1]}-d | {n} | {fid(v, t):.4g} | {fid(v, r):.4g} | "
                f"{fid(v, g):.4g} | {kid(v, t, False)} | {kid(v, r, True)} | {kid(v, g, True)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
