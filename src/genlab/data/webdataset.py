"""Image-caption(-label) samples streamed from WebDataset tar shards (``data=webdataset``).

Shards. ``urls`` is a path, a brace pattern (``shards/train-{000000..000099}.tar``), a ``::``
separated list of patterns or a list; anything ``webdataset.gopen`` opens works, ``pipe:``
commands included (``pipe:aws s3 cp s3://bucket/train-000000.tar -``). A sample is the tar
members that share a key (the member name up to its first dot): an image (``jpg``, ``jpeg``,
``png``, ``webp``, ``bmp``, ``gif``, ``tif``, ``tiff``, ``ppm``), a caption (``txt``; several
lines are several captions: training draws one, evaluation takes the first) and, with
``num_classes``, an integer label (``cls``). ``src/make_shards.py`` writes such shards from an
image folder, COCO or the embedded shapes dataset.

How an epoch is read (:class:`ShardStream`, :class:`StreamLoader`):

* DDP rank ``r`` of ``W`` owns the shards ``r, r + W, r + 2W, ...`` of the expanded url list,
  the same in every epoch (fewer shards than ranks is an error). Each epoch the rank permutes
  its shards by ``(seed, epoch, rank)`` and deals them to its loader workers (worker ``w`` of
  ``N`` takes ``w, w + N, ...`` of that order). Every shard is read by exactly one (rank, worker)
  per epoch: no sample is delivered twice in an epoch.
* A worker shuffles each shard with a buffer of ``shuffle_buffer`` samples (the buffer is
  emptied at the end of each shard), from a generator seeded by ``(seed, epoch, shard)``; across
  shards the mixing comes from the shard order and from the main process, which takes the
  workers' samples in turns of :data:`CHUNK` (16) per worker. Write shards in random order
  (``make_shards.py`` does) so that a shard is not one class or one photographer.
* The main process batches the samples (``batch_size``; batches are never ragged), so a batch
  may hold samples of several workers and the batch count does not depend on how the samples
  fall over the workers. Which worker gives the next sample depends on the data alone, never on
  which worker process answers first: the stream is deterministic. Every rank
  yields the same number of batches per epoch, ``epoch_length``, as Lightning's DDP needs.
  ``epoch_length: null`` counts the samples of every shard at setup (tar headers only, local
  files only) and takes ``min over ranks of floor(samples of the rank / batch_size)``: with
  uneven shards, the ranks with more samples leave their last ones out of the epoch (a
  different tail each epoch, as the order is reshuffled; logged at setup). For ``pipe:`` or
  remote urls set ``epoch_length`` yourself. A rank whose shards run out before
  ``epoch_length`` batches (skipped bad samples, or a too large ``epoch_length``) reads its
  shards again from the start of the epoch (a new round, other crops and captions) and warns.

The ``index`` of a training sample is ``shard * 1_000_000 + position``: the shard's number in
the expanded url list and the sample's position in that tar (sample 17 of shard 3 is 3000017),
unique and the same in every run, epoch and rank. It seeds the sample's own random draws (crop,
flip, caption): ``(seed, epoch, round, index)``. Validation and test items have their position
in the split, as everywhere in genlab.

Resume. The checkpoint stores, for every rank (gathered from all ranks at save time), the
position of each of its workers in its stream (the shard's place in the worker's list and the
number of samples of that shard's shuffled order delivered), the round, and which worker gives
the next sample. A resumed run starts the saved epoch there: each worker skips the shards it
finished without opening them and replays the shuffle of its current shard without decoding the
samples already delivered. The resumed run then yields exactly the batches the interrupted run
would have yielded (same samples, same order, same crops), as long as the shards' contents are
unchanged. The cost: per worker, the samples of its current shard up to its position, plus the
``shuffle_buffer`` that the replayed shuffle must fill (at most the whole shard), are read from
the tar again but not decoded; nothing delivered before the checkpoint is delivered again. A changed ``world_size``,
``num_workers``, ``batch_size``, ``seed``, ``shuffle_buffer`` or shard list cannot resume
exactly: the epoch then restarts from its start, with a warning. The positions are gathered
from all ranks inside ``state_dict`` (``all_gather_object``), which Lightning calls on every
rank whenever it saves a checkpoint (``trainer.save_checkpoint`` must run on all ranks anyway).

Validation and test (``val_urls``, ``test_urls``) are map-style: their shards are read whole
into memory at setup (the encoded bytes), decoded on access, so every evaluation is exact and
ranks share them as for every genlab dataset. ``val_urls: null`` takes the first ``val_size``
samples of the training shards (which training also sees: give held-out shards for honest
validation numbers); ``test_urls: null`` tests on the val split.

Bad samples follow the project's ``bad_files`` policy (:mod:`genlab.data.files`): under ``skip``
an undecodable image, a missing image or caption, a bad label or a corrupt tar is logged (the
first ones by url and key), counted (:meth:`WebDataModule.skipped_files`) and skipped;
``max_consecutive_bad`` bad samples in a row raise a ``RuntimeError``. Under ``strict`` the first
bad sample raises (streams are not checked at setup: that would read every shard). A tar cut
exactly at a member boundary cannot be told from a shorter shard (the tar format has no
length); cut inside a member, it is reported as a corrupt tar after its readable samples.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate
from webdataset import tariterators
from webdataset.shardlists import expand_urls

from genlab.data.checks import (
    CROPS,
    BadFiles,
    Crop,
    check_arg,
    check_bad_file_args,
    check_choice,
)
from genlab.data.datamodule import SHOWN_BAD_FILES, GenDataModule, training_progress
from genlab.data.files import READ_ERRORS, ImageFiles, image_transform, to_mode
from genlab.utils.seeding import derive_seed

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
CAPTION_EXT = "txt"
LABEL_EXT = "cls"
STREAM_LOADING_ARGS = ("shuffle_buffer", "epoch_length", "max_train_captions")
CHUNK = 16  # samples a worker sends at once, and a worker's turn in the main process
KEPT_POSITIONS = 16  # positions kept behind the newest batch (Lightning prefetches one)
SHARD_STRIDE = 1_000_000  # index = shard * SHARD_STRIDE + position in the shard
LAYOUT = """  <shard>.tar holding, per sample, members that share a key (name up to the first dot):
    <key>.jpg|jpeg|png|webp|bmp|gif|tif|tiff|ppm   the image
    <key>.txt                                       its caption(s), one per line
    <key>.cls                                       with num_classes: its integer label
  (python src/make_shards.py --source image_folder|coco|shapes ... writes them)"""


# ---------------------------------------------------------------------------------------------
# shard lists


def expand_shards(
    urls: str | Sequence[str] | None, what: str = "urls", base: str | os.PathLike = ""
) -> list[str]:
    """The shard urls of a path, brace pattern, ``::`` list or list of those, checked; relative
    local paths are taken relative to ``base`` (the DataModule's ``data_dir``).

    Raises:
        ValueError: ``urls`` is empty or expands to nothing.
        FileNotFoundError: local shards are missing (the first ones named, with the count).
    """
    if urls is None or (isinstance(urls, str) and not urls.strip()):
        raise ValueError(
            f"data.{what} is empty: give a shard path, a brace pattern such as "
            f"'shards/train-{{000000..000009}}.tar', or a list\n{LAYOUT}"
        )
    patterns = [urls] if isinstance(urls, str) else [str(u) for u in urls]
    expanded = [
        os.path.join(base, url) if is_local(url) and not url.startswith("file:") else url
        for pattern in patterns
        for url in expand_urls(pattern)
    ]
    if not expanded:
        raise ValueError(f"data.{what}={urls!r} expands to no shard")
    missing = [u for u in expanded if is_local(u) and not os.path.isfile(local_path(u))]
    if missing:
        shown = ", ".join(missing[:SHOWN_BAD_FILES])
        raise FileNotFoundError(
            f"data.{what}={urls!r}: {len(missing)} of {len(expanded)} shards do not exist: "
            f"{shown}\nExpected layout:\n{LAYOUT}"
        )
    return expanded


def is_local(url: str) -> bool:
    """Whether ``url`` names a local file (a path or ``file:``), not a pipe or a remote url."""
    return url.startswith("file:") or ("://" not in url and not url.startswith("pipe:"))


def local_path(url: str) -> str:
    """The file path of a local ``url``."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return url[len("file:") :] if url.startswith("file:") else url


def sample_key(name: str) -> tuple[str | None, str | None]:
    """``(key, extension)`` of a tar member name, as webdataset groups them."""
    return tariterators.base_plus_ext(name)


def count_samples(url: str) -> int:
    """The number of samples (distinct keys with an image member) of a local shard, from its
    tar headers alone (an uncompressed tar is read by seeking from header to header)."""
    keys = set()
    try:
        with tarfile.open(local_path(url), "r:*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = sample_key(member.name)
                if key is not None and ext.lower() in IMAGE_EXTS:
                    keys.add(key)
    except (tarfile.TarError, OSError, EOFError) as err:
        log.warning(
            "%s: a damaged tar (%s: %s); counted its first %d samples",
            url,
            type(err).__name__,
            err,
            len(keys),
        )
    return len(keys)


def caption_members(url: str) -> Iterator[bytes]:
    """The contents of the caption members of a shard, in tar order."""
    if is_local(url):
        with tarfile.open(local_path(url), "r:*") as tar:
            for member in tar:
                if member.isreg() and member.name.endswith("." + CAPTION_EXT):
                    yield tar.extractfile(member).read()
        return
    streams = tariterators.url_opener([{"url": url}])
    is_caption = lambda name: name.endswith("." + CAPTION_EXT)  # noqa: E731
    for member in tariterators.tar_file_expander(streams, select_files=is_caption):
        if member:
            yield member["data"]


def shard_list_hash(urls: Sequence[str]) -> str:
    """A short hash of the shard list (what a resumed run must read the same)."""
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# samples


@dataclass
class Decoder:
    """Turns a raw webdataset sample into a genlab item, or says why it cannot."""

    resolution: int
    channels: int = 3
    captions: bool = True
    num_classes: int | None = None
    crop: str = "center"
    flip: bool = False
    random_caption: bool = False
    transform: Callable[[Image.Image], torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.transform = image_transform(
            self.resolution, channels=self.channels, crop=self.crop, flip=self.flip
        )

    def image(self, raw: dict[str, Any]) -> tuple[Image.Image | None, str]:
        """The decoded image of ``raw`` or ``(None, why)``."""
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            return None, f"no image member (.{'/.'.join(IMAGE_EXTS)})"
        mode = "RGB" if self.channels == 3 else "L"
        try:
            with Image.open(io.BytesIO(raw[ext])) as image:
                image.draft(mode, (self.resolution, self.resolution))
                return to_mode(ImageOps.exif_transpose(image), mode), ""
        except READ_ERRORS as err:
            return None, f"undecodable .{ext} ({type(err).__name__}: {err})"

    def texts(self, raw: dict[str, Any]) -> tuple[list[str] | None, str]:
        """The captions of ``raw`` (one per non-empty line) or ``(None, why)``."""
        data = raw.get(CAPTION_EXT)
        if data is None:
            return None, f"no caption member (.{CAPTION_EXT})"
        try:
            lines = [line.strip() for line in data.decode("utf-8").splitlines()]
        except UnicodeDecodeError as err:
            return None, f"caption is not UTF-8 ({err})"
        lines = [line for line in lines if line]
        return (lines, "") if lines else (None, "empty caption")

    def label(self, raw: dict[str, Any]) -> tuple[int | None, str]:
        """The label of ``raw`` or ``(None, why)``."""
        data = raw.get(LABEL_EXT)
        if data is None:
            return None, f"no label member (.{LABEL_EXT})"
        try:
            value = int(data.decode("utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            return None, f"label {data[:20]!r} is not an integer"
        if not 0 <= value < self.num_classes:
            return None, f"label {value} is not in [0, num_classes={self.num_classes})"
        return value, ""

    def check(self, raw: dict[str, Any]) -> str:
        """Why ``raw`` is not a sample (caption or label missing), ``""`` if it may be one."""
        if self.captions:
            _, why = self.texts(raw)
            if why:
                return why
        if self.num_classes is not None:
            _, why = self.label(raw)
            if why:
                return why
        return ""

    def __call__(self, raw: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """The item of ``raw`` (``image`` and ``caption``/``label``), or ``(None, why)``; the
        random draws use torch's generator (seed it around the call)."""
        why = self.check(raw)
        if why:
            return None, why
        image, why = self.image(raw)
        if image is None:
            return None, why
        item: dict[str, Any] = {"image": self.transform(image)}
        if self.captions:
            texts, _ = self.texts(raw)
            pick = int(torch.randint(len(texts), ())) if self.random_caption else 0
            item["caption"] = texts[pick]
        if self.num_classes is not None:
            item["label"] = self.label(raw)[0]
        return item, ""


class BadSamples:
    """Counts bad samples under a ``bad_files`` policy and stops at ``max_consecutive_bad`` in a
    row. ``record`` returns the description of the bad sample (to report it to the main
    process) or raises under ``strict``."""

    def __init__(self, policy: str, max_consecutive: int) -> None:
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.count = 0

    def record(self, where: str, why: str) -> str:
        what = f"{where}: {why}"
        if self.policy == "strict":
            raise RuntimeError(f"bad sample {what} (bad_files='strict')")
        self.count += 1
        self.consecutive += 1
        if self.count <= SHOWN_BAD_FILES:
            log.warning(
                "skipping bad sample %s; %d skipped so far by this reader", what, self.count
            )
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self.consecutive} bad samples in a row, the last {what}; max_consecutive_bad="
                f"{self.max_consecutive} stops here: the shards look broken, not noisy"
            )
        return what

    def good(self) -> None:
        self.consecutive = 0


def raw_samples(url: str, errors: list[str]) -> Iterator[dict[str, Any]]:
    """The raw samples of one shard in tar order, each with ``__pos__`` (its position); a tar
    that cannot be opened or read further is appended to ``errors`` (the samples read before
    the damage are kept)."""

    def handler(exn: Exception) -> bool:
        errors.append(f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True  # stop reading this shard's damaged part, go on

    streams = tariterators.url_opener([{"url": url}], handler=handler)
    files = tariterators.tar_file_expander(streams, handler=handler)
    for position, raw in enumerate(tariterators.group_by_keys(files, handler=handler)):
        if position >= SHARD_STRIDE:
            raise ValueError(f"{url}: more than {SHARD_STRIDE} samples in one shard")
        raw["__pos__"] = position
        yield raw


def buffer_shuffle(
    items: Iterator[dict[str, Any]], size: int, rng: np.random.Generator
) -> Iterator[dict[str, Any]]:
    """``items`` shuffled through a buffer of ``size`` (``<= 1``: in order); the buffer is
    emptied in random order at the end."""
    if size <= 1:
        yield from items
        return
    buffer: list[dict[str, Any]] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        buffer[j], item = item, buffer[j]
        yield item
    while buffer:
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        yield buffer.pop()


# ---------------------------------------------------------------------------------------------
# the training stream


class ShardStream(IterableDataset):
    """The training samples of one DDP rank: its worker ``w`` reads the shards dealt to it for
    the epoch (see the module doc), each buffer-shuffled, and yields them in chunks of up to
    :data:`CHUNK` (:func:`pack`: one shared-memory tensor per chunk, not per sample), each
    sample with its ``_at`` ``(shard place j, shuffled position i)``, then one
    ``{"_end": w}``; a chunk carries in ``_bad`` the bad samples skipped before it.

    Set :attr:`epoch`, :attr:`round` and :attr:`start` (``{worker: (j, i)}``: the last position
    already delivered) before iterating; a new DataLoader pickles them into its workers.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        rank: int,
        world_size: int,
        decoder: Decoder,
        seed: int,
        shuffle_buffer: int,
        bad_files: str = "skip",
        max_consecutive_bad: int = 20,
    ) -> None:
        if len(urls) < world_size:
            raise ValueError(
                f"{len(urls)} training shards cannot be shared by {world_size} DDP ranks: every "
                "rank needs at least one shard (write smaller shards, e.g. make_shards.py "
                "--maxcount)"
            )
        self.urls = list(urls)
        self.rank = rank
        self.world_size = world_size
        self.shards = list(range(rank, len(urls), world_size))  # this rank's shard numbers
        self.decoder = decoder
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.bad_files = bad_files
        self.max_consecutive_bad = max_consecutive_bad
        self.epoch = 0
        self.round = 0
        self.start: dict[int, tuple[int, int]] = {}

    def worker_shards(self, worker: int, num_workers: int, epoch: int) -> list[int]:
        """The shard numbers worker ``worker`` of ``num_workers`` reads in ``epoch``, in order."""
        rng = np.random.default_rng(derive_seed(self.seed, "shards", epoch, self.rank) % 2**63)
        order = [self.shards[k] for k in rng.permutation(len(self.shards))]
        return order[worker::num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start_j, start_i = self.start.get(worker, (0, -1))
        bad = BadSamples(self.bad_files, self.max_consecutive_bad)
        skipped: list[str] = []
        chunk: list[dict[str, Any]] = []
        for j, shard in enumerate(self.worker_shards(worker, num_workers, self.epoch)):
            if j < start_j:
                continue  # finished before the checkpoint: not even opened
            url = self.urls[shard]
            rng = np.random.default_rng(derive_seed(self.seed, "shuffle", self.epoch, shard))
            errors: list[str] = []
            shuffled = buffer_shuffle(raw_samples(url, errors), self.shuffle_buffer, rng)
            for i, raw in enumerate(shuffled):
                if j == start_j and i <= start_i:
                    continue  # delivered before the checkpoint: replayed, not decoded
                index = shard * SHARD_STRIDE + raw["__pos__"]
                seed = derive_seed(self.seed, "item", self.epoch, self.round, index)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    item, why = self.decoder(raw)
                if item is None:
                    skipped.append(bad.record(f"{url}#{raw['__key__']}", why))
                    continue
                bad.good()
                item.update(index=index, _at=(j, i))
                chunk.append(item)
                if len(chunk) == CHUNK:
                    yield pack(chunk, worker, skipped)
                    chunk, skipped = [], []
            for error in errors:
                skipped.append(bad.record(url, f"corrupt tar ({error})"))
        if chunk:
            yield pack(chunk, worker, [])
        yield {"_end": worker, "_worker": worker, "_bad": skipped}


def pack(items: list[dict[str, Any]], worker: int, bad: list[str]) -> dict[str, Any]:
    """A chunk of a worker's samples: images stacked into one tensor, the rest as lists."""
    chunk = {key: [item[key] for item in items] for key in items[0] if key != "image"}
    return {
        **chunk,
        "image": torch.stack([item["image"] for item in items]),
        "_worker": worker,
        "_bad": bad,
    }


def unpack(chunk: dict[str, Any]) -> list[dict[str, Any]]:
    """The samples of a :func:`pack` chunk."""
    keys = [k for k in chunk if not k.startswith("_") or k == "_at"]
    return [{key: chunk[key][k] for key in keys} for k in range(len(chunk["image"]))]


@dataclass
class StreamPosition:
    """Where a rank is in its epoch's stream: the round, each worker's last delivered
    ``(shard place, shuffled position)``, the worker whose turn it is and how many samples it
    gave in this turn."""

    round: int = 0
    at: dict[int, tuple[int, int]] = field(default_factory=dict)
    next_worker: int = 0
    taken: int = 0

    def copy(self) -> StreamPosition:
        return StreamPosition(self.round, dict(self.at), self.next_worker, self.taken)

    def to_dict(self) -> dict[str, Any]:
        at = {str(w): list(p) for w, p in self.at.items()}
        return {
            "round": self.round,
            "at": at,
            "next_worker": self.next_worker,
            "taken": self.taken,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> StreamPosition:
        at = {int(w): (int(p[0]), int(p[1])) for w, p in state["at"].items()}
        return cls(int(state["round"]), at, int(state["next_worker"]), int(state["taken"]))


class StreamLoader:
    """The training loader of :class:`ShardStream`: ``epoch_length`` batches of ``batch_size``
    per epoch on every rank, taken from the workers in turn, with a state that Lightning saves
    in each checkpoint (every rank's position, gathered at save time) and restores.

    ``progress`` returns ``(epoch, batches trained on)`` (from the trainer); without it the loader
    counts its own epochs. ``gather`` collects one object per rank (``None``: one process).
    """

    def __init__(
        self,
        stream: ShardStream,
        *,
        batch_size: int,
        epoch_length: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        progress: Callable[[], tuple[int, int]] | None = None,
        gather: Callable[[Any], list[Any]] | None = None,
    ) -> None:
        self.stream = stream
        self.batch_size = batch_size
        self.epoch_length = epoch_length
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.progress = progress
        self.gather = gather
        self.epochs_started = 0
        self.positions: dict[tuple[int, int], StreamPosition] = {}  # (epoch, batches) -> after
        self.resume: tuple[int, int, StreamPosition] | None = None  # (epoch, batches, position)
        self.bad: set[str] = set()  # the bad samples skipped so far (reported by the workers)

    def __len__(self) -> int:
        return self.epoch_length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.batches()

    def compatibility(self) -> dict[str, Any]:
        """What a resumed run must share with the saved one to continue exactly."""
        return {
            "batch_size": self.batch_size,
            "world_size": self.stream.world_size,
            "num_workers": self.num_workers,
            "seed": self.stream.seed,
            "shuffle_buffer": self.stream.shuffle_buffer,
            "shards": shard_list_hash(self.stream.urls),
        }

    def batches(self) -> Iterator[dict[str, Any]]:
        """One epoch of batches (or its rest, after a resume)."""
        if self.progress is not None:
            epoch = self.progress()[0]
        else:
            epoch, self.epochs_started = self.epochs_started, self.epochs_started + 1
        done, position = 0, StreamPosition()
        if self.resume is not None and self.resume[0] == epoch:
            done, position = self.resume[1], self.resume[2]
        self.resume = None
        self.positions = {(epoch, done): position}
        workers = max(self.num_workers, 1)
        samples: list[dict[str, Any]] = []
        while done < self.epoch_length:
            delivered = 0
            for item in self.round_samples(epoch, position, workers):
                delivered += 1
                samples.append(item)
                if len(samples) == self.batch_size:
                    done += 1
                    self.positions[(epoch, done)] = position.copy()
                    self.positions.pop((epoch, done - KEPT_POSITIONS), None)
                    yield self.collate(samples)
                    samples = []
                    if done == self.epoch_length:
                        return
            if delivered == 0 and not position.at:
                raise RuntimeError(
                    f"rank {self.stream.rank}: no readable sample in its {len(self.stream.shards)} "
                    f"shards (of {self.stream.urls[0]}, ...): every sample was bad"
                )
            log.warning(
                "rank %d: its shards ran out after %d of epoch_length=%d batches in epoch %d "
                "(skipped bad samples, or data.epoch_length larger than the shards hold): "
                "reading them again from the start (round %d)",
                self.stream.rank,
                done,
                self.epoch_length,
                epoch,
                position.round + 1,
            )
            position = StreamPosition(position.round + 1)

    def round_samples(
        self, epoch: int, position: StreamPosition, workers: int
    ) -> Iterator[dict[str, Any]]:
        """The samples of one round from ``position`` on: :data:`CHUNK` samples from worker
        ``next_worker``, then as many from the next worker (by id, cyclically), and so on, a
        finished worker left out; ``position`` follows every sample taken. The order depends on
        the data alone, never on which worker process answers first."""
        self.stream.epoch, self.stream.round = epoch, position.round
        self.stream.start = dict(position.at)
        loader = DataLoader(
            self.stream, batch_size=None, num_workers=self.num_workers, collate_fn=keep_item
        )
        source = iter(loader)
        waiting: dict[int, deque] = {w: deque() for w in range(workers)}
        ended: set[int] = set()
        alive = set(range(workers))
        worker = position.next_worker if position.next_worker in alive else 0
        while alive:
            while not waiting[worker] and worker not in ended:
                chunk = next(source)
                self.bad.update(chunk["_bad"])
                if "_end" in chunk:
                    ended.add(chunk["_worker"])
                else:
                    waiting[chunk["_worker"]].extend(unpack(chunk))
            if waiting[worker]:
                item = waiting[worker].popleft()
                position.at[worker] = item.pop("_at")
                position.taken += 1
                if position.taken < CHUNK:
                    position.next_worker = worker
                    yield item
                    continue
            else:  # finished: its turn passes
                alive.discard(worker)
                item = None
            position.taken = 0
            following = sorted(alive, key=lambda w: (w - worker - 1) % workers)
            worker = position.next_worker = following[0] if following else 0
            if item is not None:
                yield item

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(samples)
        if self.pin_memory and torch.cuda.is_available():
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Every rank's position after the batches trained on (gathered from all ranks)."""
        epoch, batches = self.progress() if self.progress is not None else (0, 0)
        position = self.positions.get((epoch, batches))
        if position is None and self.resume is not None and self.resume[:2] == (epoch, batches):
            position = self.resume[2]  # restored, and no batch read since
        mine = position.to_dict() if position is not None else None
        ranks = self.gather(mine) if self.gather is not None else [mine]
        return {"epoch": epoch, "batches": batches, **self.compatibility(), "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch after its trained batches, at every worker's position."""
        now = self.compatibility()
        changed = {k: (state.get(k), v) for k, v in now.items() if state.get(k) != v}
        mine = state.get("ranks", [None] * self.stream.world_size)[self.stream.rank]
        epoch, batches = state["epoch"], state["batches"]
        if changed or (mine is None and 0 < batches < self.epoch_length):
            what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            log.warning(
                "the training stream cannot resume exactly where the checkpoint stopped (%s): "
                "epoch %d reads its shards from the start for its remaining batches",
                what or "no position saved",
                epoch,
            )
            self.resume = (epoch, batches, StreamPosition())
            return
        position = StreamPosition.from_dict(mine) if mine is not None else StreamPosition()
        self.resume = (epoch, batches, position)
        if batches:
            log.info(
                "resuming the training stream at epoch %d after its first %d batches (rank %d: %s)",
                epoch,
                batches,
                self.stream.rank,
                position.to_dict(),
            )


def keep_item(item: Any) -> Any:
    """The DataLoader's collate function for single samples: the sample as it is."""
    return item


def gather_objects(obj: Any) -> list[Any]:
    """One object per rank, in rank order (just ``[obj]`` outside torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


# ---------------------------------------------------------------------------------------------
# evaluation splits


class ShardItems(ImageFiles):
    """A map-style split read whole from shards: the encoded samples in memory, decoded on
    access under the bad-file policy of :class:`~genlab.data.files.ImageFiles` (a bad item is
    replaced by the next readable one, flagged and counted). Samples without a caption (or
    label) are left out at reading, with a warning."""

    def __init__(self, raws: list[dict[str, Any]], names: list[str], decoder: Decoder, **kwargs):
        super().__init__(
            names,
            transform=decoder.transform,
            channels=decoder.channels,
            captions=[decoder.texts(r)[0] for r in raws] if decoder.captions else None,
            labels=[decoder.label(r)[0] for r in raws] if decoder.num_classes else None,
            random_caption=decoder.random_caption,
            **kwargs,
        )
        self.raws = raws
        self.decoder = decoder

    def load(self, j: int) -> Image.Image | None:
        if self.bad[j]:
            return None
        image, why = self.decoder.image(self.raws[j])
        if image is None:
            if self.bad_files == "strict":
                raise RuntimeError(f"cannot read image {self.paths[j]}: {why}")
            self.bad[j] = True
            log.warning(
                "skipping unreadable image %s (%s); %d bad files skipped so far",
                self.paths[j],
                why,
                int(self.bad.sum()),
            )
            return None
        return image


def read_split(
    urls: Sequence[str], decoder: Decoder, limit: int | None, what: str, bad_files: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """The first ``limit`` (or all) samples of ``urls`` that have what ``decoder`` needs besides
    the image, as raw samples (images still encoded), and their names ``url#key``."""
    raws, names = [], []
    bad = BadSamples(bad_files, max_consecutive=2**62)
    for url in urls:
        errors: list[str] = []
        for raw in raw_samples(url, errors):
            why = decoder.check(raw)
            if why:
                bad.record(f"{url}#{raw['__key__']}", why)
                continue
            raws.append({k: v for k, v in raw.items() if not k.startswith("__")})
            names.append(f"{url}#{raw['__key__']}")
            if limit is not None and len(raws) == limit:
                return raws, names
        for error in errors:
            bad.record(url, f"corrupt tar ({error})")
    if not raws:
        raise ValueError(f"the {what} shards ({urls[0]}, ...) hold no usable sample\n{LAYOUT}")
    return raws, names


# ---------------------------------------------------------------------------------------------
# the DataModule


class WebDataModule(GenDataModule):
    """Image-caption(-label) samples streamed from WebDataset shards (see the module doc)."""

    name = "webdataset"

    def __init__(
        self,
        *,
        data_dir: str = "data/",
        urls: Any = None,
        val_urls: Any = None,
        test_urls: Any = None,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        resolution: int = 64,
        seed: int = 0,
        channels: int = 3,
        captions: bool = True,
        num_classes: int | None = None,
        crop: Crop = "center",
        random_flip: bool = False,
        shuffle_buffer: int = 1000,
        epoch_length: int | None = None,
        val_size: int = 1000,
        test_size: int | None = None,
        max_train_captions: int = 100000,
        bad_files: BadFiles = "skip",
        max_consecutive_bad: int = 20,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            resolution=resolution,
            seed=seed,
        )
        self.save_hyperparameters(logger=False)
        check_choice("channels", channels, (1, 3))
        check_choice("crop", crop, CROPS)
        check_arg(shuffle_buffer >= 0, "shuffle_buffer", shuffle_buffer, "an int >= 0")
        check_arg(
            epoch_length is None or epoch_length >= 1,
            "epoch_length",
            epoch_length,
            "null (count the shards) or an int >= 1 (batches per rank per epoch)",
        )
        check_arg(
            num_classes is None or num_classes >= 1, "num_classes", num_classes, "null or >= 1"
        )
        check_arg(captions or num_classes is not None, "captions", captions, "true, or labels")
        check_arg(val_size >= 1, "val_size", val_size, "an int >= 1")
        check_arg(test_size is None or test_size >= 1, "test_size", test_size, "null or >= 1")
        check_arg(max_train_captions >= 1, "max_train_captions", max_train_captions, "an int >= 1")
        check_bad_file_args(bad_files, max_consecutive_bad)
        self.urls, self.val_urls, self.test_urls = urls, val_urls, test_urls
        self.channels = channels
        self.captions = captions
        self.num_classes = num_classes
        self.class_names = None if num_classes is None else [str(i) for i in range(num_classes)]
        self.crop = crop
        self.random_flip = random_flip
        self.shuffle_buffer = shuffle_buffer
        self.epoch_length = epoch_length
        self.sizes = {"val": val_size, "test": test_size}
        self.max_train_captions = max_train_captions
        self.bad_files = bad_files
        self.max_consecutive_bad = max_consecutive_bad
        self.shard_urls: list[str] | None = None
        self.shard_sizes: list[int] | None = None
        self.captions_read: list[str] | None = None
        self.stream_loader: StreamLoader | None = None

    def decoder(self, training: bool) -> Decoder:
        """The sample decoder of the train split (random crop, flip, caption) or of evaluation."""
        return Decoder(
            self.resolution,
            channels=self.channels,
            captions=self.captions,
            num_classes=self.num_classes,
            crop=self.crop if training else "center",
            flip=self.random_flip and training,
            random_caption=training,
        )

    def train_urls(self) -> list[str]:
        """The expanded training shard list (checked once)."""
        if self.shard_urls is None:
            self.shard_urls = expand_shards(self.urls, "urls", self.data_dir)
        return self.shard_urls

    def rank_info(self) -> tuple[int, int]:
        trainer = self.trainer
        return (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)

    def batches_per_epoch(self, world_size: int) -> int:
        """``epoch_length``, or the batches every rank can fill from its shards (counted)."""
        if self.epoch_length is not None:
            return self.epoch_length
        urls = self.train_urls()
        remote = [u for u in urls if not is_local(u)]
        if remote:
            raise ValueError(
                f"data.epoch_length=null counts the samples of local shards, but {remote[0]} is "
                "not a local file: set data.epoch_length (batches per rank per epoch)"
            )
        if self.shard_sizes is None:
            self.shard_sizes = [count_samples(u) for u in urls]
            empty = [u for u, n in zip(urls, self.shard_sizes, strict=True) if n == 0]
            if empty:
                raise ValueError(
                    f"{len(empty)} shards hold no sample (no image member): "
                    f"{', '.join(empty[:SHOWN_BAD_FILES])}\n{LAYOUT}"
                )
        per_rank = [sum(self.shard_sizes[r::world_size]) for r in range(world_size)]
        length = min(per_rank) // self.batch_size
        if length == 0:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the {min(per_rank)} training samples "
                f"of a rank (the {len(urls)} shards hold {sum(per_rank)} over {world_size} ranks)"
            )
        left = sum(per_rank) - length * self.batch_size * world_size
        log.info(
            "%s: %d training samples in %d shards, %d batches of %d per rank and epoch on %d ranks "
            "(%d samples per epoch left out by uneven shares)",
            self.name,
            sum(per_rank),
            len(urls),
            length,
            self.batch_size,
            world_size,
            left,
        )
        return length

    def setup(self, stage: str | None = None) -> None:
        """Check the shards, and read the evaluation splits that ``stage`` needs."""
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for split in splits.get(stage, ("train", "val", "test")):
            if split == "train":
                self.train_urls()
            elif getattr(self, f"data_{split}") is None:
                setattr(self, f"data_{split}", self.make_split(split))

    def make_split(self, split: str) -> ShardItems:
        """The val or test split, read whole from its shards (see the module doc)."""
        urls = self.val_urls if split == "val" else self.test_urls
        if urls is None and split == "test":
            if self.data_val is None:
                self.data_val = self.make_split("val")
            return self.data_val
        source = "urls" if urls is None else f"{split}_urls"
        shards = expand_shards(self.urls if urls is None else urls, source, self.data_dir)
        decoder = self.decoder(training=False)
        raws, names = read_split(shards, decoder, self.sizes[split], split, self.bad_files)
        if urls is None:
            log.warning(
                "%s: no data.val_urls, so the val split is the first %d training samples (seen in "
                "training too)",
                self.name,
                len(raws),
            )
        return ShardItems(
            raws,
            names,
            decoder,
            bad_files=self.bad_files,
            max_consecutive_bad=self.max_consecutive_bad,
        )

    def train_dataloader(self) -> StreamLoader:
        """The training stream of this rank (see the module doc)."""
        rank, world_size = self.rank_info()
        stream = ShardStream(
            self.train_urls(),
            rank=rank,
            world_size=world_size,
            decoder=self.decoder(training=True),
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            bad_files=self.bad_files,
            max_consecutive_bad=self.max_consecutive_bad,
        )
        if self.num_workers > len(stream.shards):
            log.warning(
                "%s: rank %d has %d training shards for num_workers=%d: %d workers stay idle "
                "(write smaller shards, or use fewer workers)",
                self.name,
                rank,
                len(stream.shards),
                self.num_workers,
                self.num_workers - len(stream.shards),
            )
        trainer = self.trainer
        self.stream_loader = StreamLoader(
            stream,
            batch_size=self.batch_size,
            epoch_length=self.batches_per_epoch(world_size),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            progress=None if trainer is None else lambda: training_progress(trainer),
            gather=gather_objects,
        )
        return self.stream_loader

    def train_captions(self) -> list[str]:
        """The captions of the training shards in url order, at most ``max_train_captions``
        (reading only their caption members: a local tar by seeking past the images, a remote
        one streamed)."""
        if not self.captions:
            return []
        if self.captions_read is None:
            captions: list[str] = []
            for url in self.train_urls():
                for data in caption_members(url):
                    text = data.decode("utf-8", errors="replace")
                    captions += [line.strip() for line in text.splitlines() if line.strip()]
                if len(captions) >= self.max_train_captions:
                    break
            self.captions_read = captions[: self.max_train_captions]
        return self.captions_read

    def sample_prompts(self, n: int) -> list[str] | None:
        """The first caption of the first ``n`` val samples (cycling); ``None`` without captions."""
        if not self.captions:
            return None
        if self.data_val is None:
            self.data_val = self.make_split("val")
        captions = self.data_val.captions
        return [captions[i % len(captions)][0] for i in range(n)]

    def describe(self) -> dict[str, Any]:
        """Which data this module yields; how the stream is read (buffer, epoch length, the
        tokenizer's caption budget) is left out, as the other loading arguments are."""
        description = super().describe()
        for key in STREAM_LOADING_ARGS:
            description.pop(key, None)
        return description

    def unflipped_train_split(self):
        raise NotImplementedError(
            "data=webdataset streams its train split: a cache of encoded training images (the "
            "LDM latent cache) needs a map-style dataset (data=image_folder or data=coco)"
        )

    def skipped_files(self) -> list[str]:
        """The bad samples skipped so far: of the evaluation splits, and those the training
        stream's workers reported (``url#key: why``)."""
        found = set(super().skipped_files())
        if self.stream_loader is not None:
            found.update(self.stream_loader.bad)
        return sorted(found)
