"""Options that conf/train.yaml's comments document work as typed: ``logger=null`` and every
debug mode, also with a step budget shorter than one epoch (issue 24, item 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import CONF, TINY_BPE, TINY_DATA, TINY_UNET, check_ok, run_entry
from genlab.utils.task import null_group_overrides

TINY_MODEL = [*TINY_DATA, *TINY_UNET, *TINY_BPE, "sampler.steps=2"]


def test_group_null_means_no_config_of_that_group() -> None:
    argv = ["train.py", "logger=null", "model/net=null", "ckpt_path=null", "+x=null", "seed=1"]
    assert null_group_overrides(argv, CONF) == [
        "train.py",
        "~logger",
        "~model/net",
        "ckpt_path=null",  # a value, not a config group
        "+x=null",
        "seed=1",
    ]


def test_logger_null_trains_without_loggers(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_entry(
        "train.py",
        *TINY_MODEL,
        "trainer.max_steps=2",
        "test=false",
        "callbacks.generative_metrics=null",
        "callbacks.sample_grid=null",
        "callbacks.rich_progress_bar=null",
        "logger=null",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (run_dir / "csv").exists() and not (run_dir / "tensorboard").exists()


@pytest.mark.parametrize("mode", ["default", "fdr", "limit", "overfit", "profiler"])
def test_debug_modes_run_as_typed_with_a_short_budget(mode: str, tmp_path: Path) -> None:
    """``++trainer.max_steps=4`` ends before the first validation in most modes: the run must
    then warn that optimized_metric was not logged, not crash after training."""
    result = run_entry(
        "train.py",
        f"debug={mode}",
        *TINY_MODEL,
        "++trainer.max_steps=4",
        "test=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    output = result.stdout + result.stderr
    assert "retrieved val/loss" in output or "optimized_metric='val/loss' was not logged" in output
