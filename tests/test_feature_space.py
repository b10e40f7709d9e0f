"""The shapes oracle's feature space for distribution metrics (version 2): whitened on real
training images, shipped with the project, and able to tell real images from shifted ones at
N = 256 — plus KID's paired estimator and the redrawn real floor it is measured against."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import genlab
from genlab.data.shapes import ShapesDataModule
from genlab.evaluation.tools import load_evaluator
from genlab.metrics.fid import feature_statistics, frechet_distance
from genlab.metrics.kid import kernel_inception_distance, mmd2_paired, subset_size_for
from genlab.models.evaluators.shapes_oracle import EVALUATOR_KEY, VERSION, WEIGHTS
from genlab.utils.checkpoint import DATA_CONFIG_KEY, read_checkpoint

N = 256  # the default job's sample count


@pytest.fixture(scope="module")
def shipped():
    """The shipped evaluator and the default job's data (32 px, 1-2 objects)."""
    return genlab.load(WEIGHTS), ShapesDataModule(val_size=1024, test_size=1024)


def images(dataset, n: int) -> torch.Tensor:
    return torch.stack([dataset[i]["image"] for i in range(n)])


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def blur(x: torch.Tensor) -> torch.Tensor:
    """A 3x3 box blur (edges replicated)."""
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


# ---------------------------------------------------------------------------------------------
# the whitening
def test_the_whitening_is_fitted_on_train_images_and_stored(oracle_checkpoint: Path) -> None:
    """The tests' oracle, built by its recipe: its checkpoint holds a whitening that makes the
    features of the first ``whiten_images`` *train* images centred with identity covariance,
    and that equals a fit on exactly those images (not val or test ones)."""
    oracle = genlab.load(oracle_checkpoint)
    assert oracle.version == VERSION and bool(oracle.whitened)
    assert read_checkpoint(oracle_checkpoint)[EVALUATOR_KEY] == {
        "name": "shapes_oracle",
        "version": VERSION,
    }
    config = dict(read_checkpoint(oracle_checkpoint)[DATA_CONFIG_KEY])
    config.pop("_target_")
    data = ShapesDataModule(**config)
    train = images(data.split("train"), oracle.whiten_images)
    whitened = oracle.features(train).double()
    assert whitened.shape == (oracle.whiten_images, oracle.feature_dim)
    torch.testing.assert_close(
        whitened.mean(0), torch.zeros(oracle.feature_dim).double(), atol=1e-4, rtol=0
    )
    eye = torch.eye(oracle.feature_dim).double()
    torch.testing.assert_close(torch.cov(whitened.T), eye, atol=1e-3, rtol=0)
    refit = genlab.load(oracle_checkpoint)
    refit.fit_whitening(oracle.raw_features(train))
    torch.testing.assert_close(refit.feature_projection, oracle.feature_projection)
    refit.fit_whitening(oracle.raw_features(images(data.split("val"), len(data.split("val")))))
    assert not torch.allclose(refit.feature_mean, oracle.feature_mean)


def test_the_shipped_evaluator_is_version_2_and_small() -> None:
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 8 * 2**20
    ckpt = read_checkpoint(WEIGHTS)
    assert ckpt[EVALUATOR_KEY]["version"] == VERSION and "optimizer_states" not in ckpt
    oracle = genlab.load(WEIGHTS)
    assert bool(oracle.whitened) and oracle.feature_dim == 32 and oracle.image_size == 32


def test_an_evaluator_of_another_version_is_refused(tmp_path: Path) -> None:
    """A version-1 checkpoint (no whitening, no version entry) loads, but the metrics refuse it
    with a message that names the versions and the way out."""
    ckpt = read_checkpoint(WEIGHTS)
    del ckpt[EVALUATOR_KEY]
    for name in ("feature_mean", "feature_projection", "whitened"):
        del ckpt["state_dict"][name]
    old = tmp_path / "oracle_v1.ckpt"
    torch.save(ckpt, old)
    loaded = genlab.load(old)
    assert loaded.version == 1 and not bool(loaded.whitened)
    with pytest.raises(ValueError, match="no feature whitening"):
        loaded.features(torch.zeros(1, 3, 32, 32))
    evaluators = {"shapes_oracle": (str(old), None)}
    with pytest.raises(ValueError, match="is version 1, without feature whitening.*need version 2"):
        load_evaluator("shapes_oracle", evaluators, torch.device("cpu"))
    ok = load_evaluator(
        "shapes_oracle", {"shapes_oracle": (str(WEIGHTS), None)}, torch.device("cpu")
    )
    assert ok.module.version == VERSION


# ---------------------------------------------------------------------------------------------
# FID and KID on the shipped features
def test_fid_of_two_disjoint_real_sets_shrinks_as_n_grows(shipped) -> None:
    oracle, data = shipped
    val, test = (
        oracle.features(images(data.split("val"), 1024)),
        oracle.features(images(data.split("test"), 1024)),
    )
    floors = [fid(val[:n], test[:n]) for n in (64, 256, 1024)]
    assert floors[0] > floors[1] > floors[2] > 0, floors
    # the bias of real-vs-real FID on whitened d-dim features is about d^2 / 2N (+ 2d / N)
    assert floors[1] < 2 * (32**2 / (2 * 256) + 2 * 32 / 256), floors


def test_fid_separates_a_clear_shift_by_ten_times_its_floor(shipped) -> None:
    """At N = 256, against the reference (val) images: the floor is the same scenes drawn again
    (what a perfect text-to-image model prompted with their captions would give); a 3x3 blur
    of those images, or their colours swapped (R <-> B), is at least 10x the floor."""
    oracle, data = shipped
    reference = oracle.features(images(data.split("val"), N))
    redrawn = images(data.redrawn("val"), N)
    floor = fid(reference, oracle.features(redrawn))
    blurred = fid(reference, oracle.features(blur(redrawn)))
    swapped = fid(reference, oracle.features(redrawn[:, [2, 1, 0]]))
    assert blurred > 10 * floor and swapped > 10 * floor, (floor, blurred, swapped)


def test_kid_has_a_real_std_and_real_vs_real_is_consistent_with_zero(shipped) -> None:
    oracle, data = shipped
    reference = oracle.features(images(data.split("val"), N))
    redrawn = oracle.features(images(data.redrawn("val"), N))
    m = subset_size_for(N, 1000)
    assert m == N // 2
    mean, std = kernel_inception_distance(reference, redrawn, subset_size=m, paired=True)
    assert std > 0 and abs(mean) <= 2 * std, (mean, std)
    test = oracle.features(images(data.split("test"), N))
    mean, std = kernel_inception_distance(reference, test, subset_size=m)
    assert std > 0 and abs(mean) <= 2 * std, (mean, std)
    shifted = oracle.features(blur(images(data.redrawn("val"), N)))
    mean, std = kernel_inception_distance(reference, shifted, subset_size=m, paired=True)
    assert mean > 2 * std, (mean, std)


def test_paired_kid_is_gretton_s_u_statistic() -> None:
    """MMD²_u of Gretton et al. 2012, Eq. 3, by hand on three matched pairs."""
    x = [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    y = [[2.0, 0.0], [0.0, -1.0], [1.0, 2.0]]

    def k(u, v):
        return (sum(a * b for a, b in zip(u, v)) / 2 + 1) ** 3

    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    h = [k(x[i], x[j]) + k(y[i], y[j]) - k(x[i], y[j]) - k(x[j], y[i]) for i, j in pairs]
    expected = sum(h) / 6
    mean, std = kernel_inception_distance(
        torch.tensor(x), torch.tensor(y), subsets=1, subset_size=3, paired=True
    )
    assert mean == pytest.approx(expected, rel=1e-12) and std == 0.0
    kx, ky = torch.tensor(x).double(), torch.tensor(y).double()

    def gram(a, b):
        return (a @ b.T / 2 + 1) ** 3

    assert mmd2_paired(gram(kx, kx), gram(ky, ky), gram(kx, ky)).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="paired KID needs as many"):
        kernel_inception_distance(torch.zeros(4, 2), torch.zeros(5, 2), paired=True)


def test_paired_kid_is_unbiased_where_the_standard_estimate_is_not() -> None:
    """Pairs (x_i, y_i = x_i + small noise) from one distribution: MMD² is 0. The standard
    estimator's cross term includes the matched pairs and comes out far below 0; the paired
    one is consistent with 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = x + 0.1 * torch.randn(400, 8, generator=g)
    m = subset_size_for(400, 1000)
    standard, _ = kernel_inception_distance(x, y, subset_size=400, subsets=1)
    mean, std = kernel_inception_distance(x, y, subset_size=m, paired=True)
    assert standard < -0.02 and abs(mean) <= 2 * std + 1e-3, (standard, mean, std)


def test_subset_size_leaves_room_for_a_std() -> None:
    assert subset_size_for(50_000, 1000) == 1000
    assert subset_size_for(256, 1000) == 128
    assert subset_size_for(3, 1000) == 2


# ---------------------------------------------------------------------------------------------
# the redrawn floor
def test_redrawn_scenes_keep_their_objects_and_move_them() -> None:
    data = ShapesDataModule(val_size=64)
    val, again = data.split("val"), data.redrawn("val")
    moved = 0
    for i in range(64):
        a, b = val.scene(i)[0], again.scene(i)[0]
        assert [(o.shape, o.color, o.size, o.cell) for o in a] == [
            (o.shape, o.color, o.size, o.cell) for o in b
        ]
        assert val[i]["caption"] == again[i]["caption"]
        assert torch.equal(val[i]["attributes"], again[i]["attributes"])
        moved += not torch.equal(val[i]["image"], again[i]["image"])
        assert torch.equal(val[i]["image"], data.split("val")[i]["image"])  # split unchanged
    assert moved >= 60
    assert math.isclose(len(again), len(val))
