"""Training speed of the first-stage recipes, and what the perceptual loss and the adversary cost.

Composes an experiment (default ``vqgan_shapes``), then trains its real model with Lightning on
the shapes data for ``--steps`` batches per variant and prints the median seconds per batch
(after ``--warmup`` batches) and images/s, with the ratio to the first variant of the same run:

* ``full``: the recipe as it is (adversary from step 0 here, so every batch pays for it);
* ``no_perceptual``: ``model.perceptual=null``;
* ``no_adversary``: ``model.discriminator=null``;
* ``neither``: both off (a VQ-VAE / plain autoencoder step).

    python bench/first_stage_throughput.py [--experiment vae_shapes] [--steps 12] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from genlab.utils.instantiate import instantiate

CONF = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = {
    "full": [],
    "no_perceptual": ["model.perceptual=null"],
    "no_adversary": ["model.discriminator=null", "model.disc_weight=0"],
    "neither": ["model.perceptual=null", "model.discriminator=null", "model.disc_weight=0"],
}


class BatchTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.start)


def seconds_per_batch(experiment: str, overrides: list[str], steps: int, warmup: int) -> tuple:
    os.environ.setdefault("PROJECT_ROOT", str(CONF.parent))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train.yaml",
            overrides=[f"experiment={experiment}", "model.disc_start=0", *overrides],
        )
    model = instantiate(OmegaConf.to_container(cfg.model, resolve=True))
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.update(train_size=cfg.data.batch_size * (steps + 1), val_size=16, test_size=16)
    timer = BatchTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=instantiate(data_cfg))
    return statistics.median(timer.times[warmup:]), cfg.data.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="vqgan_shapes")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{args.experiment}: median s/batch over {args.steps - args.warmup} batches, "
        f"{args.threads} thread(s)"
    )
    base = None
    for name in args.variants:
        seconds, batch = seconds_per_batch(args.experiment, VARIANTS[name], args.steps, args.warmup)
        base = base or seconds
        print(
            f"  {name:14s} {seconds:6.3f} s/batch  {batch / seconds:7.1f} img/s  "
            f"x{base / seconds:.2f} speed vs {args.variants[0]}"
        )


if __name__ == "__main__":
    main()
