"""Image-file datasets (image_folder, COCO) and the bad-file policy, on tiny real fixtures."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.data.checks import check_batch
from genlab.data.coco import CocoDataModule
from genlab.data.files import ImageFiles, image_transform
from genlab.data.image_folder import ImageFolderDataModule


def write_image(path: Path, seed: int, size: tuple[int, int] = (24, 20)) -> Path:
    """Write a random RGB image (its format from the suffix) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header is intact but whose data stops half way."""
    write_image(path, seed=99, size=(64, 64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def write_garbage(path: Path) -> Path:
    """A file with an image suffix that holds no image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image" * 10)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    """Write one JSON value (or raw string) per line."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def data_folder(tmp_path: Path) -> Path:
    """An image folder: 10 images in two class folders, jpg and png, with captions.jsonl."""
    root = tmp_path / "folder"
    records = []
    for k in range(10):
        name = f"{'cats' if k < 6 else 'dogs'}/img{k}.{'jpg' if k % 2 else 'png'}"
        write_image(root / name, seed=k)
        records.append({"file_name": name, "text": f"picture number {k}"})
    records.append({"file_name": "cats/img0.png", "caption": "another caption of zero"})
    write_jsonl(root / "captions.jsonl", records)
    return root


def folder_module(root: Path, **kwargs) -> ImageFolderDataModule:
    """An image-folder DataModule on ``root`` with tiny sizes."""
    options = {"root": str(root), "resolution": 16, "batch_size": 4, "val_fraction": 0.2}
    return ImageFolderDataModule(**{**options, **kwargs})


def test_image_folder_batches_follow_the_contract(data_folder):
    dm = folder_module(data_folder, class_folders=True, crop="random", random_flip=True)
    assert dm.num_classes == 2 and dm.class_names == ["cats", "dogs"]  # before setup
    dm.setup("fit")
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (8, 2, 2)
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, channels=3, resolution=16, captions=True, labels=True)
    for caption, label, index in zip(batch["caption"], batch["label"], batch["index"]):
        path = dm.data_train.paths[index]
        assert (label == 0) == ("/cats/" in path)
        assert caption.startswith("picture number") or caption == "another caption of zero"
    check_batch(
        next(iter(dm.val_dataloader())), channels=3, resolution=16, captions=True, labels=True
    )


def test_image_folder_gathers_captions_per_file(data_folder):
    dm = folder_module(data_folder)
    captions = dm.scan().captions  # files in sorted order: cats/img0.png ... dogs/img9.jpg
    assert captions[0] == ["picture number 0", "another caption of zero"]
    assert captions[1:] == [[f"picture number {k}"] for k in range(1, 10)]
    parts = dm.split_parts()
    assert dm.train_captions() == [text for i in parts["train"] for text in captions[i]]
    assert dm.sample_prompts(3) == [captions[parts["val"][k]][0] for k in (0, 1, 0)]


def test_image_folder_splits_are_seeded_and_disjoint(data_folder):
    first, again, other = (folder_module(data_folder, seed=s).split_parts() for s in (0, 0, 1))
    assert first == again and first != other
    assert not set(first["train"]) & set(first["val"])
    assert sorted(first["train"] + first["val"]) == list(range(10))


def test_image_folder_reads_txt_captions_and_grey_images(tmp_path):
    for k in range(4):
        write_image(tmp_path / "a" / f"{k}.jpg", seed=k)
        (tmp_path / "a" / f"{k}.txt").write_text(f"first {k}\n\nsecond {k}\n")
    dm = folder_module(tmp_path, channels=1, val_fraction=0.25, batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, channels=1, resolution=16, captions=True, labels=False)
    train = dm.split_parts()["train"]
    assert dm.train_captions() == [f"{w} {k}" for k in train for w in ("first", "second")]


def test_image_folder_without_captions_has_no_caption_key(tmp_path):
    for k in range(3):
        write_image(tmp_path / f"{k}.png", seed=k)
    dm = folder_module(tmp_path, batch_size=2, val_fraction=0.3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, channels=3, resolution=16, captions=False, labels=False)
    assert dm.train_captions() == [] and dm.sample_prompts(2) is None


def test_image_folder_resizes_the_shorter_side_and_center_crops(tmp_path):
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, 20:40] = 255  # a white middle third, wide image
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = image_transform(10)(Image.open(tmp_path / "wide.png"))
    assert image.shape == (3, 10, 10)
    assert image[:, :, 2:8].min() == 1.0 and image.mean() > 0.8  # the crop is the middle


def test_image_folder_missing_root_fails_at_setup_with_the_layout(tmp_path):
    dm = folder_module(tmp_path / "nowhere")  # no error yet
    with pytest.raises(FileNotFoundError, match="nowhere") as error:
        dm.setup("fit")
    assert "Expected layout" in str(error.value) and "captions.jsonl" in str(error.value)


def test_image_folder_empty_root_is_an_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        folder_module(tmp_path / "empty").setup("fit")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"file_name": "missing.jpg", "text": "x"}, "missing.jpg"),
        ({"file": "0.png", "text": "x"}, "expected"),
        (["0.png", "x"], "expected"),
    ],
)
def test_bad_captions_jsonl_names_the_file_and_line(tmp_path, line, message):
    write_image(tmp_path / "0.png", seed=0)
    write_image(tmp_path / "1.png", seed=1)
    write_jsonl(tmp_path / "captions.jsonl", [{"file_name": "0.png", "text": "ok"}, line])
    with pytest.raises(ValueError, match=message) as error:
        folder_module(tmp_path).setup("fit")
    assert f"{tmp_path / 'captions.jsonl'}:2" in str(error.value)


def test_image_folder_class_folders_reject_loose_files(data_folder):
    write_image(data_folder / "loose.png", seed=5)
    with pytest.raises(ValueError, match="class folder"):
        folder_module(data_folder, class_folders=True, captions="none").setup("fit")


@pytest.fixture
def data_bad_folder(tmp_path: Path) -> Path:
    """Six files: 0, 1 good; 2 a truncated JPEG; 3 garbage; 4, 5 good."""
    root = tmp_path / "bad"
    for k in (0, 1, 4, 5):
        write_image(root / f"{k}.jpg", seed=k)
    write_truncated_jpeg(root / "2.jpg")
    write_garbage(root / "3.jpg")
    return root


def test_strict_policy_fails_at_setup_listing_the_bad_files(data_bad_folder):
    dm = folder_module(data_bad_folder, bad_files="strict")
    with pytest.raises(ValueError, match="2 of 6 image files cannot be read") as error:
        dm.setup("fit")
    assert str(data_bad_folder / "2.jpg") in str(error.value)
    assert str(data_bad_folder / "3.jpg") in str(error.value)


def test_skip_policy_replaces_counts_and_warns(data_bad_folder, caplog):
    paths = sorted(data_bad_folder.iterdir())
    dataset = ImageFiles(paths, transform=image_transform(16), max_consecutive_bad=3)
    with caplog.at_level(logging.WARNING):
        items = [dataset[i] for i in range(len(dataset))]
    assert [item["index"] for item in items] == [0, 1, 4, 4, 4, 5]
    assert torch.equal(items[2]["image"], items[4]["image"])
    assert dataset.bad_paths() == [str(paths[2]), str(paths[3])]
    warned = [
        r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()
    ]
    assert len(warned) == 2 and str(paths[2]) in warned[0] and "truncated" in warned[0]


def test_too_many_bad_files_in_a_row_stop(data_bad_folder):
    paths = sorted(data_bad_folder.iterdir())
    dataset = ImageFiles(paths, transform=image_transform(16), max_consecutive_bad=2)
    assert dataset[1]["index"] == 1
    with pytest.raises(RuntimeError, match="2 image files in a row cannot be read"):
        dataset[2]


def test_strict_policy_still_fails_loudly_at_load_time(data_bad_folder):
    dataset = ImageFiles(
        sorted(data_bad_folder.iterdir()), transform=image_transform(16), bad_files="strict"
    )
    with pytest.raises(RuntimeError, match="cannot read image"):
        dataset[3]


def test_skipped_files_are_counted_across_loader_workers(data_bad_folder):
    dm = folder_module(data_bad_folder, batch_size=1, val_fraction=0.5, num_workers=1)
    dm.setup("fit")
    for _ in dm.train_dataloader():
        pass
    for _ in dm.val_dataloader():
        pass
    assert dm.skipped_files() == [str(data_bad_folder / "2.jpg"), str(data_bad_folder / "3.jpg")]


# ----------------------------------------------------------------------------------------- COCO


def write_coco_part(root: Path, part: str, images: dict[int, list[tuple[int, str]]]) -> None:
    """Write ``{part}2017/<id>.jpg`` and its captions json; ``images``: id -> [(ann id, text)]."""
    entries, annotations = [], []
    for image_id, captions in images.items():
        name = f"{image_id:012d}.jpg"
        write_image(root / f"{part}2017" / name, seed=image_id, size=(40, 30))
        entries.append({"id": image_id, "file_name": name, "height": 30, "width": 40})
        annotations += [{"id": a, "image_id": image_id, "caption": text} for a, text in captions]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    content = {
        "info": {},
        "licenses": [],
        "images": entries[::-1],
        "annotations": annotations[::-1],
    }
    (root / "annotations" / f"captions_{part}2017.json").write_text(json.dumps(content))


@pytest.fixture
def data_coco(tmp_path: Path) -> Path:
    """A tiny COCO: 4 train and 3 val images with 1-2 captions each, in the official layout."""
    root = tmp_path / "coco"
    train = {k: [(100 + k, f"train image {k}")] for k in range(1, 5)}
    train[2].append((50, "earlier caption of image 2"))
    write_coco_part(root, "train", train)
    val = {
        11: [(9, " val eleven b "), (3, "val eleven a")],
        12: [(4, "val twelve")],
        13: [(5, "val 13")],
    }
    write_coco_part(root, "val", val)
    return tmp_path


def test_coco_batches_and_fixed_val_captions(data_coco):
    dm = CocoDataModule(data_dir=str(data_coco), resolution=16, batch_size=2, val_size=2)
    assert len(dm.train_captions()) == 5  # before setup
    dm.setup("fit")
    assert dm.data_test is None and len(dm.data_train) == 4 and len(dm.data_val) == 2
    check_batch(
        next(iter(dm.train_dataloader())), channels=3, resolution=16, captions=True, labels=False
    )
    val = next(iter(dm.val_dataloader()))
    check_batch(val, channels=3, resolution=16, captions=True, labels=False)
    assert val["caption"] == ["val eleven a", "val twelve"]
    assert dm.sample_prompts(3) == ["val eleven a", "val twelve", "val eleven a"]
    dm.setup("test")
    assert [dm.data_test[i]["caption"] for i in range(3)] == [
        "val eleven a",
        "val twelve",
        "val 13",
    ]


def test_coco_train_draws_every_caption(data_coco):
    dm = CocoDataModule(data_dir=str(data_coco), resolution=16, batch_size=2, val_size=3)
    dm.setup("fit")
    torch.manual_seed(0)
    assert {dm.data_train[1]["caption"] for _ in range(30)} == {
        "earlier caption of image 2",
        "train image 2",
    }


def test_coco_missing_fails_at_setup_with_the_layout(tmp_path):
    dm = CocoDataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="captions_train2017.json") as error:
        dm.setup("fit")
    assert str(tmp_path / "coco") in str(error.value) and "train2017/" in str(error.value)


def test_coco_malformed_annotations_name_the_file(data_coco):
    path = data_coco / "coco" / "annotations" / "captions_val2017.json"
    path.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(ValueError, match="captions_val2017.json"):
        CocoDataModule(data_dir=str(data_coco)).setup("validate")


def test_coco_bad_files_strict_and_skip(data_coco):
    write_truncated_jpeg(data_coco / "coco" / "val2017" / "000000000012.jpg")
    with pytest.raises(ValueError, match="000000000012.jpg"):
        CocoDataModule(data_dir=str(data_coco), val_size=3, bad_files="strict").setup("validate")
    dm = CocoDataModule(data_dir=str(data_coco), resolution=16, batch_size=3, val_size=3)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["index"].tolist() == [0, 2, 2] and batch["caption"][1] == "val 13"
    assert dm.skipped_files() == [str(data_coco / "coco" / "val2017" / "000000000012.jpg")]


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (ImageFolderDataModule, {"bad_files": "ignore"}, "bad_files"),
        (ImageFolderDataModule, {"max_consecutive_bad": 0}, "max_consecutive_bad"),
        (ImageFolderDataModule, {"val_fraction": 1.0}, "val_fraction"),
        (ImageFolderDataModule, {"crop": "left"}, "crop"),
        (ImageFolderDataModule, {"captions": "csv"}, "captions"),
        (ImageFolderDataModule, {"channels": 2}, "channels"),
        (CocoDataModule, {"val_size": 0}, "val_size"),
        (CocoDataModule, {"num_workers": -1}, "num_workers"),
    ],
)
def test_bad_arguments_name_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=f"{name}="):
        cls(**kwargs)


def test_unflipped_train_split_serves_every_image_as_stored(data_folder):
    """What a latent cache is built from: the train split without its random flips, the same
    image at every read (the center crop of the file), the split's files and flags shared."""
    flipping = folder_module(data_folder, random_flip=True)
    flipping.setup("fit")
    unflipped = flipping.unflipped_train_split()
    plain = folder_module(data_folder)
    plain.setup("fit")
    torch.manual_seed(0)
    reads = [[flipping.data_train[i]["image"] for _ in range(8)] for i in range(4)]
    assert any(not torch.equal(r[0], x) for r in reads for x in r)  # the split does flip
    assert unflipped.paths == plain.data_train.paths
    for i in range(len(unflipped)):
        assert torch.equal(unflipped[i]["image"], plain.data_train[i]["image"])
    assert unflipped.bad is flipping.data_train.bad  # bad-file flags are shared
    assert plain.unflipped_train_split() is plain.data_train
