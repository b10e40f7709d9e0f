"""A folder of awkward and broken files: each is read correctly or skipped and counted, and a
2-process DDP run trains through it with the ranks in step. (Per-DataModule strict/skip tests:
tests/test_data_files.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, check_ok, run_entry
from genlab.data.files import ImageFiles, image_transform
from genlab.data.image_folder import ImageFolderDataModule
from genlab.data.tokenizer import BPETokenizer

CAPTIONS = {
    "rgb_odd.png": "a red square, 37 by 23 pixels",
    "rgba.png": "half transparent",
    "palette.png": "a palette image with a transparent index",
    "grey16.png": "a sixteen-bit grey ramp",
    "grey.png": "ein graues Bild, größer als gedacht",
    "cmyk.jpg": "一张青色的图片",
    "tiny.png": "صورة صغيرة جدا 🙂🎨",
    "long.png": " ".join(["a very long caption"] * 500),
    "empty.jpg": "a file of zero bytes",
    "text.jpg": "a text file named .jpg",
    "truncated.png": "a truncated PNG",
}
BAD = ("empty.jpg", "text.jpg", "truncated.png")


@pytest.fixture
def awkward_folder(tmp_path: Path) -> Path:
    root = tmp_path / "awkward"
    root.mkdir()
    Image.new("RGB", (37, 23), (255, 0, 0)).save(root / "rgb_odd.png")
    rgba = np.zeros((16, 16, 4), np.uint8)  # black where transparent, opaque blue on the right
    rgba[:, 8:] = (0, 0, 255, 255)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (0, 0, 16, 8))  # green top half; index 0 (black) is transparent
    palette.save(root / "palette.png", transparency=0)
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(root / "grey16.png")
    Image.new("L", (20, 20), 128).save(root / "grey.png")
    Image.new("CMYK", (20, 20), (255, 0, 0, 0)).save(root / "cmyk.jpg")
    Image.new("RGB", (1, 1), (0, 255, 0)).save(root / "tiny.png")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "long.png")
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    full = root / "long.png"
    (root / "truncated.png").write_bytes(full.read_bytes()[:40])
    lines = [
        json.dumps({"file_name": f, "text": t}, ensure_ascii=False) for f, t in CAPTIONS.items()
    ]
    lines.append(json.dumps({"file_name": "grey.png", "text": "   "}))  # an empty caption: ignored
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def read(root: Path, name: str) -> torch.Tensor:
    dataset = ImageFiles([root / name], transform=image_transform(16))
    return dataset[0]["image"]


def test_awkward_images_are_read_as_a_viewer_shows_them(awkward_folder: Path) -> None:
    rgba = read(awkward_folder, "rgba.png")
    assert torch.allclose(rgba[:, :, :6], torch.ones(3, 16, 6), atol=0.02)  # white, not black
    assert torch.allclose(rgba[:, :, 10:], torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1), atol=0.02)
    palette = read(awkward_folder, "palette.png")
    assert torch.allclose(palette[:, 10:, :], torch.ones(3, 6, 16), atol=0.02)  # transparent
    assert torch.allclose(palette[1, :6, :], torch.ones(6, 16), atol=0.02)  # green
    grey16 = read(awkward_folder, "grey16.png")[0, 8]  # a ramp from -1 to 1, not clipped white
    assert grey16[0] < -0.9 and grey16[-1] > 0.9 and abs(float(grey16.mean())) < 0.1
    assert read(awkward_folder, "cmyk.jpg")[:, 8, 8].tolist() == pytest.approx([-1, 1, 1], abs=0.05)
    for name in ("rgb_odd.png", "grey.png", "tiny.png"):
        assert read(awkward_folder, name).shape == (3, 16, 16), name


def test_broken_files_are_skipped_counted_and_strict_lists_them(awkward_folder: Path) -> None:
    strict = ImageFolderDataModule(root=str(awkward_folder), resolution=16, bad_files="strict")
    with pytest.raises(ValueError, match="3 of 11 image files cannot be read") as error:
        strict.setup("fit")
    assert all(name in str(error.value) for name in BAD)
    dm = ImageFolderDataModule(
        root=str(awkward_folder), resolution=16, batch_size=2, val_fraction=0.2, bad_files="skip"
    )
    dm.setup("fit")
    for split in (dm.data_train, dm.data_val):  # every item (a train epoch drops a remainder)
        for i in range(len(split)):
            item = split[i]
            assert item["image"].shape == (3, 16, 16)
            assert isinstance(item["caption"], str) and item["caption"].strip()
    assert sorted(Path(p).name for p in dm.skipped_files()) == sorted(BAD)


def test_captions_in_any_script_and_far_too_long_ones_tokenize(caplog) -> None:
    tokenizer = BPETokenizer.train(list(CAPTIONS.values()) * 4, vocab_size=300)
    tokens, mask = tokenizer.encode(list(CAPTIONS.values()), context_length=32)
    assert tokens.shape == mask.shape == (len(CAPTIONS), 32)
    assert bool(mask.all(dim=1)[list(CAPTIONS).index("long.png")])  # truncated to the context
    assert "truncated to context_length=32" in caplog.text
    round_trip = tokenizer.decode(
        tokenizer.encode([CAPTIONS["tiny.png"]], context_length=64)[0][0].tolist()
    )
    assert CAPTIONS["tiny.png"] in round_trip  # Arabic and emoji seen in training survive
    unseen, _ = tokenizer.encode(["ქართული ✈"], context_length=8)  # never seen: [UNK], no error
    assert tokenizer.tokenizer.token_to_id("[UNK]") in unseen[0].tolist()


def test_ddp_run_trains_through_the_broken_files_in_step(awkward_folder: Path, tmp_path) -> None:
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith("data.")]
    result = run_entry(
        "train.py",
        *overrides,
        "data=image_folder",
        f"data.root={awkward_folder}",
        "data.resolution=16",
        "data.batch_size=2",
        "data.val_fraction=0.2",
        "data.bad_files=skip",
        "trainer=ddp_cpu",
        "trainer.max_steps=4",
        "test=false",
        "callbacks.generative_metrics=null",
        "callbacks.sample_grid=null",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    out = result.stdout + result.stderr
    assert "skipping unreadable image" in out
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4  # last.ckpt is the latest state even if val/loss got worse
