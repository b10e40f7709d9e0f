"""Shared helpers for the framework tests: run the entry points as real subprocesses on a tiny
version of the default job, and train one checkpoint per session for the tests that need one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Set before anything composes a config in-process (paths.root_dir reads it).
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

# The default job, shrunk to seconds: 16 px shapes, a 0.1M-parameter UNet and text encoder,
# 4 optimizer steps (half an epoch: the final validation runs mid-epoch), a 4-image grid drawn
# with 2 DDIM steps. Everything else (callbacks, CSV logger, bf16 autocast) stays as in the job.
TINY = [
    "trainer.max_steps=4",
    "trainer.log_every_n_steps=1",
    "data.resolution=16",
    "data.batch_size=8",
    "data.train_size=64",
    "data.val_size=16",
    "data.test_size=16",
    "model.net.channels=[16,32]",
    "model.net.attention_levels=[1]",
    "model.net.heads=2",
    "model.text_encoder.width=32",
    "model.text_encoder.layers=1",
    "model.text_encoder.heads=2",
    "model.text_encoder.vocab_size=128",
    "callbacks.sample_grid.num_samples=4",
    "sampler.steps=2",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
]


def run_entry(
    script: str, *overrides: str, tmp_path: Path, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Run ``python src/<script> <overrides>`` from ``tmp_path`` with W&B offline.

    The working directory is not the repository, so this also checks that the entry points find
    their configs and the project root from anywhere. The wall time is stored on the result.
    Torch gets one thread unless OMP_NUM_THREADS is set: these tiny models gain nothing from two,
    and two threads on a core that another process is using ran 5x slower here (28 s vs 5.7 s
    for a 4-step job).
    """
    env = {
        "OMP_NUM_THREADS": "1",
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_SILENT": "true",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "src" / script), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result.seconds = time.monotonic() - start
    return result


def check_ok(result: subprocess.CompletedProcess) -> None:
    """Fail with the end of the subprocess's output when it did not exit with 0."""
    tail = (result.stdout[-3000:] + "\n----- stderr -----\n" + result.stderr[-6000:]).strip()
    assert result.returncode == 0, f"exit code {result.returncode}:\n{tail}"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of one tiny default job with every logger (CSV, TensorBoard, W&B offline)."""
    tmp = tmp_path_factory.mktemp("trained")
    run_dir = tmp / "run"
    result = run_entry(
        "train.py", *TINY, "logger=many_loggers", f"hydra.run.dir={run_dir}", tmp_path=tmp
    )
    check_ok(result)
    return run_dir
