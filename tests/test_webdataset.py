"""data=webdataset: streaming WebDataset shards over DDP ranks and loader workers (each sample once
per epoch), the bad-sample policy, exact resume, the map-style evaluation splits, the shard
converter (src/make_shards.py) and train.py end to end (single process and 2-process DDP)."""

from __future__ import annotations

import collections
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from conftest import ROOT, TINY_BPE, TINY_UNET, check_ok, quiet_trainer, run_entry
from genlab.data.checks import check_batch
from genlab.data.image_folder import ImageFolderDataModule
from genlab.data.shapes import ShapesDataset
from genlab.data.webdataset import SHARD_STRIDE, Decoder, StreamLoader, WebDataModule

RES = 8


def load_make_shards():
    """src/make_shards.py as a module (it is an entry point, not part of the package)."""
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "src" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png(value: int, size: int = RES) -> bytes:
    """A ``size`` px PNG of one grey level (so an image tells which sample it is)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value % 256, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, sizes: list[int], *, bad: dict | None = None) -> str:
    """Shards ``train-00000{k}.tar`` of ``sizes[k]`` samples ``<n>.png`` + ``<n>.txt`` ("sample
    <n>", n counting over all shards) + ``<n>.cls`` (n mod 3); ``bad`` maps a global sample
    number to ``"image"`` (garbled PNG) or ``"caption"`` (no caption). Returns the pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    bad = bad or {}
    n = 0
    for k, size in enumerate(sizes):
        with tarfile.open(folder / f"train-{k:06d}.tar", "w") as tar:
            for _ in range(size):
                add(tar, f"{n:06d}.png", b"not a png" if bad.get(n) == "image" else png(n))
                if bad.get(n) != "caption":
                    add(tar, f"{n:06d}.txt", f"sample {n}".encode())
                add(tar, f"{n:06d}.cls", str(n % 3).encode())
                n += 1
    return str(folder / f"train-{{000000..{len(sizes) - 1:06d}}}.tar")


def module(urls: str, *, rank: int = 0, world_size: int = 1, **kwargs) -> WebDataModule:
    """A WebDataModule acting as DDP rank ``rank`` of ``world_size`` (as a trainer would say)."""
    args = dict(urls=urls, batch_size=4, resolution=RES, shuffle_buffer=4, val_size=4)
    dm = WebDataModule(**{**args, **kwargs})
    dm.rank_info = lambda: (rank, world_size)
    return dm


def epoch_batches(loader: StreamLoader) -> list[dict]:
    return list(loader)


def sample_numbers(batches: list[dict]) -> list[int]:
    """The sample number n of every item (from its caption), in order."""
    return [int(c.split()[1]) for b in batches for c in b["caption"]]


def test_two_ranks_two_workers_read_each_sample_once_per_epoch(tmp_path):
    urls = write_shards(tmp_path / "shards", [6] * 8)  # 48 samples, 8 shards
    orders = []
    for epoch in range(2):
        seen = collections.Counter()
        for rank in range(2):
            dm = module(urls, rank=rank, world_size=2, num_workers=2)
            dm.setup("fit")
            loader = dm.train_dataloader()
            loader.epochs_started = epoch  # no trainer: the loader counts its epochs
            assert len(loader) == 6  # 24 samples per rank in batches of 4
            batches = epoch_batches(loader)
            assert len(batches) == 6
            for batch in batches:
                check_batch(batch, channels=3, resolution=RES, captions=True, labels=False)
            numbers = sample_numbers(batches)
            seen.update(numbers)
            # index = shard * 1e6 + position in the shard; each shard holds 6 consecutive samples
            index = torch.cat([b["index"] for b in batches]).tolist()
            assert [(i // SHARD_STRIDE) * 6 + i % SHARD_STRIDE for i in index] == numbers
            # each image is its sample's grey level
            levels = torch.cat([b["image"][:, 0, 0, 0] for b in batches])
            assert torch.allclose((levels + 1) * 127.5, torch.tensor(numbers).float(), atol=0.01)
            orders.append(numbers)
        assert sorted(seen) == list(range(48)) and set(seen.values()) == {1}, epoch
    assert orders[0] != orders[2] and sorted(orders[0]) == sorted(orders[2])  # reshuffled


def test_uneven_shards_give_every_rank_the_same_number_of_batches(tmp_path):
    urls = write_shards(tmp_path / "shards", [5, 9, 3])  # rank 0: 5 + 3, rank 1: 9 samples
    lengths, seen = [], collections.Counter()
    for rank in range(2):
        dm = module(urls, rank=rank, world_size=2, num_workers=0)
        dm.setup("fit")
        batches = epoch_batches(dm.train_dataloader())
        lengths.append(len(batches))
        seen.update(sample_numbers(batches))
    assert lengths == [2, 2]  # min(8, 9) // 4
    assert len(seen) == 16 and set(seen.values()) == {1}  # the last sample of each rank left out
    with pytest.raises(ValueError, match="3 training shards cannot be shared by 4 DDP ranks"):
        module(urls, rank=0, world_size=4).train_dataloader()


def test_bad_samples_are_skipped_counted_and_named(tmp_path, caplog):
    urls = write_shards(tmp_path / "shards", [8, 8], bad={3: "image", 10: "caption"})
    dm = module(urls, num_workers=2, val_size=16)
    dm.setup("fit")
    batches = epoch_batches(dm.train_dataloader())
    assert len(batches) == 4  # 16 samples counted; 14 good ones + a new round fills the epoch
    numbers = sample_numbers(batches)
    assert 3 not in numbers and 10 not in numbers and len(set(numbers)) == 14
    skipped = dm.skipped_files()
    assert len(skipped) == 2 and any("000003: undecodable .png" in s for s in skipped)
    assert any("000010: no caption member" in s for s in skipped)
    assert "ran out after 3 of epoch_length=4 batches" in caplog.text
    # the val split (map-style, from the same shards) leaves the uncaptioned sample out and
    # replaces the unreadable image by the next one, as ImageFiles does
    assert len(dm.data_val) == 15
    assert dm.data_val[3]["caption"] == "sample 4"
    dm.teardown("fit")
    strict = module(urls, num_workers=0, bad_files="strict")
    with pytest.raises(RuntimeError, match="bad sample .*(undecodable|no caption).*strict"):
        epoch_batches(strict.train_dataloader())


def test_too_many_bad_samples_in_a_row_stop_the_stream(tmp_path):
    urls = write_shards(tmp_path / "shards", [8], bad={n: "image" for n in range(1, 5)})
    dm = module(urls, max_consecutive_bad=3, shuffle_buffer=0)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="3 bad samples in a row"):
        epoch_batches(dm.train_dataloader())


def test_a_truncated_shard_keeps_its_readable_samples(tmp_path):
    urls = write_shards(tmp_path / "shards", [8, 8])
    shard = tmp_path / "shards" / "train-000001.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[12].offset_data + 10  # inside the image of its 5th sample
    shard.write_bytes(shard.read_bytes()[:cut])
    dm = module(urls, epoch_length=4)  # 16 samples: more than the shards still hold
    dm.setup("fit")
    numbers = sample_numbers(epoch_batches(dm.train_dataloader()))
    kept = set(numbers) - set(range(8))  # what shard 1 gave before the damage
    assert len(numbers) == 16 and set(range(8)) <= set(numbers) and 0 < len(kept) < 8
    assert kept == set(range(8, 12))
    assert any("corrupt tar" in s for s in dm.skipped_files())


class Recorder(LightningModule):
    """Trains a single weight and records the sample numbers of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append([int(c.split()[1]) for c in batch["caption"]])
        return (batch["image"].mean() * self.weight) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(urls: str, tmp_path: Path, max_steps: int, ckpt_path: str | None = None, **kwargs):
    dm = WebDataModule(urls=urls, batch_size=3, resolution=RES, shuffle_buffer=5, num_workers=2)
    model = Recorder()
    trainer = quiet_trainer(tmp_path, max_steps=max_steps, limit_val_batches=0, **kwargs)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, model


@pytest.mark.parametrize("stop", [5, 7])
def test_resume_mid_epoch_continues_the_stream_exactly(tmp_path, stop):
    """A run stopped after 5 steps (mid-epoch: 7 batches of 3 per epoch) or 7 (the epoch's last
    batch) and resumed trains on exactly the batches of an uninterrupted run, into the next
    epoch."""
    urls = write_shards(tmp_path / "shards", [7, 7, 7])
    _, whole = fit(urls, tmp_path / "whole", max_steps=10)
    saver = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=stop, save_top_k=-1)
    _, first = fit(
        urls, tmp_path / "first", max_steps=stop, callbacks=[saver], enable_checkpointing=True
    )
    ckpt = tmp_path / "ckpt" / f"epoch=0-step={stop}.ckpt"  # saved after the step
    (state,) = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"][
        "combined_loader"
    ]
    assert state["epoch"] == 0 and state["batches"] == stop and len(state["ranks"]) == 1
    _, resumed = fit(urls, tmp_path / "resumed", max_steps=10, ckpt_path=str(ckpt))
    assert first.seen + resumed.seen == whole.seen
    assert len(set(sum(whole.seen[:7], []))) == 21  # epoch 0: every sample once


def test_resume_skips_without_decoding_what_was_delivered(tmp_path):
    """The documented cost of a resume: samples already delivered are replayed from the tar
    (their shard's shuffle) but not decoded again; finished shards are not opened."""
    urls = write_shards(tmp_path / "shards", [10, 10, 10])
    decoded = []

    class CountingDecoder(Decoder):
        def __call__(self, raw):
            decoded.append(int(raw["__key__"]))
            return super().__call__(raw)

    def loader(state=None):
        dm = module(urls, shuffle_buffer=6)
        dm.setup("fit")
        dm.decoder = lambda training: CountingDecoder(RES, random_caption=training)
        stream_loader = dm.train_dataloader()
        stream_loader.progress = lambda: progress
        if state is not None:
            stream_loader.load_state_dict(state)
        return stream_loader

    progress = (0, 0)
    whole = epoch_batches(loader())
    assert sorted(decoded) == list(range(30))  # workers decode chunks of 16 ahead
    stopped = loader()
    iterator = iter(stopped)
    for _ in range(4):
        next(iterator)
    progress = (0, 4)
    state = stopped.state_dict()
    assert state["ranks"] == [{"round": 0, "at": {"0": [1, 5]}, "next_worker": 0, "taken": 0}]
    decoded.clear()
    resumed = list(loader(state))
    before = set(sample_numbers(whole[:4]))
    assert len(resumed) == 3 and sorted(decoded) == sorted(set(range(30)) - before)
    for a, b in zip(whole[4:], resumed, strict=True):
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    changed = loader()
    changed.load_state_dict({**state, "batch_size": 5})
    assert len(list(changed)) == 3  # the rest of the epoch, from the start of the stream


def test_validation_and_test_splits_are_map_style_from_their_shards(tmp_path):
    urls = write_shards(tmp_path / "train", [4, 4])
    val = write_shards(tmp_path / "val", [3, 3])
    dm = module(urls, val_urls=val, test_urls=val, test_size=None, num_classes=3)
    dm.setup("fit")
    assert len(dm.data_val) == 4  # val_size
    item = dm.data_val[2]
    assert item["caption"] == "sample 2" and item["label"] == 2 and item["index"] == 2
    assert dm.sample_prompts(5) == ["sample 0", "sample 1", "sample 2", "sample 3", "sample 0"]
    dm.setup("test")
    assert len(dm.data_test) == 6
    batch = next(iter(dm.test_dataloader()))
    check_batch(batch, channels=3, resolution=RES, captions=True, labels=True)
    assert dm.train_captions() == [f"sample {n}" for n in range(8)]
    description = dm.describe()
    assert json.loads(json.dumps(description)) == description
    assert description["dataset"] == "webdataset" and description["urls"] == urls


@pytest.mark.parametrize(
    ("urls", "error", "message"),
    [
        (None, ValueError, "data.urls is empty"),
        ("", ValueError, "data.urls is empty"),
        ("absent/train-{000000..000003}.tar", FileNotFoundError, "4 of 4 shards do not exist"),
    ],
)
def test_missing_shards_fail_at_setup_with_a_clear_error(tmp_path, urls, error, message):
    dm = module(urls, data_dir=str(tmp_path))
    with pytest.raises(error, match=message) as caught:
        dm.setup("fit")
    assert "Expected layout" in str(caught.value) or "brace pattern" in str(caught.value)
    if urls and "absent" in urls:
        assert str(tmp_path / "absent" / "train-000000.tar") in str(caught.value)


def test_pipe_urls_stream_through_webdataset_openers(tmp_path):
    write_shards(tmp_path / "shards", [6, 6])
    urls = f"pipe:cat {tmp_path}/shards/train-{{000000..000001}}.tar"
    with pytest.raises(ValueError, match="set data.epoch_length"):
        module(urls).train_dataloader()
    dm = module(urls, epoch_length=3)
    dm.setup("fit")
    assert sorted(sample_numbers(epoch_batches(dm.train_dataloader()))) == list(range(12))
    assert dm.train_captions() == [f"sample {n}" for n in range(12)]


def test_an_empty_shard_is_named(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"\0" * 1024)  # a tar with no member
    dm = module(str(tmp_path / "empty.tar"))
    with pytest.raises(ValueError, match=r"1 shards hold no sample.*empty\.tar"):
        dm.train_dataloader()


def test_converter_round_trips_an_image_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    rng = np.random.default_rng(0)
    for n in range(10):
        pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        path = folder / ("a" if n < 5 else "b") / f"im{n}.png"
        Image.fromarray(pixels).save(path)
        path.with_suffix(".txt").write_text(f"picture {n}\nanother caption of {n}\n")
    make_shards = load_make_shards()
    pattern = str(tmp_path / "out" / "train-%06d.tar")
    args = ["--source", "image_folder", "--input", str(folder), "--output", pattern]
    make_shards.main([*args, "--maxcount", "4", "--class-folders", "--val-fraction", "0.2"])
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["train-000000.tar", "train-000001.tar"]  # 8 train images, no temp file
    reference = ImageFolderDataModule(
        data_dir=str(tmp_path), root="images", resolution=RES, class_folders=True,
        val_fraction=0.2,
    )  # fmt: skip
    train = reference.split_parts()["train"]
    folder_index = reference.scan()
    dm = module(str(tmp_path / "out" / "train-{000000..000001}.tar"), num_classes=2, val_size=8)
    dm.setup("validate")
    got = {dm.data_val[i]["caption"]: dm.data_val[i] for i in range(8)}
    assert set(got) == {folder_index.captions[i][0] for i in train}
    for i in train:
        caption = folder_index.captions[i][0]
        image = Image.open(folder_index.paths[i]).convert("RGB")
        want = Decoder(RES).transform(image)
        assert torch.equal(got[caption]["image"], want)
        assert got[caption]["label"] == folder_index.labels[i]


def test_converter_round_trips_coco(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images, annotations = [], []
    for n in range(3):
        name = f"{n + 1:012d}.jpg"
        Image.fromarray(np.full((10, 12, 3), 40 * n, dtype=np.uint8)).save(root / "val2017" / name)
        images.append({"id": n + 1, "file_name": name})
        annotations += [
            {"id": 10 * n + k, "image_id": n + 1, "caption": f"photo {n} take {k}"} for k in (2, 1)
        ]
    (root / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations})
    )
    make_shards = load_make_shards()
    pattern = str(tmp_path / "out" / "val-%03d.tar")
    args = ["--source", "coco", "--input", str(root), "--split", "val", "--output", pattern]
    make_shards.main([*args, "--no-shuffle"])
    with tarfile.open(tmp_path / "out" / "val-000.tar") as tar:
        assert tar.getnames()[:2] == ["000000000.jpg", "000000000.txt"]
        assert (
            tar.extractfile("000000000.jpg").read()
            == (root / "val2017" / images[0]["file_name"]).read_bytes()
        )  # the original file, not re-encoded
    dm = module(str(tmp_path / "out" / "val-000.tar"), val_size=3)
    dm.setup("validate")
    assert [dm.data_val[n]["caption"] for n in range(3)] == [f"photo {n} take 1" for n in range(3)]


def test_converter_writes_shapes(tmp_path):
    make_shards = load_make_shards()
    pattern = str(tmp_path / "shapes-%03d.tar")
    make_shards.main(
        ["--source", "shapes", "--count", "10", "--resolution", "16", "--output", pattern]
        + ["--maxcount", "6", "--no-shuffle"]
    )
    assert make_shards.brace_pattern(pattern, 2) == str(tmp_path / "shapes-{000..001}.tar")
    dm = module(make_shards.brace_pattern(pattern, 2), resolution=16, val_size=10)
    dm.setup("validate")
    shapes = ShapesDataset("train", size=10, resolution=16)
    for i in range(10):
        assert dm.data_val[i]["caption"] == shapes[i]["caption"]
        assert torch.allclose(dm.data_val[i]["image"], shapes[i]["image"], atol=1 / 127.5)


TRAIN = [
    "data=webdataset",
    "data.resolution=16",
    "data.batch_size=8",
    "data.val_size=16",
    *TINY_UNET,
    *TINY_BPE,
    "sampler.steps=2",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.sample_grid.num_samples=4",
    "callbacks.sample_grid.cell=null",
    "logger=null",
]


def shapes_shards(tmp_path: Path, count: int, maxcount: int) -> str:
    make_shards = load_make_shards()
    pattern = str(tmp_path / "shards" / "train-%06d.tar")
    args = ["--source", "shapes", "--count", str(count), "--resolution", "16"]
    make_shards.main([*args, "--output", pattern, "--maxcount", str(maxcount)])
    return make_shards.brace_pattern(pattern, -(-count // maxcount))


def test_train_py_streams_shards_end_to_end(tmp_path):
    urls = shapes_shards(tmp_path, 64, 16)
    run_dir = tmp_path / "run"
    result = run_entry(
        "train.py", *TRAIN, f"data.urls='{urls}'", "++trainer.max_steps=3",
        f"hydra.run.dir={run_dir}", tmp_path=tmp_path,
    )  # fmt: skip
    check_ok(result)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    (state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    # 24 samples: the worker's first shard (16) and 8 of its second
    assert state["batches"] == 3 and state["ranks"][0]["at"] == {"0": [1, 7]}
    assert (run_dir / "samples" / "final.png").is_file()


@pytest.mark.slow
def test_ddp_two_processes_two_workers_stream_and_resume(tmp_path):
    """trainer=ddp_cpu with 2 loader workers per rank: the checkpoint holds both ranks'
    positions (gathered at save time) and a resumed run continues from them."""
    urls = shapes_shards(tmp_path, 96, 12)  # 8 shards: 2 per (rank, worker)
    run_dir = tmp_path / "ddp"
    common = [*TRAIN, f"data.urls='{urls}'", "data.num_workers=2", "trainer=ddp_cpu"]
    common += ["callbacks.generative_metrics=null", "test=false", f"hydra.run.dir={run_dir}"]
    check_ok(run_entry("train.py", *common, "++trainer.max_steps=2", tmp_path=tmp_path))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    (state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state["world_size"] == 2 and state["batches"] == 2 and len(state["ranks"]) == 2
    for rank in state["ranks"]:  # 16 samples per rank: worker 0's first turn (12 + 4)
        assert rank == {"round": 0, "at": {"0": [1, 3]}, "next_worker": 1, "taken": 0}
    result = run_entry(
        "train.py", *common, "++trainer.max_steps=4", "ckpt_path=last", tmp_path=tmp_path
    )
    check_ok(result)
    assert "resuming the training stream at epoch 0 after its first 2 batches" in (
        result.stdout + result.stderr
    )
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    (state,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert ckpt["global_step"] == 4 and state["batches"] == 4
    # 16 samples from each worker: its first shard (12) and 4 of its second; a run that had
    # restarted the epoch would stand at worker 0's first turn again
    for rank in state["ranks"]:
        assert rank["at"] == {"0": [1, 3], "1": [1, 3]} and rank["round"] == 0
