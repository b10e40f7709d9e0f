"""Training speed of latent diffusion with and without the latent cache (``model.space.cache_latents``).

Composes ``experiment=ldm_shapes`` (64 px, 16x16x4 latents) on a first stage of
``experiment=vae_shapes_64`` — untrained and built here unless ``--first-stage`` is given: the
timing does not depend on its weights — and trains the real model with Lightning, in the recipe's
precision, on ``--train-size`` shapes items for ``--steps`` batches per variant:

* ``encode``: every batch's images go through the frozen encoder (``cache_latents=false``);
* ``cache``: the train split is encoded once into a fresh cache folder, then every batch reads its
  rows (``cache_latents=true``); the build is timed separately, and a second run times reusing it.

Prints the median seconds per batch after ``--warmup`` batches — ``step`` from the batch's start to
its end, ``wall`` from one batch's end to the next (the loader's work included) — the ratio to
``encode`` of the same run, and from these figures the projected time of the recipe's run.

    python bench/ldm_latent_cache.py [--steps 12] [--warmup 3] [--threads 1] [--train-size 832]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from genlab.data import latent_cache
from genlab.utils.checkpoint import MODEL_CONFIG_KEY
from genlab.utils.instantiate import instantiate

CONF = Path(__file__).resolve().parents[1] / "conf"


class BatchTimer(L.Callback):
    """Seconds of each training batch: its step alone, and the wall time since the last batch."""

    def __init__(self) -> None:
        self.step: list[float] = []
        self.wall: list[float] = []
        self.last: float | None = None

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        now = time.perf_counter()
        self.step.append(now - self.start)
        if self.last is not None:
            self.wall.append(now - self.last)
        self.last = now


def compose_cfg(overrides: list[str]):
    os.environ.setdefault("PROJECT_ROOT", str(CONF.parent))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train.yaml", overrides=overrides)


def untrained_first_stage(folder: Path) -> Path:
    """A self-describing checkpoint of experiment=vae_shapes_64's untrained weights."""
    config = OmegaConf.to_container(compose_cfg(["experiment=vae_shapes_64"]).model, resolve=True)
    path = folder / "vae_shapes_64_untrained.ckpt"
    torch.save({MODEL_CONFIG_KEY: config, "state_dict": instantiate(config).state_dict()}, path)
    return path


def run(first_stage: Path, overrides: list[str], args) -> dict[str, float]:
    """Train ``--steps`` batches of experiment=ldm_shapes; the timings of this run."""
    cfg = compose_cfg(
        ["experiment=ldm_shapes", f"model.space.first_stage_ckpt={first_stage}", *overrides]
    )
    model = instantiate(OmegaConf.to_container(cfg.model, resolve=True))
    figures = {"build": 0.0}
    build = latent_cache.build

    def timed_build(*build_args) -> None:
        start = time.perf_counter()
        build(*build_args)
        figures["build"] = time.perf_counter() - start

    latent_cache.build = timed_build
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.update(train_size=args.train_size, val_size=16, test_size=16)
    timer = BatchTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=instantiate(data_cfg))
    figures["step"] = statistics.median(timer.step[args.warmup :])
    figures["wall"] = statistics.median(timer.wall[args.warmup :])
    figures["batch"] = cfg.data.batch_size
    figures["recipe_steps"] = cfg.trainer.max_steps
    figures["recipe_items"] = compose_cfg(["experiment=ldm_shapes"]).data.train_size
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=832, help="items encoded by the build")
    parser.add_argument("--first-stage", help="a vae checkpoint (default: an untrained one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        first_stage = Path(args.first_stage or untrained_first_stage(Path(tmp)))
        folder = Path(tmp) / "cache"
        cache = ["model.space.cache_latents=true", f"model.space.cache_dir={folder}"]
        encode = run(first_stage, ["model.space.cache_latents=false"], args)
        built = run(first_stage, cache, args)
        reused = run(first_stage, cache, args)
        megabytes = sum(f.stat().st_size for f in folder.glob("*/*.npy")) / 1e6
    print(
        f"experiment=ldm_shapes at 64 px: median s/batch of {encode['batch']} images over "
        f"{args.steps - args.warmup} batches, {args.threads} thread(s)"
    )
    for name, figures in (("encode", encode), ("cache", built), ("cache again", reused)):
        print(
            f"  {name:12s} step {figures['step']:6.3f} s  wall {figures['wall']:6.3f} s  "
            f"x{encode['wall'] / figures['wall']:.2f} speed vs encode (wall)"
        )
    per_item = built["build"] / args.train_size
    print(
        f"  cache build: {built['build']:.1f} s for {args.train_size} items "
        f"({1000 * per_item:.2f} ms/item, {megabytes:.1f} MB); a second run reused it "
        f"(build {reused['build']:.1f} s)"
    )
    steps, items = encode["recipe_steps"], encode["recipe_items"]
    on_the_fly = steps * encode["wall"]
    cached = items * per_item + steps * reused["wall"]
    print(
        f"  projected recipe ({steps} steps, {items} items): encode {on_the_fly / 60:.1f} min, "
        f"cache {cached / 60:.1f} min incl. a {items * per_item / 60:.1f} min build "
        f"(x{on_the_fly / cached:.2f}); cache reused {steps * reused['wall'] / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
