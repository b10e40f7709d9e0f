"""`trainer=ddp_cpu`: two DDP processes over gloo on the CPU train the default job and write one
run folder (Lightning re-launches the entry point for rank 1 with hydra.run.dir set)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ORACLE_OVERRIDES, ROOT, TINY, check_ok, entry_env, run_entry


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny default job on 2 gloo processes of one node: (its tmp folder, the result)."""
    tmp_path = tmp_path_factory.mktemp("ddp_run")
    result = run_entry(
        "train.py",
        *TINY,
        "trainer=ddp_cpu",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.run.dir={tmp_path / 'ddp'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    return tmp_path, result


def test_ddp_cpu_two_processes_one_run_folder(ddp_run) -> None:
    tmp_path, result = ddp_run
    run_dir = tmp_path / "ddp"
    log_dir = tmp_path / "logs"  # where a stray second run folder would appear
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_equal_two_processes(ddp_run, tmp_path: Path) -> None:
    """`trainer.num_nodes=2`: two "nodes" of one process each, started by hand on the loopback
    address with the same GENLAB_RUN_ID, write one run folder (hydra.run.dir is not given: the
    folder is named by the job, not by each process's clock) whose checkpoint and test metrics
    equal those of a 2-process single-node run."""
    single = ddp_run[0] / "ddp"
    log_dir = tmp_path / "logs"
    command = [
        sys.executable,
        str(ROOT / "src" / "train.py"),
        *TINY,
        "trainer=ddp_cpu",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        f"paths.log_dir={log_dir}",
    ]
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env=entry_env(
                tmp_path,
                NODE_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                GENLAB_RUN_ID="two-nodes",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    run_dir = log_dir / "train" / "runs" / "two-nodes"
    assert [p.name for p in (log_dir / "train" / "runs").iterdir()] == ["two-nodes"]
    assert (run_dir / "train.log").is_file() and (run_dir / "train_node1.log").is_file()
    a = torch.load(single / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0, msg=key)
    metrics = {}
    for name, folder in (("single", single), ("nodes", run_dir)):
        (csv_file,) = folder.rglob("metrics.csv")
        rows = csv_file.read_text().splitlines()
        header = rows[0].split(",")
        tests = [dict(zip(header, r.split(","))) for r in rows[1:] if "test/loss" in header]
        metrics[name] = {
            k: float(v) for row in tests for k, v in row.items() if k.startswith("test/") and v
        }
    assert metrics["single"] and metrics["single"] == pytest.approx(metrics["nodes"], rel=1e-6)


def test_fsdp_on_cpu_equals_ddp_and_its_sharded_checkpoint_loads(ddp_run, tmp_path: Path) -> None:
    """trainer=fsdp (FSDP2, genlab/utils/sharding.py) on 2 gloo processes: the same weights,
    EMA included, and test loss as 2-process DDP (no FSDP mixed precision, the same autocast);
    the sample grid and the metrics ran (every rank gathers the weights); last.ckpt is a
    folder of shards that genlab.load consolidates into a model that samples."""
    import genlab

    run_dir = tmp_path / "fsdp"
    result = run_entry(
        "train.py",
        *TINY,
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy.process_group_backend=gloo",
        "trainer.strategy.mixed_precision=null",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert "FSDP over 2 processes: 4 nets sharded by block" in result.stdout + result.stderr
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2
    assert (run_dir / "samples" / "final.png").is_file()
    ddp = torch.load(ddp_run[0] / "ddp" / "checkpoints" / "last.ckpt", weights_only=False)
    fsdp = genlab.utils.checkpoint.read_checkpoint(last)
    assert fsdp["global_step"] == ddp["global_step"] == 4
    assert set(fsdp["state_dict"]) == set(ddp["state_dict"])
    for key, value in ddp["state_dict"].items():
        torch.testing.assert_close(fsdp["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    model = genlab.load(last)
    images = model.generate(["a red circle"], generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 16, 16) and images.isfinite().all()
