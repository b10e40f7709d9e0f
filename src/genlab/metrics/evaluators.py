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
import re
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


def build(path: Path, recipe: Sequence[str], *, name: str) -> None:
    """Run ``src/train.py <recipe>`` in a subprocess (:func:`run_build`) and install its
    ``last.ckpt`` at ``path`` without the training state, with ``<path>.json`` beside it. Used
    for the evaluators and for an LDM's first stage (:mod:`genlab.utils.first_stages`)."""
    run_dir = path.with_name(f"{path.stem}_build")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    shown = "python src/train.py " + " ".join(recipe)
    log_file = run_dir / "build.log"
    log.warning(
        "%s: no checkpoint at %s; building it once with `%s` (log: %s); later runs reuse it",
        name,
        path,
        shown,
        log_file,
    )
    run_dir.mkdir(parents=True)
    start = time.monotonic()
    returncode = run_build(build_command(recipe, run_dir), log_file, f"building the {name}")
    made = run_dir / "checkpoints" / "last.ckpt"
    if returncode != 0 or not made.is_file():
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(
            f"{name}: building it with `{shown}` failed (exit code {returncode}); the end of "
            f"{log_file}:\n{tail}"
        )
    install_weights(made, path)  # atomic: readers see no file or the whole file
    info = {
        "command": shown,
        "overrides": list(recipe),
        "run_dir": str(run_dir),
        "built": datetime.datetime.now().isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - start, 1),
    }
    path.with_name(path.name + ".json").write_text(json.dumps(info, indent=2) + "\n")
    log.warning("%s: built %s in %.0f s", name, path, info["seconds"])


PROGRESS_SECONDS = 30.0  # a build logs a progress line this often
DISTRIBUTED = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK"}
DISTRIBUTED |= {"MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED", "GENLAB_RUN_ID"}


def run_build(command: list[str], log_file: Path, description: str) -> int:
    """Run a build ``command`` with its output in ``log_file`` and return its exit code: under a
    spinner at a terminal (:mod:`genlab.utils.progress`), with a log line every
    ``PROGRESS_SECONDS`` (the log's last line), as one process (:func:`single_process_env`); if
    this process is interrupted, the build is stopped too (and leaves no checkpoint)."""
    start = time.monotonic()
    with open(log_file, "w") as out, progress.bar(description):
        child = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, text=True, env=single_process_env()
        )
        try:
            while True:
                try:
                    child.wait(timeout=PROGRESS_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    minutes = (time.monotonic() - start) / 60
                    log.info("%s: %.1f min; %s", description, minutes, last_line(log_file))
        except BaseException:
            child.terminate()
            child.wait()
            raise
    return child.returncode


def single_process_env() -> dict[str, str]:
    """This process's environment without what would make a build a rank of this run's job
    (torchrun's and Lightning's variables, SLURM's): the recipe runs as one process."""
    return {
        k: v for k, v in os.environ.items() if k not in DISTRIBUTED and not k.startswith("SLURM_")
    }


def last_line(log_file: Path) -> str:
    """The last non-empty line of a build log (progress bars' carriage returns split too)."""
    try:
        with open(log_file, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # colours and cursor moves
    lines = [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]
    return lines[-1][-160:] if lines else "(no output yet)"


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
