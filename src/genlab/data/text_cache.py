"""The text-embedding cache of frozen text encoders: every distinct training caption encoded once.

With ``model.text_cache.enabled=true`` and a frozen pretrained text encoder
(:mod:`genlab.nn.pretrained_text`: minilm, t5, clip), the text conditioner opens this cache at the
start of fit: the distinct captions of the train split (``datamodule.train_captions()``) and the
null caption ``""``, sorted, are encoded into the store ``<dir>/<key>/``
(:mod:`genlab.data.chunked_store`: chunk files of at most ``chunk_mb`` MiB written atomically by
every rank, each its chunks, one chunk in memory at a time; ``captions.json``, then a manifest
written last by rank 0), and training looks each caption's ``tokens`` (L, D), ``mask`` (L,) and
``pooled`` (D,) up in the memory-mapped chunks instead of running the encoder. A caption that is
not in the cache (validation prompts, sample grids, a stream's captions past
``max_train_captions``) is encoded as before: the result is the same either way, up to the
stored dtype (``float32``: bit for bit; ``float16``: half the disk, features rounded to 11 bits).

The key hashes what the features depend on: the encoder's class, its ``describe()`` line and
weights SHA-256 (over its tensors), the dtype its weights run in, its context length, width and
pooling, its tokenizer (its full serialization: vocabulary, merges, normalization, plus padding
side and truncation), the SHA-256 of the sorted caption list, and the stored dtype. Another
encoder, tokenizer setting or dataset builds a new store beside the old one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from genlab.data.chunked_store import (
    DEFAULT_CHUNK_MB,
    ChunkedStore,
    ChunkWriter,
    build_store,
    is_complete,
)
from genlab.nn.pretrained_text import TextEncoding
from genlab.utils import progress
from genlab.utils.io import atomic_write_text, description_key
from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

CACHE_FORMAT = 1  # what a text cache holds; part of its key
CAPTIONS = "captions.json"
DTYPES = ("float16", "float32")


class TextCacheOptions:
    """``model.text_cache``: ``enabled``, ``dir``, ``dtype`` (float16 | float32), ``chunk_mb``
    (MiB per chunk file) and ``batch_size`` (captions per encoder call in the build)."""

    def __init__(
        self,
        enabled: bool = False,
        dir: str | None = None,
        dtype: str = "float16",
        chunk_mb: float = DEFAULT_CHUNK_MB,
        batch_size: int = 256,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"model.text_cache.dtype={dtype!r} is not one of {list(DTYPES)}")
        if enabled and not dir:
            raise ValueError("model.text_cache.enabled=true needs model.text_cache.dir")
        if batch_size < 1:
            raise ValueError(f"model.text_cache.batch_size={batch_size} must be >= 1")
        self.enabled, self.dir, self.dtype = bool(enabled), dir, dtype
        self.chunk_mb, self.batch_size = float(chunk_mb), int(batch_size)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_fingerprint(encoder: nn.Module) -> dict[str, Any]:
    """The tokenizer settings and the hash of its full serialization."""
    tokenizer = getattr(encoder, "tokenizer", None)
    if hasattr(tokenizer, "to_json"):  # genlab's BPE (CLIPTextTower)
        serial = str(tokenizer.to_json())
    elif hasattr(tokenizer, "backend_tokenizer"):  # a Hugging Face fast tokenizer
        serial = tokenizer.backend_tokenizer.to_str()
    else:
        serial = repr(tokenizer)
    return {
        "class": type(tokenizer).__name__,
        "sha256": sha256_text(serial),
        "padding_side": getattr(tokenizer, "padding_side", None),
        "padding": "max_length",
        "truncation": True,
        "context_length": getattr(encoder, "context_length", None),
    }


def encoder_description(encoder: nn.Module) -> dict[str, Any]:
    """What the cached features depend on, of the encoder."""
    weights = next(encoder.network.parameters())
    return {
        "class": type(encoder).__name__,
        "describe": encoder.describe(),
        "weights_sha256": encoder.weights_sha256(),
        "weights_dtype": str(weights.dtype),
        "context_length": encoder.context_length,
        "width": encoder.width,
        "pooling": getattr(encoder, "pooling", "mean"),
        "tokenizer": tokenizer_fingerprint(encoder),
    }


def distinct_captions(captions: Sequence[str]) -> list[str]:
    """The sorted distinct captions, with the null caption ``""``."""
    return sorted({*captions, ""})


class TextEmbeddingCache:
    """Token features, masks and pooled vectors of a sorted caption list, memory-mapped; other
    captions go through the encoder. ``hits`` and ``misses`` count captions looked up."""

    def __init__(self, store: ChunkedStore, captions: list[str], encoder: nn.Module):
        if len(captions) != len(store):
            raise ValueError(f"text cache {store.folder}: {CAPTIONS} does not match its rows")
        self.store, self.encoder = store, encoder
        self.row = {caption: i for i, caption in enumerate(captions)}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.store)

    def encode(self, captions: Sequence[str], device: torch.device | str) -> TextEncoding:
        """The encoder's :class:`TextEncoding` of ``captions`` (float32, on ``device``), from the
        cache where it holds the caption."""
        rows = [self.row.get(c) for c in captions]
        hit = [i for i, r in enumerate(rows) if r is not None]
        miss = [i for i, r in enumerate(rows) if r is None]
        self.hits, self.misses = self.hits + len(hit), self.misses + len(miss)
        length, width = self.encoder.context_length, self.encoder.width
        tokens = torch.empty(len(rows), length, width, device=device)
        mask = torch.empty(len(rows), length, dtype=torch.bool, device=device)
        pooled = torch.empty(len(rows), width, device=device)
        if hit:
            index = [rows[i] for i in hit]
            tokens[hit] = self.store.read("tokens", index).to(device).float()
            mask[hit] = self.store.read("mask", index).to(device)
            pooled[hit] = self.store.read("pooled", index).to(device).float()
        if miss:
            encoded = self.encoder.encode([captions[i] for i in miss])
            tokens[miss] = encoded.tokens.to(device)
            mask[miss] = encoded.mask.to(device)
            pooled[miss] = encoded.pooled.to(device)
        return TextEncoding(tokens, mask, pooled)

    @classmethod
    def open(
        cls, trainer: Any, encoder: nn.Module, options: TextCacheOptions
    ) -> TextEmbeddingCache:
        """The cache of this trainer's training captions, built first (by all ranks together)
        when it is not complete."""
        datamodule = trainer.datamodule
        found = datamodule.train_captions() if hasattr(datamodule, "train_captions") else []
        if not found:
            raise ValueError(
                "model.text_cache.enabled=true needs the training captions "
                f"(datamodule.train_captions()), but {type(datamodule).__name__} gives none"
            )
        captions = distinct_captions(found)
        description = {
            "format": CACHE_FORMAT,
            "encoder": encoder_description(encoder),
            "captions_sha256": sha256_text(json.dumps(captions)),
            "num_captions": len(captions),
            "dtype": options.dtype,
        }
        key = trainer.strategy.broadcast(description_key(description), src=0)
        if key != description_key(description):
            raise ValueError(
                f"rank {trainer.global_rank}'s training captions or text encoder differ from "
                "rank 0's: the text cache needs the same on every rank"
            )
        folder = Path(options.dir, key)
        if trainer.strategy.broadcast(is_complete(folder), src=0):
            log.info(f"text cache: reusing {folder} ({len(captions)} captions)")
        else:
            build(trainer, encoder, folder, captions, description, options)
        if not is_complete(folder):
            raise FileNotFoundError(
                f"rank {trainer.global_rank} cannot see the text cache {folder} that rank 0 "
                "completed: model.text_cache.dir must be on a file system that every node shares"
            )
        stored = json.loads((folder / CAPTIONS).read_text())
        return cls(ChunkedStore(folder), stored, encoder)


def build(
    trainer: Any,
    encoder: nn.Module,
    folder: Path,
    captions: list[str],
    description: dict[str, Any],
    options: TextCacheOptions,
) -> None:
    """Encode ``captions`` into the store ``folder``, each rank its chunks."""
    start = time.perf_counter()
    length, width, dtype = encoder.context_length, encoder.width, options.dtype
    fields = {
        "tokens": ((length, width), dtype),
        "mask": ((length,), "bool"),
        "pooled": ((width,), dtype),
    }
    if trainer.global_rank == 0:  # before the manifest, which build_store writes last
        atomic_write_text(Path(folder, CAPTIONS), json.dumps(captions))

    def compute(rows: list[int], writer: ChunkWriter) -> None:
        with progress.bar("text cache", total=len(rows)) as bar:
            for i in range(0, len(rows), options.batch_size):
                batch = [captions[r] for r in rows[i : i + options.batch_size]]
                encoded = encoder.encode(batch)
                tokens = encoded.tokens.cpu().numpy().astype(dtype)
                pooled = encoded.pooled.cpu().numpy().astype(dtype)
                if not (np.isfinite(tokens).all() and np.isfinite(pooled).all()):
                    raise ValueError(
                        f"the text encoder's features overflow {dtype}: set "
                        "model.text_cache.dtype=float32"
                    )
                writer.add({"tokens": tokens, "mask": encoded.mask, "pooled": pooled})
                bar.advance(len(batch))

    build_store(
        folder,
        fields,
        len(captions),
        options.chunk_mb,
        description,
        compute,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        barrier=trainer.strategy.barrier,
    )
    log.info(
        f"text cache: built {folder} in {time.perf_counter() - start:.1f} s ({len(captions)} "
        f"distinct captions, {dtype})"
    )
