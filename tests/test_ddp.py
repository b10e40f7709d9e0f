"""`trainer=ddp_cpu`: two DDP processes over gloo on the CPU train the default job and write one
run folder (Lightning re-launches the entry point for rank 1 with hydra.run.dir set)."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import TINY, check_ok, run_entry


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
