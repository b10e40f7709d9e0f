"""Peak memory of the cache builds against the split's size: is a build bounded by its chunk?

Each build runs in a fresh child process (``--child``), inside a real Lightning ``fit`` on the CPU
(one process, so rank 0 writes every chunk and the manifest), and reports the child's peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), its RSS just before and just after the build
(what the build keeps), and the size of the store it wrote:

* ``latent``: ``LatentCache.open`` (genlab.data.latent_cache) on N random 64 px images (a
  deterministic image per index) with random flips, through a tiny first stage at f = 2 with a
  VAE's posterior moments: a row is 2 orientations x 8 x 32 x 32 float16 = 32 KiB;
* ``text``: ``TextEmbeddingCache.open`` (genlab.data.text_cache) on N distinct synthetic
  captions through the frozen all-MiniLM-L6-v2 (L = 32, D = 384: 24.8 KiB a row in float16).

The builds before this change held every row in float32 on each rank (2x the store, plus the
gather), so their peak grew by more than twice the store's size (measured with this script on
the code before the change: 1098 MiB at 1000 items, 1812 MiB at 4000); here the peak should stay
within a few chunks (``--chunk-mb``) of the smallest build's. The text build's peak also moves
by ±25 MiB from run to run: the encoder's transient activations (its RSS after every batch is
flat).

    python bench/cache_memory.py [--kinds latent text] [--items 1000 2000 4000] [--chunk-mb 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from genlab.data.latent_cache import LatentCache
from genlab.data.text_cache import TextCacheOptions, TextEmbeddingCache
from genlab.nn.distributions import DiagonalGaussian

SIZE = 64


class RandomImages(Dataset):
    """N images in [-1, 1], each drawn from a generator seeded by its index (deterministic)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) * 2 - 1
        return {"image": image, "caption": caption(i), "index": i}


def caption(i: int) -> str:
    colors = ("red", "green", "blue", "yellow", "purple", "orange", "white")
    return f"{i % 9 + 1} {colors[i % 7]} shapes, picture number {i}"


class Data(L.LightningDataModule):
    def __init__(self, n: int):
        super().__init__()
        self.data_train, self.batch_size, self.num_workers = RandomImages(n), 64, 0
        self.random_flip = True

    def unflipped_train_split(self) -> Dataset:
        return self.data_train

    def train_captions(self) -> list[str]:
        return [caption(i) for i in range(len(self.data_train))]

    def describe(self) -> dict:
        return {"dataset": "random_images", "n": len(self.data_train), "resolution": SIZE}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data_train, batch_size=self.batch_size)


class TinyFirstStage(nn.Module):
    """A VAE-like encoder at f = 2: posterior moments (B, 8, h, w) of a 1x1 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.conv(F.avg_pool2d(images, 2)))


def rss_mb() -> float:
    """This process's resident memory now (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class BuildOnly(L.LightningModule):
    """Builds the cache at the start of fit (as the LDM and its text conditioner do), then one
    step on a dummy parameter."""

    def __init__(self, kind: str, folder: Path, chunk_mb: float):
        super().__init__()
        self.kind, self.folder, self.chunk_mb = kind, folder, chunk_mb
        self.weight = nn.Parameter(torch.zeros(()))
        self.figures: dict = {}
        if kind == "latent":
            self.first_stage = TinyFirstStage().requires_grad_(False)
        else:
            from genlab.nn.pretrained_text import MiniLMTextEncoder

            self.encoder = MiniLMTextEncoder(context_length=32)

    def on_fit_start(self) -> None:
        before, start = rss_mb(), time.perf_counter()
        if self.kind == "latent":
            cache = LatentCache.open(
                self.trainer,
                self.first_stage,
                cache_dir=self.folder,
                first_stage_version="bench",
                chunk_mb=self.chunk_mb,
            )
            store = cache.store
        else:
            options = TextCacheOptions(
                enabled=True, dir=str(self.folder), chunk_mb=self.chunk_mb, batch_size=128
            )
            store = TextEmbeddingCache.open(self.trainer, self.encoder, options).store
        self.figures = {
            "seconds": time.perf_counter() - start,
            "rss_before_mb": before,
            "rss_after_mb": rss_mb(),
            "store_mb": sum(f.stat().st_size for f in store.folder.glob("*.npy")) / 2**20,
            "chunks": len(store.manifest["chunks"]),
            "rows": len(store),
        }

    def training_step(self, batch, batch_idx):
        return self.weight * 0.0 + self.weight.square()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def child(kind: str, items: int, chunk_mb: float) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        module = BuildOnly(kind, Path(tmp), chunk_mb)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=1,
            limit_train_batches=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=Data(items))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps({"kind": kind, "items": items, "peak_mb": peak, **module.figures}))


def measure(kind: str, items: int, chunk_mb: float) -> dict:
    command = [sys.executable, __file__, "--child", kind, str(items), "--chunk-mb", str(chunk_mb)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENLAB_PROGRESS": "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["latent", "text"])
    parser.add_argument("--items", nargs="+", type=int, default=[1000, 2000, 4000])
    parser.add_argument("--chunk-mb", type=float, default=4.0)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ITEMS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.chunk_mb)
        return
    print(f"cache builds, one CPU process, chunks of at most {args.chunk_mb} MiB (peak RSS, MiB)")
    for kind in args.kinds:
        runs = [measure(kind, n, args.chunk_mb) for n in args.items]
        for r in runs:
            print(
                f"  {kind:6s} {r['items']:6d} items: store {r['store_mb']:7.1f} MiB in "
                f"{r['chunks']:3d} chunks; RSS before {r['rss_before_mb']:6.1f}, after "
                f"{r['rss_after_mb']:6.1f}, peak {r['peak_mb']:6.1f} "
                f"({r['peak_mb'] - runs[0]['peak_mb']:+5.1f} vs {runs[0]['items']} items); "
                f"{r['seconds']:5.1f} s"
            )


if __name__ == "__main__":
    main()
