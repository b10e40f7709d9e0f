"""`trainer=ddp_cpu`: two DDP processes over gloo on the CPU train the default job and write one
run folder (Lightning re-launches the entry point for rank 1 with hydra.run.dir set)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ORACLE_OVERRIDES, TINY, check_ok, run_entry


def test_ddp_cpu_two_processes_one_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    log_dir = tmp_path / "logs"  # where a stray second run folder would appear
    result = run_entry(
        "train.py",
        *TINY,
        "trainer=ddp_cpu",
        f"paths.log_dir={log_dir}",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert "Starting with 2 processes" in result.stderr + result.stdout
    assert not log_dir.exists(), f"a second run folder: {list(log_dir.rglob('*'))[:5]}"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ddp"]
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran in this folder
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4  # max_steps counts optimizer steps, shared by both ranks
    assert (run_dir / "samples" / "final.png").is_file()


def test_ddp_evaluation_equals_single_process(trained_run: Path, tmp_path: Path) -> None:
    """eval.py on 2 gloo ranks gives the single-process numbers. test/loss: each item's noise and
    t come from its index, ranks share the split without duplicates, the logged mean is synced.
    Generative metrics: 7 images in chunks of 2 (rank 0 draws chunks 0 and 2, rank 1 chunks 1
    and 3, a ragged last one), each chunk from its own seed, the metric states synced; exactly 7
    images in all, and every metric equal to the single-process value."""
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    reports = {}
    for trainer in ("default", "ddp_cpu"):
        run_dir = tmp_path / trainer
        result = run_entry(
            "eval.py",
            f"ckpt_path={ckpt}",
            f"trainer={trainer}",
            "trainer.precision=32",
            *ORACLE_OVERRIDES,
            "eval.num_samples=7",
            "callbacks.generative_metrics.batch_size=2",
            "callbacks.generative_metrics.kid_subset_size=5",
            f"callbacks.generative_metrics.cache_dir={tmp_path / trainer / 'cache'}",
            f"hydra.run.dir={run_dir}",
            tmp_path=tmp_path,
        )
        check_ok(result)
        reports[trainer] = json.loads((run_dir / "metrics.json").read_text())
    single, ddp = reports["default"], reports["ddp_cpu"]
    assert ddp["metrics"]["test/loss"] == pytest.approx(single["metrics"]["test/loss"], rel=1e-5)
    (one,), (two,) = single["results"], ddp["results"]
    assert one["protocol"]["num_samples"] == two["protocol"]["num_samples"] == 7
    assert set(one["metrics"]) >= {"fid", "kid", "is", "precision", "recall", "caption_exact"}
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
