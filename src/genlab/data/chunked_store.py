"""On-disk caches at scale: rows written in bounded chunks by every DDP rank, read memory-mapped.

The latent cache of latent diffusion (:mod:`genlab.data.latent_cache`) and the text-embedding
cache of frozen text encoders (:mod:`genlab.data.text_cache`) are both *stores*: ``N`` rows of a
few named fields (e.g. ``latents`` (N, O, C', h, w) float16; ``tokens`` (N, L, D), ``mask``
(N, L), ``pooled`` (N, D)), kept in one folder named by the content key of what they hold
(``<cache_dir>/<key>/``):

* ``<field>-<start>-<stop>.npy``: the rows ``start..stop-1`` of one field, a plain ``.npy``
  file. Rows are split into chunks of at most ``chunk_mb`` MiB (all fields of a row together);
  chunk c is written by rank ``c % world_size``, each rank holding at most one chunk in memory,
  so the build's memory does not grow with the split. Every file is written atomically
  (temporary + fsync + rename, :func:`genlab.utils.io.atomic_write`): a file that exists is
  complete.
* ``manifest.json``: written last, by rank 0, once every chunk file exists (after a barrier):
  the store is complete if and only if it has a manifest. A build that was killed leaves chunk
  files and no manifest; the next build with the same key (the same content) keeps the chunks
  it finds and encodes the others (a chunk's file name carries its row range, so a build with
  another ``chunk_mb`` simply does not find them and redoes its own).

Reading (:class:`ChunkedStore`) memory-maps every chunk (``np.load(mmap_mode="r")``): opening a
store costs no memory per rank whatever its size, and reading rows copies just those rows.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genlab.utils.io import atomic_write, atomic_write_text

MANIFEST = "manifest.json"
STORE_FORMAT = 1  # the layout of a store folder (this module)
DEFAULT_CHUNK_MB = 256.0
Fields = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape of one row, numpy dtype name)


def row_bytes(fields: Fields) -> int:
    """The bytes of one row, all fields together."""
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in fields.values())


def rows_per_chunk(fields: Fields, chunk_mb: float) -> int:
    """How many rows make a chunk of at most ``chunk_mb`` MiB (at least one)."""
    if chunk_mb <= 0:
        raise ValueError(f"a cache's chunk_mb={chunk_mb} must be > 0")
    return max(1, int(chunk_mb * 2**20) // max(1, row_bytes(fields)))


def chunk_ranges(num_rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    """The row ranges [start, stop) of the chunks of ``num_rows`` rows."""
    return [(s, min(s + chunk_rows, num_rows)) for s in range(0, num_rows, chunk_rows)]


def chunk_file(folder: Path, field: str, start: int, stop: int) -> Path:
    return folder / f"{field}-{start:010d}-{stop:010d}.npy"


def chunk_done(folder: Path, fields: Iterable[str], start: int, stop: int) -> bool:
    """Whether every field's file of the chunk [start, stop) exists (then it is complete)."""
    return all(chunk_file(folder, f, start, stop).is_file() for f in fields)


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def rank_chunks(
    num_rows: int, chunk_rows: int, rank: int, world_size: int
) -> list[tuple[int, int]]:
    """The chunks rank ``rank`` writes: c % world_size == rank."""
    ranges = chunk_ranges(num_rows, chunk_rows)
    return [r for c, r in enumerate(ranges) if c % world_size == rank]


class ChunkWriter:
    """Fills the chunks ``ranges`` (in order) with rows given batch by batch, writing each chunk's
    files atomically as soon as it is full; only the current chunk is held in memory.

    Chunks already on disk are skipped: their rows are still expected from ``add`` (callers feed
    the rows of :attr:`pending` only, see :meth:`pending_rows`).
    """

    def __init__(self, folder: Path, fields: Fields, ranges: Sequence[tuple[int, int]]):
        self.folder, self.fields = Path(folder), fields
        self.pending = [r for r in ranges if not chunk_done(self.folder, fields, *r)]
        self.skipped = len(ranges) - len(self.pending)
        self.current = 0  # index in pending
        self.filled = 0  # rows of the current chunk filled
        self.buffer: dict[str, np.ndarray] | None = None
        self.written = 0

    def pending_rows(self) -> list[int]:
        """The row indices the caller must feed, in order."""
        return [i for start, stop in self.pending for i in range(start, stop)]

    def new_buffer(self) -> dict[str, np.ndarray]:
        start, stop = self.pending[self.current]
        return {
            name: np.empty((stop - start, *shape), dtype=dtype)
            for name, (shape, dtype) in self.fields.items()
        }

    def add(self, rows: dict[str, np.ndarray | torch.Tensor]) -> None:
        """Append a batch of rows (each field (B, ...)) after the ones given so far."""
        arrays = {k: to_numpy(v) for k, v in rows.items()}
        n = len(next(iter(arrays.values())))
        done = 0
        while done < n:
            if self.current >= len(self.pending):
                raise ValueError("more rows than the chunks of this writer hold")
            if self.buffer is None:
                self.buffer = self.new_buffer()
            start, stop = self.pending[self.current]
            take = min(n - done, stop - start - self.filled)
            for name in self.fields:
                self.buffer[name][self.filled : self.filled + take] = arrays[name][
                    done : done + take
                ]
            self.filled += take
            done += take
            if self.filled == stop - start:
                self.flush()

    def flush(self) -> None:
        start, stop = self.pending[self.current]
        for name, array in self.buffer.items():
            atomic_write(
                chunk_file(self.folder, name, start, stop), lambda f, a=array: np.save(f, a)
            )
        self.written += 1
        self.current += 1
        self.filled, self.buffer = 0, None

    def close(self) -> None:
        """Check that every chunk was filled."""
        if self.current != len(self.pending) or self.filled:
            raise ValueError(
                f"the cache build stopped after {self.current} of {len(self.pending)} chunks"
            )


def to_numpy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def write_manifest(
    folder: Path, fields: Fields, num_rows: int, chunk_rows: int, description: dict[str, Any]
) -> None:
    """Mark the store complete: check that every chunk file is there, then write the manifest
    (atomically, last)."""
    folder = Path(folder)
    ranges = chunk_ranges(num_rows, chunk_rows)
    missing = [r for r in ranges if not chunk_done(folder, fields, *r)]
    if missing:
        raise FileNotFoundError(
            f"cache {folder}: {len(missing)} of {len(ranges)} chunks are missing after the build "
            f"(first: rows {missing[0][0]}..{missing[0][1] - 1}); is the cache folder on a file "
            "system that every node shares?"
        )
    manifest = {
        "format": STORE_FORMAT,
        "num_rows": num_rows,
        "chunk_rows": chunk_rows,
        "chunks": ranges,
        "fields": {k: {"shape": list(s), "dtype": d} for k, (s, d) in fields.items()},
        "description": description,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, default=str))


def build_store(
    folder: Path,
    fields: Fields,
    num_rows: int,
    chunk_mb: float,
    description: dict[str, Any],
    compute: Callable[[list[int], ChunkWriter], None],
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> ChunkWriter:
    """Build the store in ``folder`` together with the other ranks: this rank's missing chunks
    (``compute(rows, writer)`` feeds ``writer.add`` the rows ``rows`` in order), a barrier, the
    manifest by rank 0, a barrier. Every rank calls it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chunk_rows = rows_per_chunk(fields, chunk_mb)
    ranges = rank_chunks(num_rows, chunk_rows, rank, world_size)
    writer = ChunkWriter(folder, fields, ranges)
    rows = writer.pending_rows()
    if rows:
        compute(rows, writer)
    writer.close()
    barrier()
    if rank == 0:
        write_manifest(folder, fields, num_rows, chunk_rows, description)
    barrier()
    return writer


class ChunkedStore:
    """A complete store, every chunk memory-mapped (module docstring)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"cache {self.folder} is not complete: it has no {MANIFEST}")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != STORE_FORMAT:
            raise ValueError(f"cache {self.folder}: unknown store format {manifest.get('format')}")
        self.manifest = manifest
        self.num_rows: int = manifest["num_rows"]
        self.chunk_rows: int = manifest["chunk_rows"]
        self.description: dict[str, Any] = manifest["description"]
        self.fields: Fields = {
            k: (tuple(v["shape"]), v["dtype"]) for k, v in manifest["fields"].items()
        }
        self.maps: dict[str, list[np.ndarray]] = {
            name: [
                np.load(chunk_file(self.folder, name, start, stop), mmap_mode="r")
                for start, stop in manifest["chunks"]
            ]
            for name in self.fields
        }

    def __len__(self) -> int:
        return self.num_rows

    def shape(self, field: str) -> tuple[int, ...]:
        """The shape of a field over all rows, (N, ...)."""
        return (self.num_rows, *self.fields[field][0])

    def read(self, field: str, index: Sequence[int] | torch.Tensor | np.ndarray) -> torch.Tensor:
        """The rows ``index`` of a field, in that order (copied out of the memory maps)."""
        index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.num_rows):
            raise IndexError(f"rows {index.tolist()} out of a cache of {self.num_rows} rows")
        shape, dtype = self.fields[field]
        out = np.empty((len(index), *shape), dtype=dtype)
        chunk, row = np.divmod(index, self.chunk_rows)
        maps = self.maps[field]
        for c in np.unique(chunk):
            at = chunk == c
            out[at] = maps[c][row[at]]
        return torch.from_numpy(out)

    def all(self, field: str) -> torch.Tensor:
        """Every row of a field (a copy: for small stores and tests)."""
        return self.read(field, np.arange(self.num_rows))
