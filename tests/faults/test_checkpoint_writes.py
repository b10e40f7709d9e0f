"""Checkpoint writes that cannot lose the previous checkpoint: a writer killed mid-write, a full
disk (a real write failure, from the kernel's file-size limit), and non-finite weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from genlab.utils.checkpoint import AtomicCheckpointIO, CheckpointWriteError, NonFiniteWeightsError
from genlab.utils.io import atomic_torch_save

OLD = {"state_dict": {"w": torch.arange(10.0)}, "global_step": 1}


def test_a_writer_killed_mid_write_leaves_the_old_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save(OLD, path)
    writer = textwrap.dedent(
        f"""
        import torch
        from genlab.utils.io import atomic_torch_save
        big = {{"state_dict": {{"w": torch.ones(64, 1024, 1024)}}, "global_step": 2}}  # 256 MB
        while True:
            atomic_torch_save(big, {str(path)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".last.ckpt.tmp-*")):  # a write is under way
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list(tmp_path.glob(".last.ckpt.tmp-*")), "the kill should have left a partial temp file"
    loaded = torch.load(path, weights_only=False)  # complete: the old one or a whole new one
    assert loaded["global_step"] in (1, 2)
    atomic_torch_save(OLD, path)  # the next save clears the dead writer's temporary
    assert not list(tmp_path.glob(".last.ckpt.tmp-*"))
    assert torch.equal(
        torch.load(path, weights_only=False)["state_dict"]["w"], OLD["state_dict"]["w"]
    )


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save(OLD, path)
    before = path.read_bytes()
    writer = textwrap.dedent(
        f"""
        import resource, signal, torch
        from genlab.utils.checkpoint import AtomicCheckpointIO, CheckpointWriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # files stop at 1 MB
        try:
            big = {{"state_dict": {{"w": torch.ones(1 << 20)}}}}  # 4 MB
            AtomicCheckpointIO().save_checkpoint(big, {str(path)!r})
        except CheckpointWriteError as err:
            print("ERROR:", err)
        """
    )
    done = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"ERROR: could not write checkpoint {path}: File too large" in done.stdout
    assert "the previous file is untouched" in done.stdout
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".last.ckpt.tmp-*"))


def test_non_finite_weights_are_never_written(tmp_path: Path) -> None:
    path = tmp_path / "step.ckpt"
    atomic_torch_save(OLD, path)
    bad = {"state_dict": {"w": torch.tensor([1.0, float("nan")]), "n": torch.tensor(3)}}
    with pytest.raises(NonFiniteWeightsError, match=r"weights w are not finite"):
        AtomicCheckpointIO().save_checkpoint({**bad, "global_step": 7}, path)
    assert torch.load(path, weights_only=False)["global_step"] == 1


def test_a_failed_write_raises_a_checkpoint_write_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    with pytest.raises(CheckpointWriteError, match="could not write checkpoint"):
        AtomicCheckpointIO().save_checkpoint(OLD, blocker / "sub" / "last.ckpt")
