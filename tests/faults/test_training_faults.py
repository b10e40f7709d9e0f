"""Faults during training: a NaN loss on one rank (skip and stop policies), SIGTERM to one DDP
rank, SIGUSR1 under SLURM (requeue), checkpoints a run did not write, ``ckpt_path=last`` with
nothing to resume. Each run is the real entry point on the tiny default job."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import ROOT, TINY, check_ok, run_entry

INJECTED = Path(__file__).parent / "injected"
QUIET = [
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.sample_grid=null",
    "test=false",
]


def nan_at(step: int, rank: int) -> list[str]:
    """Overrides for a DDPM whose loss is NaN at ``step`` (-1: every step) on ``rank``."""
    return [
        "model._target_=faulty_models.NaNLossDDPM",
        f"+model.nan_step={step}",
        f"+model.nan_rank={rank}",
    ]


def with_injected(monkeypatch) -> None:
    """Let the runs import tests/faults/injected (DDP ranks inherit the environment)."""
    path = os.pathsep.join(p for p in (str(INJECTED), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)


def csv_column(run_dir: Path, name: str) -> dict[int, float]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        return {int(r["step"]): float(r[name]) for r in csv.DictReader(f) if r.get(name)}


def finite_weights(ckpt: Path) -> bool:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return all(bool(v.isfinite().all()) for v in state.values() if v.is_floating_point())


def test_nan_on_one_ddp_rank_is_skipped_on_every_rank(tmp_path: Path, monkeypatch) -> None:
    with_injected(monkeypatch)
    run_dir = tmp_path / "run"
    result = run_entry(
        "train.py",
        *TINY,
        *QUIET,
        *nan_at(3, rank=1),
        "trainer=ddp_cpu",
        "trainer.max_steps=6",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    out = result.stdout + result.stderr
    assert "step 3 (epoch 0, batch 3): non-finite gradients on 2 of 2 rank(s)" in out
    assert "skipped this optimizer step (1 skipped in this run)" in out
    assert csv_column(run_dir, "train/nonfinite_skips") == {3: 1.0}
    assert finite_weights(run_dir / "checkpoints" / "last.ckpt")


def test_nan_with_stop_policy_stops_and_keeps_the_checkpoints(tmp_path: Path, monkeypatch) -> None:
    with_injected(monkeypatch)
    run_dir = tmp_path / "run"
    result = run_entry(
        "train.py",
        *TINY,
        *QUIET,
        *nan_at(3, rank=0),
        "callbacks.nonfinite.policy=stop",
        "trainer.max_steps=6",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.model_checkpoint.monitor=null",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    assert result.returncode != 0
    assert "policy=stop ends the run here" in result.stdout + result.stderr
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and finite_weights(last)


def test_nan_every_step_stops_after_max_consecutive(tmp_path: Path, monkeypatch) -> None:
    with_injected(monkeypatch)
    result = run_entry(
        "train.py",
        *TINY,
        *QUIET,
        *nan_at(-1, rank=0),
        "callbacks.nonfinite.max_consecutive=3",
        f"hydra.run.dir={tmp_path / 'run'}",
        tmp_path=tmp_path,
    )
    assert result.returncode != 0
    assert "3 steps in a row were skipped" in result.stdout + result.stderr


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def start(
    overrides: list[str], tmp_path: Path, script: str = "train.py", **env: str
) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "src" / script), *overrides],
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1", **os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(path_glob: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not list(path_glob.parent.glob(path_glob.name)):
        assert proc.poll() is None, f"the run ended early:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {path_glob} after {seconds} s"
        time.sleep(0.05)


LONG = [*TINY, *QUIET, "trainer.max_steps=400", "callbacks.model_checkpoint.monitor=null"]


def test_sigterm_to_one_ddp_rank_stops_every_rank_with_a_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start(
        [
            *LONG,
            "trainer=ddp_cpu",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
    )
    try:
        wait_for(run_dir / "checkpoints" / "*step_000002.ckpt", proc)
        rank1 = [
            c for c in children(proc.pid) if "train.py" in Path(f"/proc/{c}/cmdline").read_text()
        ]
        assert len(rank1) == 1, f"rank 1 not found among {children(proc.pid)}"
        os.kill(rank1[0], signal.SIGTERM)  # rank 1 only: rank 0 must learn it from rank 1
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "SIGTERM received: stopped after step" in out
    step = int(out.split("SIGTERM received: stopped after step ")[1].split()[0])
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == step < 400
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["world_size"] == 2


def test_sigusr1_under_slurm_saves_and_requeues(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    fake = bin_dir / "scontrol"  # stands in for SLURM's scontrol: records its arguments
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    run_dir = tmp_path / "run"
    proc = start(
        [*LONG, "callbacks.model_checkpoint.every_n_train_steps=2", f"hydra.run.dir={run_dir}"],
        tmp_path,
        SLURM_JOB_ID="4242",
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )
    try:
        wait_for(run_dir / "checkpoints" / "*step_000002.ckpt", proc)
        os.kill(proc.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGUSR1, out[-3000:]
    assert "SIGUSR1 received" in out and "Requeued SLURM job 4242." in out
    assert calls.read_text().split() == ["requeue", "4242"]

    # the requeued job runs the same command with ckpt_path=auto and carries on
    result = run_entry(
        "train.py",
        *TINY,
        *QUIET,
        "trainer.max_steps=8",
        "callbacks.model_checkpoint.monitor=null",
        "ckpt_path=auto",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert "ckpt_path=auto: resuming from" in result.stdout + result.stderr


def test_foreign_checkpoints_in_the_run_folder_are_never_deleted(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    foreign = {
        "epoch_000-step_000004.ckpt": b"someone else's file",  # a name this run would write
        "other.ckpt": b"not ours",
    }
    for name, content in foreign.items():
        (ckpt_dir / name).write_bytes(content)
    check_ok(
        run_entry(
            "train.py",
            *TINY,
            *QUIET,
            "trainer.max_steps=8",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "callbacks.model_checkpoint.monitor=null",
            "callbacks.model_checkpoint.save_top_k=1",
            f"hydra.run.dir={run_dir}",
            tmp_path=tmp_path,
        )
    )
    for name, content in foreign.items():
        assert (ckpt_dir / name).read_bytes() == content, name
    assert (ckpt_dir / "last.ckpt").is_file()


def test_ckpt_path_last_without_a_checkpoint_names_the_path(tmp_path: Path) -> None:
    run_dir = tmp_path / "fresh"
    result = run_entry(
        "train.py", *TINY, "ckpt_path=last", f"hydra.run.dir={run_dir}", tmp_path=tmp_path
    )
    assert result.returncode != 0
    assert f"ckpt_path=last: no checkpoint at {run_dir / 'checkpoints' / 'last.ckpt'}" in (
        result.stdout + result.stderr
    )


def wait_for_text(folder: Path, text: str, proc: subprocess.Popen, seconds: float = 240) -> None:
    """Wait until a ``*.log`` file of ``folder`` (the entry point's log) contains ``text``."""
    deadline = time.monotonic() + seconds
    while not any(text in p.read_text(errors="replace") for p in folder.glob("*.log")):
        assert proc.poll() is None, f"the run ended early:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {folder}/*.log after {seconds} s"
        time.sleep(0.1)


def sigterm_once_logged(proc: subprocess.Popen, folder: Path, text: str) -> tuple[str, float]:
    """SIGTERM ``proc`` once its log in ``folder`` says ``text``; its output and the seconds it
    took to end."""
    try:
        wait_for_text(folder, text, proc)
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        return out, time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigterm_ends_the_final_test_eval_and_sample_promptly(tmp_path: Path) -> None:
    """After training (the final test's metric generation), in eval.py and in sample.py,
    SIGTERM ends the process within seconds with exit 143, writes no metrics or grid, and
    leaves the checkpoints intact."""
    slow_metrics = [  # thousands of 200-step samples: minutes, unless the signal stops them
        "callbacks.generative_metrics.num_samples=4000",
        "callbacks.generative_metrics.batch_size=4",
        "callbacks.generative_metrics.steps=200",
    ]
    generating = "of 4000 generated images on this rank"  # the first chunk is drawn
    run_dir = tmp_path / "run"
    proc = start([*TINY, *slow_metrics, f"hydra.run.dir={run_dir}"], tmp_path)
    out, seconds = sigterm_once_logged(proc, run_dir, generating)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "SIGTERM received: stopped at once" in out and seconds < 30
    assert not list((run_dir / "metrics").glob("test*.json"))  # no partial metrics
    assert finite_weights(run_dir / "checkpoints" / "last.ckpt")

    ckpt = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"
    eval_dir = tmp_path / "eval"
    oracle = [o for o in TINY if o.startswith("callbacks.generative_metrics.oracle")]
    overrides = ["eval.num_samples=4000", "eval.steps=200", *slow_metrics[1:2], *oracle]
    proc = start([ckpt, *overrides, f"hydra.run.dir={eval_dir}"], tmp_path, "eval.py")
    out, seconds = sigterm_once_logged(proc, eval_dir, generating)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "SIGTERM received: stopped at once" in out and seconds < 30
    assert not (eval_dir / "metrics.json").exists()

    sample_dir = tmp_path / "sample"  # the same, and no half-written grid
    overrides = ["prompt=a red circle", "n=2000", "steps=500", f"hydra.run.dir={sample_dir}"]
    proc = start([ckpt, *overrides], tmp_path, "sample.py")
    out, seconds = sigterm_once_logged(proc, sample_dir, "drawing 2000 image(s) per prompt")
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "SIGTERM received: stopped at once" in out and seconds < 30
    assert not (sample_dir / "samples.png").exists()
