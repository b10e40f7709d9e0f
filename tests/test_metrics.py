"""Golden values, parity and properties of the metric math (``genlab.metrics``).

Expected numbers come from closed forms written out here, from independent implementations
(scipy ``sqrtm``, ``scipy.ndimage``), or from torch-fidelity 0.4.0 and torchmetrics 1.9.0 on the
same features. DDP independence is checked at the state level: two instances updated on the two
shards of a round-robin split (rank r gets items r, r+2, ...) and merged with torchmetrics'
``merge_state`` must compute what one instance fed everything computes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import _compute_fid

from genlab.metrics.feature_bank import FeatureBank, check_features
from genlab.metrics.fid import FID, feature_statistics, frechet_distance
from genlab.metrics.inception_score import InceptionScore, inception_score
from genlab.metrics.kid import KID, kernel_inception_distance
from genlab.metrics.precision_recall import PrecisionRecall, precision_recall
from genlab.metrics.reconstruction import (
    CodebookUsage,
    ReconstructionMetrics,
    psnr,
    ssim,
)
from genlab.metrics.text_image import CaptionAccuracy, CLIPScore

NO_UPDATE_WARNING = "ignore:The ``compute`` method"  # torchmetrics warns before our ValueError


def gaussian(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """n correlated Gaussian feature vectors (N, D), float64."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(d) + torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    return shift + scale * z @ mixing


def ragged_batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    """A random permutation of range(n) cut into batches of sizes 1, 2, 3, ..."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    batches, start, size = [], 0, 1
    while start < n:
        batches.append(order[start : start + size])
        start, size = start + size, size + 1
    return batches


def two_ranks(make, update_args: tuple[torch.Tensor, ...], with_index: bool):
    """Update two instances on the round-robin shards (items r, r+2, ...) of ``update_args`` and
    merge them like a DDP sync would; return the merged instance."""
    ranks = [make(), make()]
    n = len(update_args[0])
    for r, metric in enumerate(ranks):
        index = torch.arange(r, n, 2)
        args = [a[index] for a in update_args] + ([index] if with_index else [])
        metric.update(*args)
    ranks[0].merge_state(ranks[1])
    return ranks[0]


def orthogonal_features(mu: torch.Tensor, variances: torch.Tensor, n: int, seed: int):
    """n features (N, D) whose sample mean is exactly mu and sample covariance diag(variances)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, len(mu) + 1, generator=g, dtype=torch.float64)
    a[:, 0] = 1
    q = torch.linalg.qr(a).Q[:, 1:]  # orthonormal columns, orthogonal to the ones vector
    return mu + q * torch.sqrt((n - 1) * variances)


# ---------------------------------------------------------------------------------------------
# FID
def test_fid_of_a_set_against_itself_is_zero() -> None:
    x = gaussian(300, 16, seed=0, shift=3.0, scale=10.0)
    metric = FID(reference=x)
    metric.update(x)
    scale = feature_statistics(x)[1].trace().item()
    assert abs(metric.compute().item()) < 1e-10 * scale


def test_fid_diagonal_closed_form() -> None:
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 1.0, 1.0])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    x = orthogonal_features(mu1.double(), a.double(), 50, seed=1)
    y = orthogonal_features(mu2.double(), b.double(), 80, seed=2)
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()  # 0.25 + 9 + 4 + 1
    assert expected.item() == pytest.approx(14.25)
    metric = FID(reference=y)
    metric.update(x)
    assert metric.compute().item() == pytest.approx(14.25, rel=1e-12)


def test_fid_matches_scipy_sqrtm_torchmetrics_and_torch_fidelity() -> None:
    x, y = gaussian(400, 12, seed=3), gaussian(300, 12, seed=4, shift=0.3, scale=1.5)
    mu1, mu2 = x.mean(0).numpy(), y.mean(0).numpy()
    s1, s2 = np.cov(x.numpy(), rowvar=False), np.cov(y.numpy(), rowvar=False)
    by_sqrtm = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    ours = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    torchmetrics_value = _compute_fid(*feature_statistics(x), *feature_statistics(y)).item()
    fidelity = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert ours == pytest.approx(by_sqrtm, rel=1e-9)
    assert ours == pytest.approx(torchmetrics_value, rel=1e-9)
    assert ours == pytest.approx(fidelity["frechet_inception_distance"], rel=1e-9)
    metric = FID(reference=y)
    metric.update(x)
    assert metric.compute().item() == pytest.approx(ours, rel=1e-10)


def test_fid_of_singular_covariances_is_finite_and_matches_torch_fidelity() -> None:
    x, y = gaussian(10, 32, seed=5), gaussian(12, 32, seed=6, shift=0.1)  # N < D: rank-deficient
    stats = [{"mu": m.numpy(), "sigma": s.numpy()} for m, s in map(feature_statistics, (x, y))]
    ours = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert math.isfinite(ours)
    assert ours == pytest.approx(
        fid_statistics_to_metric(*stats, False)["frechet_inception_distance"], rel=1e-6
    )


def test_fid_does_not_depend_on_batching_or_ranks() -> None:
    x, y = gaussian(200, 8, seed=7), gaussian(150, 8, seed=8, shift=0.5)
    whole = FID(reference=y)
    whole.update(x)
    ragged = FID(reference=y)
    for batch in ragged_batches(len(x)):
        ragged.update(x[batch])
    merged = two_ranks(lambda: FID(reference=y), (x,), with_index=False)
    expected = whole.compute().item()
    assert ragged.compute().item() == pytest.approx(expected, rel=1e-10)
    assert merged.compute().item() == pytest.approx(expected, rel=1e-10)


def test_fid_reference_from_statistics_and_reset() -> None:
    x, y = gaussian(100, 4, seed=9), gaussian(100, 4, seed=10)
    metric = FID()
    metric.set_reference_statistics(*feature_statistics(y))
    metric.update(x)
    first = metric.compute().item()
    metric.reset()
    metric.update(x)
    assert metric.compute().item() == first
    assert first == pytest.approx(frechet_distance(*feature_statistics(x), *feature_statistics(y)))


# ---------------------------------------------------------------------------------------------
# KID
def test_kid_without_randomness_matches_torch_fidelity() -> None:
    real, fake = gaussian(60, 10, seed=11), gaussian(60, 10, seed=12, shift=0.4)
    mean, std = kernel_inception_distance(real, fake, subsets=1, subset_size=60)
    theirs = kid_features_to_metric(real, fake, kid_subsets=1, kid_subset_size=60, verbose=False)
    assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-10)
    assert std == 0.0


def test_kid_equals_a_hand_computed_unbiased_mmd() -> None:
    real = [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    fake = [[2.0, 0.0], [0.0, -1.0], [1.0, 2.0]]

    def k(u, v):
        return (sum(a * b for a, b in zip(u, v)) / 2 + 1) ** 3  # γ = 1/D, c0 = 1, d = 3

    m = 3
    within = sum(k(p, q) for i, p in enumerate(real) for j, q in enumerate(real) if i != j)
    within += sum(k(p, q) for i, p in enumerate(fake) for j, q in enumerate(fake) if i != j)
    cross = sum(k(p, q) for p in real for q in fake)
    expected = within / (m * (m - 1)) - 2 * cross / m**2
    mean, _ = kernel_inception_distance(
        torch.tensor(real), torch.tensor(fake), subsets=1, subset_size=3
    )
    assert mean == pytest.approx(expected, rel=1e-12)


def test_kid_is_reproducible_and_seeded() -> None:
    real, fake = gaussian(80, 6, seed=13), gaussian(90, 6, seed=14, shift=0.2)
    kwargs = {"subsets": 10, "subset_size": 30}
    assert kernel_inception_distance(real, fake, **kwargs) == kernel_inception_distance(
        real, fake, **kwargs
    )
    assert kernel_inception_distance(real, fake, **kwargs, seed=1) != kernel_inception_distance(
        real, fake, **kwargs
    )


def test_kid_clips_the_subset_size_with_a_warning() -> None:
    real, fake = gaussian(20, 4, seed=15), gaussian(30, 4, seed=16)
    with pytest.warns(UserWarning, match="clipped to 20"):
        clipped = kernel_inception_distance(real, fake, subsets=3, subset_size=1000)
    assert clipped == kernel_inception_distance(real, fake, subsets=3, subset_size=20)


def test_kid_class_does_not_depend_on_batch_order_or_ranks() -> None:
    real, fake = gaussian(70, 6, seed=17), gaussian(64, 6, seed=18, shift=0.3)
    kwargs = {"subsets": 5, "subset_size": 20, "seed": 3}
    expected = kernel_inception_distance(real, fake, **kwargs)
    shuffled = KID(reference=real, **kwargs)
    for batch in ragged_batches(len(fake), seed=1):
        shuffled.update(fake[batch], batch)
    merged = two_ranks(lambda: KID(reference=real, **kwargs), (fake,), with_index=True)
    assert tuple(v.item() for v in shuffled.compute()) == expected
    assert tuple(v.item() for v in merged.compute()) == expected


# ---------------------------------------------------------------------------------------------
# Inception Score
def test_inception_score_matches_torch_fidelity() -> None:
    logits = 3 * torch.randn(
        101, 7, generator=torch.Generator().manual_seed(19), dtype=torch.float64
    )
    mean, std = inception_score(logits.softmax(dim=1), splits=3)
    theirs = isc_features_to_metric(logits, splits=3, shuffle=False)
    assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
    assert std == pytest.approx(theirs["inception_score_std"], rel=1e-9)


def test_inception_score_of_uniform_and_of_k_confident_classes() -> None:
    assert inception_score(torch.full((40, 5), 0.2), splits=4) == pytest.approx((1.0, 0.0))
    one_hot = torch.eye(5).repeat(8, 1)  # classes 0..4, each 8 times, every split balanced
    mean, std = inception_score(one_hot, splits=2)
    assert mean == pytest.approx(5.0, rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_class_does_not_depend_on_batch_order_or_ranks() -> None:
    g = torch.Generator().manual_seed(20)
    probs = torch.randn(50, 6, generator=g).mul(2).softmax(dim=1)
    expected = inception_score(probs, splits=5)
    shuffled = InceptionScore(splits=5)
    for batch in ragged_batches(len(probs), seed=2):
        shuffled.update(probs[batch], batch)
    merged = two_ranks(lambda: InceptionScore(splits=5), (probs,), with_index=True)
    assert tuple(v.item() for v in shuffled.compute()) == expected
    assert tuple(v.item() for v in merged.compute()) == expected


def test_inception_score_rejects_logits() -> None:
    with pytest.raises(ValueError, match="not logits"):
        InceptionScore().update(torch.randn(4, 3), torch.arange(4))
    with pytest.raises(ValueError, match="row 0 sums to 1.5"):
        inception_score(torch.tensor([[1.0, 0.5], [0.5, 0.5]]), splits=1)


# ---------------------------------------------------------------------------------------------
# improved precision and recall
def test_precision_recall_matches_torch_fidelity() -> None:
    real, fake = gaussian(300, 5, seed=21), gaussian(250, 5, seed=22, shift=0.5, scale=1.3)
    ours = precision_recall(real, fake, k=3, batch_size=37)
    theirs = prc_features_to_metric(fake, real, prc_neighborhood=3, verbose=False)
    assert 0.2 < ours[0] < 0.95 and 0.2 < ours[1] < 0.95  # a case that tests something
    assert ours == (pytest.approx(theirs["precision"]), pytest.approx(theirs["recall"]))


def test_precision_recall_by_hand() -> None:
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # 1-NN radii: 1 each
    fake = torch.tensor([[0.5], [10.0]])  # 1-NN radii: 9.5 each; every real is within 9.5
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)


def test_precision_recall_of_identical_and_of_far_apart_sets() -> None:
    x = gaussian(100, 4, seed=23)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0) == (0.0, 0.0)


def test_precision_recall_class_does_not_depend_on_ranks() -> None:
    real, fake = gaussian(60, 3, seed=24), gaussian(50, 3, seed=25, shift=0.7)
    merged = two_ranks(lambda: PrecisionRecall(reference=real), (fake,), with_index=True)
    assert tuple(v.item() for v in merged.compute()) == precision_recall(real, fake)


# ---------------------------------------------------------------------------------------------
# CLIP score and caption accuracy
def test_clip_score_by_hand_with_negative_cosines_clipped() -> None:
    images = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 0.0]])
    texts = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # cos = 1, 1/√2, -1 → 0
    mean = (1 + 1 / math.sqrt(2) + 0) / 3
    metric = CLIPScore()
    metric.update(images[:2], texts[:2])
    metric.update(images[2:], texts[2:])
    result = metric.compute()
    assert result["clip_score"].item() == pytest.approx(100 * mean, rel=1e-12)
    assert result["clip_score_w2.5"].item() == pytest.approx(2.5 * mean, rel=1e-12)
    merged = two_ranks(CLIPScore, (images, texts), with_index=False)
    assert merged.compute()["clip_score"].item() == pytest.approx(100 * mean, rel=1e-12)


def scene(**cells: tuple[int, int, int]) -> torch.Tensor:
    """A (9, 3) grid: ``scene(c4=(1, 2, 0))`` puts (shape 1, color 2, size 0) in cell 4."""
    grid = torch.full((9, 3), -1, dtype=torch.long)
    for name, attributes in cells.items():
        grid[int(name[1:])] = torch.tensor(attributes)
    return grid


def test_caption_accuracy_on_hand_built_cases() -> None:
    wanted = torch.stack(
        [
            scene(c0=(0, 1, 2)),  # drawn exactly
            scene(c4=(1, 2, 0), c8=(2, 0, 1)),  # one wrong colour
            scene(c2=(0, 0, 0), c6=(1, 1, 1)),  # one object missing
            scene(c3=(2, 2, 2)),  # one extra object
        ]
    )
    parsed = torch.stack(
        [
            scene(c0=(0, 1, 2)),
            scene(c4=(1, 3, 0), c8=(2, 0, 1)),
            scene(c2=(0, 0, 0)),
            scene(c3=(2, 2, 2), c5=(0, 0, 0)),
        ]
    )
    metric = CaptionAccuracy()
    metric.update(parsed, wanted)
    result = {name: value.item() for name, value in metric.compute().items()}
    objects = 6
    assert result == pytest.approx(
        {
            "exact": 1 / 4,
            "cell": 5 / objects,
            "shape": 5 / objects,
            "color": 4 / objects,
            "size": 5 / objects,
            "extra": 1 / 4,
            "exact_1obj": 1 / 2,  # images 0 (right) and 3 (an extra object)
            "exact_2obj": 0 / 2,  # images 1 and 2
        }
    )
    merged = two_ranks(CaptionAccuracy, (parsed, wanted), with_index=False)
    assert {k: v.item() for k, v in merged.compute().items()} == pytest.approx(result)


def test_caption_accuracy_splits_exact_by_the_number_of_objects() -> None:
    one = scene(c0=(0, 1, 2))
    two = scene(c4=(1, 2, 0), c8=(2, 0, 1))
    metric = CaptionAccuracy()
    metric.update(torch.stack([one, two, two]), torch.stack([one, two, scene(c4=(1, 2, 0))]))
    result = metric.compute()  # the third prompt asks for one object and gets two
    assert result["exact_2obj"].item() == 1.0 and result["exact_1obj"].item() == 0.5
    only_one = CaptionAccuracy()
    only_one.update(one[None], one[None])
    assert "exact_2obj" not in only_one.compute()  # no such prompts: no figure, not NaN
    assert only_one.compute()["exact_1obj"].item() == 1.0


def test_caption_accuracy_rejects_half_empty_cells() -> None:
    bad = scene(c1=(0, 0, 0)).unsqueeze(0)
    bad[0, 1, 2] = -1
    with pytest.raises(ValueError, match=r"parsed\[0, 1\]"):
        CaptionAccuracy().update(bad, scene(c1=(0, 0, 0)).unsqueeze(0))


# ---------------------------------------------------------------------------------------------
# reconstruction
def images(b: int, c: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, c, size, size, generator=g) - 0.5).mul(1.6)  # in [-0.8, 0.8]


def test_psnr_by_hand_and_of_identical_images() -> None:
    x = images(3, 3, 8, seed=26)
    offset = psnr(x + 0.1, x)  # MSE 0.01 in [-1, 1] = MSE 0.0025 in [0, 1]
    assert offset.tolist() == pytest.approx([10 * math.log10(4 / 0.01)] * 3, rel=1e-6)
    assert offset[0].item() == pytest.approx(10 * math.log10(1 / 0.0025), rel=1e-6)
    assert torch.isinf(psnr(x, x)).all()


def ssim_by_scipy(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 on one [0, 1] image (C, H, W) with scipy's Gaussian filter, valid part."""

    def blur(a):
        return scipy.ndimage.gaussian_filter(a, sigma=1.5, truncate=5 / 1.5)[5:-5, 5:-5]

    maps = []
    for a, b in zip(x, y):
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
        c1, c2 = 0.01**2, 0.03**2
        maps.append(
            (2 * mu_a * mu_b + c1)
            * (2 * cov + c2)
            / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        )
    return float(np.mean(maps))


def test_ssim_matches_scipy_and_the_interior_of_torchmetrics() -> None:
    x = images(2, 3, 20, seed=27)
    y = (x + images(2, 3, 20, seed=28)).clamp(-1, 1)
    ours = ssim(x, y)
    unit_x, unit_y = (x.double() + 1) / 2, (y.double() + 1) / 2
    for i in range(2):
        assert ours[i].item() == pytest.approx(
            ssim_by_scipy(unit_x[i].numpy(), unit_y[i].numpy()), rel=1e-10
        )
    _, full_map = structural_similarity_index_measure(
        unit_x, unit_y, data_range=1.0, reduction="none", return_full_image=True
    )
    interior = full_map[..., 5:-5, 5:-5].flatten(1).mean(1)  # positions away from its padding
    assert ours.tolist() == pytest.approx(interior.tolist(), rel=1e-10)
    assert 0.2 < ours.min() < 0.95
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)


def test_reconstruction_metrics_average_over_images_and_ranks() -> None:
    x = images(5, 1, 12, seed=29)
    y = (x + 0.2 * images(5, 1, 12, seed=30)).clamp(-1, 1)
    metric = ReconstructionMetrics()
    metric.update(y[:2], x[:2])
    metric.update(y[2:], x[2:])
    result = metric.compute()
    assert result["psnr"].item() == pytest.approx(psnr(y, x).mean().item(), rel=1e-12)
    assert result["ssim"].item() == pytest.approx(ssim(y, x).mean().item(), rel=1e-12)
    merged = two_ranks(ReconstructionMetrics, (y, x), with_index=False)
    assert merged.compute()["ssim"].item() == pytest.approx(result["ssim"].item(), rel=1e-12)


def test_codebook_usage_uniform_and_single_code() -> None:
    uniform = CodebookUsage(num_codes=8)
    uniform.update(torch.arange(8).repeat(3, 2).view(6, 8))
    assert uniform.compute()["perplexity"].item() == pytest.approx(8.0, rel=1e-12)
    assert uniform.compute()["usage"].item() == 1.0
    single = CodebookUsage(num_codes=8)
    single.update(torch.full((4, 4), 5))
    assert single.compute() == {"usage": pytest.approx(1 / 8), "perplexity": pytest.approx(1.0)}
    with pytest.raises(ValueError, match=r"in \[0, 8\)"):
        single.update(torch.tensor([8]))


# ---------------------------------------------------------------------------------------------
# feature bank, and bad input
def test_feature_bank_sorts_by_index_across_batches_and_ranks() -> None:
    x = gaussian(30, 4, seed=31).float()
    bank = FeatureBank()
    for batch in ragged_batches(len(x), seed=3):
        bank.update(x[batch], batch)
    assert torch.equal(bank.compute(), x)
    assert torch.equal(two_ranks(FeatureBank, (x,), with_index=True).compute(), x)


def test_feature_bank_names_duplicated_indices() -> None:
    bank = FeatureBank()
    bank.update(torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    bank.update(torch.zeros(2, 2), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=r"more than once \(e\.g\. \[2\]\)"):
        bank.compute()


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (torch.tensor([[0.0, float("nan"), 1.0]]), "NaN"),
        (torch.zeros(4), r"shaped \(N, D\)"),
        (torch.zeros(2, 3, dtype=torch.long), "floating point"),
        (torch.zeros(2, 5), "dimension 5 but 3"),
    ],
)
def test_bad_features_are_rejected_by_every_metric(features: torch.Tensor, message: str) -> None:
    reference = torch.zeros(10, 3)
    with pytest.raises(ValueError, match=message):
        check_features(features, dim=3)
    with pytest.raises(ValueError, match=message):
        FID(reference=reference).update(features)
    index = torch.arange(len(features))
    for metric in (KID(reference=reference), PrecisionRecall(reference=reference)):
        with pytest.raises(ValueError, match=message):
            metric.update(features, index)


def test_reference_dimension_mismatch_after_updates() -> None:
    fid, kid, pr = FID(), KID(), PrecisionRecall()
    fid.update(torch.zeros(2, 3))
    kid.update(torch.zeros(2, 3), torch.arange(2))
    pr.update(torch.zeros(2, 3), torch.arange(2))
    for metric in (fid, kid, pr):
        with pytest.raises(ValueError, match="dimension 4 but 3"):
            metric.set_reference(torch.zeros(5, 4))


@pytest.mark.filterwarnings(NO_UPDATE_WARNING)
@pytest.mark.parametrize(
    ("metric", "message"),
    [
        (FID(reference=torch.randn(5, 2)), "at least 2"),
        (KID(reference=torch.randn(5, 2)), "call update"),
        (PrecisionRecall(reference=torch.randn(5, 2)), "call update"),
        (InceptionScore(), "call update"),
        (FeatureBank(), "call update"),
        (CLIPScore(), "call update"),
        (CaptionAccuracy(), "call update"),
        (ReconstructionMetrics(), "call update"),
        (CodebookUsage(4), "call update"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else "",
)
def test_compute_without_update_is_a_clear_error(metric, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metric.compute()


@pytest.mark.parametrize("metric", [FID(), KID(), PrecisionRecall()], ids=["FID", "KID", "PR"])
def test_compute_without_reference_is_a_clear_error(metric) -> None:
    args = (torch.randn(4, 2),) if isinstance(metric, FID) else (torch.randn(4, 2), torch.arange(4))
    metric.update(*args)
    with pytest.raises(ValueError, match="no reference"):
        metric.compute()
