"""Find, or build once, the checkpoint of an offline evaluator the project trains itself.

An evaluator (the shapes oracle, CLIP) is made by a documented training command, e.g.
``python src/train.py experiment=shapes_oracle``. :func:`ensure_evaluator` returns the
configured checkpoint path; when the file is missing and a recipe is configured, it runs exactly
that command in a subprocess (so the checkpoint is the one a user would make by hand), copies
the run's ``last.ckpt`` to the path atomically, and writes ``<path>.json`` beside it with the
command, the run folder and the date. The installed file is the checkpoint without its training
state (optimizer, schedulers, loops: :func:`install_weights`), a few MB. A lock file keeps two processes from building the same
evaluator at once; a failed build leaves no checkpoint and raises with the end of its log.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from genlab.utils import progress
from genlab.utils.io import atomic_torch_save

log = logging.getLogger(__name__)

LOCK_STALE_SECONDS = 3 * 3600


def project_root() -> Path:
    """The repository root: ``$PROJECT_ROOT`` (set by the entry points) or the folder above
    ``src/``."""
    return Path(os.environ.get("PROJECT_ROOT") or Path(__file__).resolve().parents[3])


def build_command(recipe: Sequence[str], run_dir: Path) -> list[str]:
    """The training command that makes an evaluator: ``python src/train.py <recipe>``."""
    script = project_root() / "src" / "train.py"
    return [sys.executable, str(script), *recipe, f"hydra.run.dir={run_dir}"]


def ensure_evaluator(
    checkpoint: str | Path,
    recipe: Sequence[str] | None,
    *,
    name: str,
    wait_seconds: float = 3600.0,
) -> Path:
    """Return ``checkpoint``, building it first with ``recipe`` when it does not exist.

    Args:
        checkpoint: where the evaluator's checkpoint lives (or will).
        recipe: the ``src/train.py`` overrides that make it, e.g. ``["experiment=shapes_oracle"]``;
            None or empty: never build, fail with a message instead.
        name: the evaluator's name, for messages.
        wait_seconds: how long to wait for another process that is building it.

    Raises:
        FileNotFoundError: no checkpoint and no recipe.
        RuntimeError: the build command failed (its log's end is in the message).
    """
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return path
    if not recipe:
        raise FileNotFoundError(
            f"{name}: no evaluator checkpoint at {str(path)!r} and no recipe to build it: train it "
            f"(e.g. `python src/train.py experiment={name}`) and point the config at its "
            "checkpoints/last.ckpt"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    if not take_lock(lock):
        return wait_for(path, lock, name=name, seconds=wait_seconds)
    try:
        if not path.is_file():  # built by another process between our check and the lock
            build(path, list(recipe), name=name)
    finally:
        lock.unlink(missing_ok=True)
    return path


def take_lock(lock: Path) -> bool:
    """Create ``lock`` exclusively; a lock older than ``LOCK_STALE_SECONDS`` is taken over."""
    if lock.exists() and time.time() - lock.stat().st_mtime > LOCK_STALE_SECONDS:
        log.warning("removing a stale lock %s", lock)
        lock.unlink(missing_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def wait_for(path: Path, lock: Path, *, name: str, seconds: float) -> Path:
    """Wait while another process holding ``lock`` builds ``path``."""
    log.info("%s: another process is building %s; waiting", name, path)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.is_file():
            return path
        if not lock.exists():
            break
        time.sleep(2.0)
    if path.is_file():
        return path
    raise RuntimeError(
        f"{name}: waited for another process to build {str(path)!r}, but no checkpoint appeared "
        f"(lock {str(lock)!r}); remove the lock if no build is running and try again"
    )


def build(path: Path, recipe: list[str], *, name: str) -> None:
    """Run the recipe's training in a subprocess and install its ``last.ckpt`` at ``path``."""
    run_dir = path.with_name(f"{path.stem}_build")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    command = build_command(recipe, run_dir)
    shown = "python src/train.py " + " ".join(recipe)
    log.warning(
        "%s: no checkpoint at %s; building it once with `%s` (log: %s/build.log)",
        name,
        path,
        shown,
        run_dir,
    )
    run_dir.mkdir(parents=True)
    start = time.monotonic()
    with open(run_dir / "build.log", "w") as out:
        result = run_with_spinner(command, out, f"building the {name} evaluator")
    made = run_dir / "checkpoints" / "last.ckpt"
    if result.returncode != 0 or not made.is_file():
        tail = (run_dir / "build.log").read_text()[-3000:]
        raise RuntimeError(
            f"{name}: building the evaluator with `{shown}` failed (exit code "
            f"{result.returncode}); the end of {run_dir / 'build.log'}:\n{tail}"
        )
    install_weights(made, path)  # atomic: readers see no file or the whole file
    info = {
        "command": shown,
        "run_dir": str(run_dir),
        "built": datetime.datetime.now().isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - start, 1),
    }
    path.with_name(path.name + ".json").write_text(json.dumps(info, indent=2) + "\n")
    log.warning("%s: built %s in %.0f s", name, path, info["seconds"])


def run_with_spinner(command: list[str], out, description: str) -> subprocess.CompletedProcess:
    """Run ``command`` with its output in the file ``out``, under a spinner with the elapsed
    time at a terminal (:mod:`genlab.utils.progress`: nothing is printed elsewhere)."""
    with progress.bar(description) as bar:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)
        while process.poll() is None:
            time.sleep(0.5 if bar.shown else 0.1)
    return subprocess.CompletedProcess(command, process.returncode)


TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "callbacks", "MixedPrecision")


def install_weights(checkpoint: str | Path, path: str | Path) -> None:
    """Write ``checkpoint`` to ``path`` (atomically) without its training state: what an
    evaluator needs, the weights with the configs and entries that ``genlab.load`` reads."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    for key in TRAINING_STATE:
        ckpt.pop(key, None)
    atomic_torch_save(ckpt, path)


if __name__ == "__main__":  # python -m genlab.metrics.evaluators install RUN/last.ckpt OUT.ckpt
    import argparse

    parser = argparse.ArgumentParser(description="Install an evaluator checkpoint's weights.")
    parser.add_argument("command", choices=["install"])
    parser.add_argument("checkpoint")
    parser.add_argument("path")
    args = parser.parse_args()
    install_weights(args.checkpoint, args.path)
