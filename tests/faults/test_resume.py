"""Kill-and-resume parity: a run killed with SIGKILL mid-epoch and resumed with ``ckpt_path=auto``
in the same run folder ends with the same weights, EMA weights, optimizer and scheduler states
and logged metrics, bit for bit, as the run that was never interrupted (README, "Reliability")."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    CLIP_RECIPE,
    ROOT,
    TINY,
    TINY_DALLE,
    TINY_DATA,
    TINY_ENCODER,
    TINY_GAN,
    TINY_GLOW,
    TINY_PRIOR,
    TINY_RUN,
    TINY_TRAINER,
    TINY_VQ,
    check_ok,
    make_first_stage,
    run_entry,
)

# 8 batches per epoch (TINY_DATA); checkpoints every 3 steps (all kept), so the kill after step 6
# lands mid-epoch 0 and the resumed run crosses into epoch 1 and 2. After TINY_RUN (its step count
# and sample grid replaced); the final test is off, so no generative metrics are measured.
COMMON = [
    "trainer.max_steps=18",
    "test=false",
    "callbacks.model_checkpoint.every_n_train_steps=3",
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.model_checkpoint.monitor=null",
    "callbacks.sample_grid=null",
]
DDPM = [*TINY, *COMMON]
VQGAN = [
    "experiment=vqgan_shapes",
    *TINY_DATA,
    *TINY_RUN,
    *TINY_ENCODER,
    *TINY_VQ,
    "model.discriminator.channels=8",
    "model.perceptual=null",
    "model.perceptual_weight=0",
    "model.disc_start=4",  # the adversary (a second optimizer) is on from step 4
    "model.lr_scheduler.warmup_steps=2",
    *COMMON,
]


def env(tmp_path: Path) -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", **os.environ, "WANDB_MODE": "offline"}


def train_and_kill(overrides: list[str], run_dir: Path, tmp_path: Path, after: int) -> None:
    """Start ``train.py`` and SIGKILL its whole process group (every DDP rank) as soon as the
    checkpoint of step ``after`` exists."""
    wanted = run_dir / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "src" / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    try:
        while not list(wanted.glob(f"*step_{after:06d}.ckpt")):
            if proc.poll() is not None:
                pytest.fail(
                    f"the run ended (exit {proc.returncode}) before step {after}:\n"
                    + proc.stderr.read()[-3000:]
                )
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"not killed: exit {proc.returncode}"


def metric_rows(run_dir: Path, version: int) -> dict[tuple[int, str], float]:
    """``{(step, name): value}`` of the CSV logger's version folder."""
    rows: dict[tuple[int, str], float] = {}
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for name, value in row.items():
                if name not in ("step", "epoch") and value not in ("", None):
                    rows[(int(row["step"]), name)] = float(value)
    return rows


def assert_same_state(a: dict, b: dict, where: str = "") -> None:
    """Recursively equal, tensors bit for bit."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys()} vs {b.keys()}"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def check_parity(overrides: list[str], tmp_path: Path, after: int = 6) -> None:
    straight = tmp_path / "straight"
    check_ok(run_entry("train.py", *overrides, f"hydra.run.dir={straight}", tmp_path=tmp_path))
    resumed = tmp_path / "resumed"
    train_and_kill(overrides, resumed, tmp_path, after=after)
    result = run_entry(
        "train.py", *overrides, f"hydra.run.dir={resumed}", "ckpt_path=auto", tmp_path=tmp_path
    )
    check_ok(result)
    assert "ckpt_path=auto: resuming from" in result.stdout + result.stderr

    end = "checkpoints/last.ckpt"
    a = torch.load(straight / end, map_location="cpu", weights_only=False)
    b = torch.load(resumed / end, map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 18
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops"):
        assert_same_state(a[key], b[key], key)
    assert_same_state(a["callbacks"]["StepSeeds"], b["callbacks"]["StepSeeds"])

    # every metric the resumed run logged equals the uninterrupted run's at that step
    first, second = metric_rows(straight, 0), metric_rows(resumed, 1)
    assert second, "the resumed run logged nothing"
    assert min(step for step, _ in second) >= after - 3  # from the last checkpoint, not 0
    for key, value in second.items():
        if key[1] in ("lr-AdamW", "lr-Adam") or key not in first:
            continue
        assert value == first[key], f"{key}: resumed {value} vs uninterrupted {first[key]}"
    assert any(name.startswith("train/") for _, name in second)


def test_ddpm_kill_and_resume_is_exact(tmp_path: Path) -> None:
    check_parity(DDPM, tmp_path)


def test_ddpm_ddp_kill_and_resume_is_exact(tmp_path: Path) -> None:
    check_parity([*DDPM, "trainer=ddp_cpu"], tmp_path)


def test_vqgan_kill_and_resume_is_exact(tmp_path: Path) -> None:
    check_parity(VQGAN, tmp_path)


@pytest.mark.slow
def test_vqgan_ddp_kill_and_resume_is_exact(tmp_path: Path) -> None:
    check_parity([*VQGAN, "trainer=ddp_cpu"], tmp_path)


def test_dalle_kill_and_resume_is_exact(tmp_path: Path) -> None:
    dvae = make_first_stage("dvae", tmp_path / "dvae.ckpt", steps=2, size=16)
    dalle = [
        "experiment=dalle_shapes",
        f"model.tokenizer_ckpt={dvae}",
        *TINY_DATA,
        "data.max_objects=1",
        *TINY_RUN,
        *TINY_DALLE,
        *COMMON,
    ]
    check_parity(dalle, tmp_path)


def test_gan_kill_and_resume_is_exact(tmp_path: Path) -> None:
    """Two optimizers under manual optimization, lazy R1 every 2 steps and the EMA of G."""
    gan = [
        "experiment=gan_shapes",
        *TINY_DATA,
        *TINY_RUN,
        *TINY_GAN,
        "model.r1_gamma=1.0",
        "model.r1_interval=2",
        *COMMON,
    ]
    check_parity(gan, tmp_path)


def test_glow_kill_and_resume_is_exact(tmp_path: Path) -> None:
    """Data-dependent ActNorm initialisation and dequantization noise."""
    glow = ["experiment=glow_shapes", *TINY_DATA, *TINY_RUN, *TINY_GLOW, *COMMON]
    check_parity(glow, tmp_path)


def test_unclip_prior_kill_and_resume_is_exact(tmp_path: Path) -> None:
    """Text dropout, diffusion noise and the EMA, on a frozen CLIP."""
    from genlab.metrics.evaluators import ensure_evaluator

    clip = ensure_evaluator(tmp_path / "clip.ckpt", CLIP_RECIPE, name="clip_shapes")
    prior = [  # the recipe draws no sample grid and measures no metrics
        "experiment=unclip_prior_shapes",
        f"model.clip_ckpt={clip}",
        *TINY_DATA,
        *TINY_TRAINER,
        *TINY_PRIOR,
        "sampler.steps=2",
        *COMMON,
    ]
    check_parity(prior, tmp_path)
