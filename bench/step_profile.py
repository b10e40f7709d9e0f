"""Where a training step of a text-to-image diffusion recipe spends its time (issue 21).

Builds the recipe's model and data from the config tree (``train.yaml`` with ``experiment=`` and
any overrides), runs a short real ``Trainer.fit`` (Lightning, logging, EMA, bf16 as configured)
and then times the parts of one step on the same model and real batches, each as the median
over ``--steps`` repeats after a warm-up:

* ``data``: drawing one batch from the training dataloader (render + collate);
* ``conditions``: the condition dropout of classifier-free guidance (captions → "" at random);
* ``text``: tokenizing the captions and the text encoder forward + backward;
* ``unet``: the network forward + backward on fixed inputs (the bare network);
* ``optimizer``: AdamW step + zero_grad; ``ema``: the EMA update;
* ``bare step``: ``training_step`` + backward + optimizer + EMA, no Lightning;
* ``lightning``: seconds per step of the real fit (``on_train_batch_start`` to ``end``), and
  ``lightning + data``: the fit's wall-clock per step (data loading included).

Prints images/s of each and its share of the Lightning step.

    python bench/step_profile.py [--experiment ddpm_shapes] [--steps 20] [--threads 2] \
        [--set model.net.attention_levels=[1,2] ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from ldm_latent_cache import BatchTimer  # bench/: the step and wall time of every batch
from omegaconf import OmegaConf

from genlab.utils.instantiate import instantiate

CONF = Path(__file__).resolve().parents[1] / "conf"


def median_seconds(fn: Callable[[], None], steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="ddpm_shapes")
    parser.add_argument("--steps", type=int, default=20, help="timed repeats of each part")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="a config override")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("PROJECT_ROOT", str(CONF.parent))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train.yaml", overrides=[f"experiment={args.experiment}", *args.set])
    torch.manual_seed(0)
    model = instantiate(OmegaConf.to_container(cfg.model, resolve=True))
    data = instantiate(OmegaConf.to_container(cfg.data, resolve=True))
    fit_steps = args.steps + 5
    timer = BatchTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=fit_steps,
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=data)
    lightning = statistics.median(timer.step[5:])
    wall = statistics.median(timer.wall[4:])

    bf16 = cfg.trainer.precision == "bf16-mixed"
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    loader = data.train_dataloader()
    batches = iter(loader)
    batch = next(batches)
    b = batch["image"].shape[0]
    model.train()

    def next_batch():
        nonlocal batches
        try:
            next(batches)
        except StopIteration:
            batches = iter(loader)

    drop = torch.rand(b) < model.cond_drop_prob
    conditions = model.batch_conditions(batch, drop)
    params = list(model.denoiser.parameters())
    net = model.denoiser["net"]

    def text():
        with autocast():
            inputs = model.network_inputs(model.denoiser, model.batch_conditions(batch, drop))
            total = sum(v.float().sum() for v in inputs.values() if torch.is_tensor(v))
        total.backward()

    with torch.no_grad(), autocast():
        fixed = model.network_inputs(model.denoiser, conditions)
    x = torch.randn_like(batch["image"])
    t = torch.randint(0, model.num_timesteps, (b,))

    def unet():
        with autocast():
            out = net(x, t, **fixed)
        out.float().square().mean().backward()

    opt = torch.optim.AdamW(params, lr=1e-4)

    def optimizer():
        opt.step()
        opt.zero_grad(set_to_none=False)

    def ema():
        if model.ema is not None:
            model.ema.update(model.denoiser)

    model.log = lambda *a, **k: None  # the bare step: no trainer logging

    def bare():
        with autocast():
            loss = model.training_step(batch, 0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer()
        ema()

    parts = {
        "data": median_seconds(next_batch, args.steps),
        "conditions": median_seconds(lambda: model.batch_conditions(batch, drop), args.steps),
        "text": median_seconds(text, args.steps),
        "unet": median_seconds(unet, args.steps),
        "optimizer": median_seconds(optimizer, args.steps),
        "ema": median_seconds(ema, args.steps),
        "bare step": median_seconds(bare, args.steps),
        "lightning": lightning,
        "lightning + data": wall,
    }
    n_params = sum(p.numel() for p in params)
    print(
        f"experiment={args.experiment} {' '.join(args.set)}: batch {b}, {n_params / 1e6:.2f}M "
        f"trainable parameters, {cfg.trainer.precision}, {args.threads} thread(s); median of "
        f"{args.steps} repeats"
    )
    print(f"{'part':<18}{'ms':>9}{'images/s':>11}{'of lightning':>14}")
    for name, seconds in parts.items():
        print(f"{name:<18}{seconds * 1e3:>9.1f}{b / seconds:>11.1f}{seconds / lightning:>13.0%}")


if __name__ == "__main__":
    main()
