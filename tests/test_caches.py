"""Caches at scale: the chunked store (chunks written atomically, a manifest last, resumed builds,
memory-mapped reads), the text-embedding cache of a frozen text encoder (the same losses as
encoding every batch, reused without an encoder call), and the latent cache's build bounded in
memory (peak RSS of a build in a subprocess does not grow with the split)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from conftest import (
    ROOT,
    TINY_DATA,
    TINY_TRAINER,
    TINY_UNET,
    check_ok,
    compose_model,
    quiet_trainer,
    run_entry,
    shapes_data,
)
from genlab.data import chunked_store
from genlab.data.chunked_store import ChunkedStore, build_store, chunk_ranges, is_complete
from genlab.data.text_cache import TextCacheOptions
from genlab.models.diffusion.conditioners import TextConditioner
from genlab.utils.instantiate import instantiate

FIELDS = {"x": ((3,), "float32"), "m": ((2,), "bool")}  # 14 bytes a row


def rows(index: list[int]) -> dict[str, np.ndarray]:
    i = np.asarray(index, np.float32)[:, None]
    return {"x": i * np.array([1, 2, 3], np.float32), "m": np.repeat(i % 2 == 0, 2, axis=1)}


def feed(calls: list[list[int]]):
    def compute(index: list[int], writer) -> None:
        calls.append(index)
        for start in range(0, len(index), 3):  # batches of 3 that straddle the chunks
            writer.add(rows(index[start : start + 3]))

    return compute


def test_store_is_written_in_chunks_by_every_rank_and_read_in_item_order(tmp_path) -> None:
    folder, chunk_mb = tmp_path / "store", 70 / 2**20  # 5 rows of 14 bytes per chunk
    assert chunk_ranges(23, 5) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    calls: list[list[int]] = []
    for rank in (1, 0):  # rank 1 first: rank 0 writes the manifest once all chunks exist
        build_store(
            folder, FIELDS, 23, chunk_mb, {"what": "test"}, feed(calls), rank=rank, world_size=2
        )
    assert calls == [
        [*range(5, 10), *range(15, 20)],
        [*range(0, 5), *range(10, 15), *range(20, 23)],
    ]
    assert len(list(folder.glob("x-*.npy"))) == 5 and not list(folder.glob(".*tmp*"))
    store = ChunkedStore(folder)
    assert store.shape("x") == (23, 3) and store.description == {"what": "test"}
    index = [22, 0, 7, 7, 13]
    assert torch.equal(store.read("x", index), torch.from_numpy(rows(index)["x"]))
    assert torch.equal(store.read("m", torch.tensor(index)), torch.from_numpy(rows(index)["m"]))
    assert torch.equal(store.all("x"), torch.from_numpy(rows(list(range(23)))["x"]))
    with pytest.raises(IndexError):
        store.read("x", [23])


def test_a_stopped_build_is_never_read_and_resumes_from_its_chunks(tmp_path, monkeypatch) -> None:
    folder, chunk_mb = tmp_path / "store", 70 / 2**20
    written = []
    save = np.save

    def dying_save(f, array):  # the third chunk's write fails: as if the job were killed
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(len(array))
        save(f, array)

    monkeypatch.setattr(chunked_store.np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        build_store(folder, {"x": FIELDS["x"]}, 23, chunk_mb, {}, feed([]))
    monkeypatch.undo()
    assert not is_complete(folder) and len(list(folder.glob("x-*.npy"))) == 2
    assert not list(folder.glob(".*tmp*"))  # the interrupted write left no partial file
    with pytest.raises(FileNotFoundError, match="not complete"):
        ChunkedStore(folder)
    calls: list[list[int]] = []
    writer = build_store(folder, {"x": FIELDS["x"]}, 23, chunk_mb, {}, feed(calls))
    assert writer.skipped == 2 and calls == [list(range(10, 23))]  # the 2 chunks kept
    assert torch.equal(ChunkedStore(folder).all("x"), torch.from_numpy(rows(list(range(23)))["x"]))
    with pytest.raises(FileNotFoundError, match="chunks are missing"):  # a rank that did not write
        build_store(
            tmp_path / "other", {"x": FIELDS["x"]}, 23, chunk_mb, {}, feed([]), world_size=2
        )


# ----------------------------------------------------------------------------------------------
# the text-embedding cache (model.text_cache)


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.values.append(outputs["loss"].detach().clone())


def count_encoder_calls(model) -> list[int]:
    """The captions of every call of the frozen encoder's network (wraps its ``run``)."""
    encoder, calls = model.conditioner(TextConditioner).encoder, []
    run = encoder.run

    def counted(captions):
        calls.append(len(captions))
        return run(captions)

    encoder.run = counted
    return calls


def fit_minilm(tmp_path: Path, *overrides: str) -> tuple[torch.Tensor, list[int], object]:
    """3 steps of a tiny text-conditional DDPM on the frozen MiniLM, seeded: the losses, the
    captions per encoder call during fit, the model."""
    config = compose_model(
        ["model=ddpm", "model/text_encoder=minilm", *TINY_DATA, *TINY_UNET, *overrides]
    )
    L.seed_everything(0)
    model = instantiate(config)
    calls, losses = count_encoder_calls(model), Losses()
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[losses])
    trainer.fit(model, datamodule=shapes_data(16))
    return torch.stack(losses.values), calls, model


def test_text_cache_gives_the_encoders_losses_and_is_reused(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="genlab.data.text_cache")
    cache_dir = tmp_path / "text"
    on = ["model.text_cache.enabled=true", f"model.text_cache.dir={cache_dir}"]
    plain, calls, _ = fit_minilm(tmp_path)
    assert len(calls) == 3  # one encoder call per step

    built, calls, model = fit_minilm(tmp_path, *on, "model.text_cache.dtype=float32")
    (manifest,) = cache_dir.glob("*/manifest.json")
    captions = json.loads((manifest.parent / "captions.json").read_text())
    assert "text cache: built" in caplog.text
    assert captions == sorted({*shapes_data(16).train_captions(), ""})
    assert calls == [len(captions)]  # the build's one batch, then no call in training
    torch.testing.assert_close(built, plain, rtol=1e-5, atol=1e-6)  # batch size changes ~1 ulp
    cache = model.conditioner(TextConditioner).cache
    assert cache.misses == 0 and cache.hits == 3 * 8
    encoder = model.conditioner(TextConditioner).encoder
    direct, looked_up = encoder.encode(captions[:5]), cache.encode(captions[:5], "cpu")
    for a, b in zip(direct, looked_up, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    mixed = cache.encode(["a caption it never saw", captions[3]], "cpu")  # a miss: encoded
    torch.testing.assert_close(
        mixed.tokens[0], encoder.encode(["a caption it never saw"]).tokens[0]
    )
    assert cache.misses == 1

    caplog.clear()
    again, calls, model = fit_minilm(tmp_path, *on, "model.text_cache.dtype=float32")
    assert calls == [] and f"text cache: reusing {manifest.parent}" in caplog.text
    assert torch.equal(again, built)  # the same stored features, bit for bit
    assert len(list(cache_dir.glob("*/manifest.json"))) == 1

    half, calls, _ = fit_minilm(tmp_path, *on)  # the default float16: another store
    assert len(list(cache_dir.glob("*/manifest.json"))) == 2 and calls == [len(captions)]
    torch.testing.assert_close(half, plain, rtol=1e-2, atol=1e-3)


@pytest.mark.slow  # two gloo processes, each loading MiniLM: about 60 s
def test_text_cache_is_built_by_two_ddp_ranks(tmp_path) -> None:
    """Two ranks write their chunks (8 captions each: 0.2 MiB of 25376-byte rows), rank 0 the
    manifest; the store holds the encoder's features of every caption, in caption order."""
    cache_dir = tmp_path / "text"
    result = run_entry(
        "train.py",
        "model=ddpm",
        "model/text_encoder=minilm",
        *TINY_DATA,
        "data.train_size=32",
        *TINY_UNET,
        "model.text_cache.enabled=true",
        f"model.text_cache.dir={cache_dir}",
        "model.text_cache.chunk_mb=0.2",
        "model.text_cache.batch_size=4",
        "trainer=ddp_cpu",
        *TINY_TRAINER,
        "trainer.max_steps=2",
        "test=false",
        "callbacks.sample_grid=null",
        "callbacks.generative_metrics=null",
        f"hydra.run.dir={tmp_path / 'run'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    (manifest,) = cache_dir.glob("*/manifest.json")
    store = ChunkedStore(manifest.parent)
    captions = json.loads((manifest.parent / "captions.json").read_text())
    assert store.chunk_rows == 8 and len(store.manifest["chunks"]) == -(-len(captions) // 8) > 2
    from genlab.nn.pretrained_text import MiniLMTextEncoder

    expected = MiniLMTextEncoder(context_length=32).encode(captions)
    torch.testing.assert_close(store.all("tokens").float(), expected.tokens, rtol=0, atol=2e-3)
    assert torch.equal(store.all("mask"), expected.mask)


def test_text_cache_needs_a_frozen_encoder() -> None:
    with pytest.raises(ValueError, match="trained with the model"):
        instantiate(
            compose_model(["model=ddpm", *TINY_DATA, *TINY_UNET, "model.text_cache.enabled=true"])
        )
    with pytest.raises(ValueError, match="model.text_cache.dtype='bfloat16'"):
        TextCacheOptions(dtype="bfloat16")
    with pytest.raises(ValueError, match="model.text_cache.dir"):
        TextCacheOptions(enabled=True, dir=None)


# ----------------------------------------------------------------------------------------------
# bounded memory


def peak_rss_mb(items: int) -> dict[str, float]:
    """Run bench/cache_memory.py's latent-cache build of ``items`` items in a child process."""
    bench = str(ROOT / "bench" / "cache_memory.py")
    result = subprocess.run(
        [sys.executable, bench, "--child", "latent", str(items), "--chunk-mb", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "GENLAB_PROGRESS": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two subprocess builds: about 35 s
def test_latent_cache_build_memory_does_not_grow_with_the_split() -> None:
    """Peak RSS of a build of N and 4N items (32 KiB rows, 4 MiB chunks): the store grows by
    3 x 32 MB, the peak by at most a few MB (the old build held every row in float32: +192 MB)."""
    small, large = peak_rss_mb(1000), peak_rss_mb(4000)
    assert large["store_mb"] > 120 and large["chunks"] > 1
    assert large["peak_mb"] - small["peak_mb"] < 16, (small, large)
