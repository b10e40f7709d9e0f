"""Array datasets: CIFAR-10 and MNIST from tiny files in the official formats, and digits."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from genlab.data.checks import check_batch
from genlab.data.cifar10 import CLASS_NAMES, CIFAR10DataModule
from genlab.data.digits import DigitsDataModule
from genlab.data.mnist import MNISTDataModule

# ------------------------------------------------------------------------------------- CIFAR-10


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int], name: str) -> None:
    """Write one batch as the official pickled dict: data (N, 3072) uint8 rows R|G|B."""
    batch = {
        "batch_label": name,
        "labels": labels,
        "data": images.reshape(len(labels), -1),
        "filenames": [f"image_{k}.png" for k in range(len(labels))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


@pytest.fixture
def data_cifar(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """5 train batches of 3 images and a test batch of 4; returns (data_dir, train, test)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (15, 3, 32, 32), dtype=np.uint8)
    test = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    for k in range(5):
        labels = [(3 * k + j) % 10 for j in range(3)]
        write_cifar_batch(
            folder / f"data_batch_{k + 1}", train[3 * k : 3 * k + 3], labels, f"batch {k + 1}"
        )
    write_cifar_batch(folder / "test_batch", test, [3, 0, 9, 1], "testing batch")
    meta = {"label_names": CLASS_NAMES, "num_cases_per_batch": 3, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return tmp_path, train, test


def to_pixels(image: torch.Tensor) -> np.ndarray:
    """Map an image in [-1, 1] back to uint8."""
    return ((image + 1) * 127.5).round().to(torch.uint8).numpy()


def test_cifar10_reads_the_official_format(data_cifar):
    data_dir, train, test = data_cifar
    dm = CIFAR10DataModule(data_dir=str(data_dir), batch_size=4, val_size=5, random_flip=False)
    assert dm.num_classes == 10 and dm.class_names[3] == "cat"
    dm.setup("fit")
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (10, 5, 4)
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, channels=3, resolution=32, captions=True, labels=True)
    for image, label, caption, index in zip(
        *(batch[k] for k in ("image", "label", "caption", "index"))
    ):
        assert np.array_equal(to_pixels(image), train[index])
        article = "an" if label in (0, 1) else "a"  # airplane, automobile
        assert label == index % 10 and caption == f"a photo of {article} {CLASS_NAMES[label]}"
    assert np.array_equal(to_pixels(dm.data_val[0]["image"]), train[10])  # val: the last 5
    test_item = dm.data_test[2]
    assert np.array_equal(to_pixels(test_item["image"]), test[2]) and test_item["label"] == 9
    assert dm.sample_prompts(2) == ["a photo of an airplane", "a photo of an automobile"]


def test_cifar10_flips_only_training_images_and_resizes(data_cifar):
    data_dir, train, _ = data_cifar
    dm = CIFAR10DataModule(data_dir=str(data_dir), val_size=5)
    dm.setup("fit")
    torch.manual_seed(0)
    views = {to_pixels(dm.data_train[0]["image"]).tobytes() for _ in range(20)}
    assert views == {train[0].tobytes(), train[0][:, :, ::-1].tobytes()}
    assert {to_pixels(dm.data_val[0]["image"]).tobytes() for _ in range(20)} == {
        train[10].tobytes()
    }
    small = CIFAR10DataModule(data_dir=str(data_dir), val_size=5, resolution=16)
    small.setup("fit")
    assert small.data_val[0]["image"].shape == (3, 16, 16)


def test_cifar10_missing_names_the_layout_and_download(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path))  # no error before setup
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py") as error:
        dm.setup("fit")
    assert "data_batch_1" in str(error.value) and "data.download=true" in str(error.value)


def test_cifar10_rejects_a_broken_batch(data_cifar):
    data_dir, _, _ = data_cifar
    (data_dir / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3"):
        CIFAR10DataModule(data_dir=str(data_dir), val_size=5).setup("fit")


# ---------------------------------------------------------------------------------------- MNIST


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """Write an unsigned-byte idx file: 0, 0, 0x08, ndim, big-endian dims, data."""
    content = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    content += array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        content = gzip.compress(content)
    path.write_bytes(content)


@pytest.fixture
def data_mnist(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """12 train and 5 test digits as idx files (images gzipped, labels plain)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(raw / "train-images-idx3-ubyte", train, compress=True)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(12) % 10, compress=False)
    write_idx(raw / "t10k-images-idx3-ubyte", test, compress=True)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.array([7, 2, 1, 0, 4]), compress=False)
    return tmp_path, train, test


def test_mnist_pads_to_32_and_captions_digits(data_mnist):
    data_dir, train, test = data_mnist
    dm = MNISTDataModule(data_dir=str(data_dir), batch_size=4, val_size=2)
    dm.setup("fit")
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (10, 2, 5)
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, channels=1, resolution=32, captions=True, labels=True)
    image = dm.data_train[3]["image"]
    assert np.array_equal(to_pixels(image[0, 2:30, 2:30]), train[3])
    assert image[:, :2].eq(-1).all() and image[:, 30:].eq(-1).all()
    assert dm.data_train[3]["caption"] == "a handwritten three"
    assert dm.data_test[0]["label"] == 7 and dm.sample_prompts(2) == [
        "a handwritten zero",
        "a handwritten one",
    ]


def test_mnist_resizes_and_repeats_channels(data_mnist):
    data_dir, _, _ = data_mnist
    dm = MNISTDataModule(
        data_dir=str(data_dir), batch_size=4, val_size=2, resize="resize", resolution=16, channels=3
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, channels=3, resolution=16, captions=True, labels=True)
    assert torch.equal(batch["image"][:, 0], batch["image"][:, 2])


def test_mnist_missing_and_truncated_files(data_mnist, tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST/raw") as error:
        MNISTDataModule(data_dir=str(tmp_path / "none")).setup("fit")
    assert "t10k-images-idx3-ubyte" in str(error.value) and "data.download=true" in str(error.value)
    data_dir, _, _ = data_mnist
    labels = data_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-3])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*truncated"):
        MNISTDataModule(data_dir=str(data_dir), val_size=2).setup("fit")


# --------------------------------------------------------------------------------------- digits


def test_digits_split_upscale_and_captions():
    dm = DigitsDataModule(channels=3, batch_size=8)
    assert dm.train_captions()[:1] == [dm.build_splits()["train"].captions[0]]  # before setup
    dm.setup("fit")
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (1437, 180, 180)
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, channels=3, resolution=32, captions=True, labels=True)
    assert all(
        c == f"a handwritten {dm.class_names[label]}"
        for c, label in zip(batch["caption"], batch["label"])
    )
    image = dm.data_train[0]["image"][0]  # (32, 32)
    assert image.min() == -1 and image.max() > 0.5
    assert torch.unique(image).numel() > 17  # interpolated: more than the 17 source levels
    other = DigitsDataModule(seed=1)
    other.setup("fit")
    assert not torch.equal(other.data_val.labels, dm.data_val.labels)


# ------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (CIFAR10DataModule, {"val_size": 0}, "val_size"),
        (CIFAR10DataModule, {"resolution": 4}, "resolution"),
        (MNISTDataModule, {"resize": "crop"}, "resize"),
        (MNISTDataModule, {"resolution": 16}, "resolution"),
        (MNISTDataModule, {"channels": 2}, "channels"),
        (DigitsDataModule, {"interpolation": "area"}, "interpolation"),
        (DigitsDataModule, {"val_fraction": 0.6, "test_fraction": 0.5}, "test_fraction"),
    ],
)
def test_bad_arguments_name_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=f"{name}="):
        cls(**kwargs)


def test_val_size_beyond_the_training_set_is_refused(data_mnist):
    data_dir, _, _ = data_mnist
    with pytest.raises(ValueError, match="val_size=12"):
        MNISTDataModule(data_dir=str(data_dir), val_size=12).setup("fit")
