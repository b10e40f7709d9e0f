"""File plumbing used everywhere: atomic writes and content hashes, implemented once.

Atomic writes (:func:`atomic_write`, and its ``bytes``, text, ``torch.save`` and copy forms) go
to a temporary file next to the target (``.<name>.tmp-<pid>``), are flushed to disk with
``fsync``, then renamed over the target with ``os.replace``, and the rename is made durable by
an ``fsync`` of the folder. A crash, a kill or a full disk at any moment leaves either the old
file or the new one, complete, never a partial file; a failed write removes its temporary and
re-raises, and the next write to the same path removes the temporaries that killed writers left.

Hashes: :func:`file_sha256` (a file's SHA-256), :func:`file_version` (its first 12 hex digits,
the version of a weights file) and :func:`description_key` (the first 16 hex digits of the
SHA-256 of a JSON description: the key of an on-disk cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch


def temporary_path(path: Path) -> Path:
    """The temporary file an atomic write of ``path`` by this process goes through."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file beside it, which is
    flushed to disk and renamed over ``path``.

    Raises:
        Whatever the write raised (an ``OSError`` for a full disk or an unwritable folder); the
        temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename is still atomic


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | Path, *, stream: bool = False) -> None:
    """``torch.save`` to ``path`` atomically (:func:`atomic_write`).

    By default the object is serialized in memory first (as Lightning does for checkpoints), so
    that a failed write is a plain ``OSError``. ``stream=True`` serializes straight into the
    temporary file, with no in-memory copy: for large caches.
    """
    if stream:
        atomic_write(path, lambda f: torch.save(obj, f))
        return
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries that killed writers of ``path`` left (their process is gone)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_version(path: str | Path) -> str:
    """The first 12 hex digits of the SHA-256 of a file: a weights file's version."""
    return file_sha256(path)[:12]


def description_key(description: dict[str, Any]) -> str:
    """The first 16 hex digits of the SHA-256 of a JSON description (sorted keys)."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
