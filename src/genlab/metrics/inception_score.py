"""Inception Score (Salimans et al. 2016, §4): IS = exp(E_x KL(p(y|x) ‖ p(y))).

p(y|x) are a classifier's class probabilities for each generated image (Inception-v3 for the
standard IS, the shapes oracle offline) and p(y) their mean over the images of a split. The
samples are cut into ``splits`` consecutive splits in the given order — rows
[i·N // splits, (i+1)·N // splits) — and the mean and std (ddof 0) of the per-split scores are
reported, as torch-fidelity's ``isc_features_to_metric(..., shuffle=False)``. The metric class
orders the samples by their global index first, so the result does not depend on batching or
on the number of ranks. Computed in float64; 0·log 0 = 0.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from genlab.metrics.feature_bank import check_features, check_index, sort_by_index, state_dim

SUM_TOLERANCE = 1e-3  # rows of float32/bf16 softmax outputs sum to 1 within this


def check_probabilities(probs: torch.Tensor, name: str = "probs") -> None:
    """Check class probabilities ``(N, K)``: finite, non-negative rows that sum to 1."""
    check_features(probs, name)
    if len(probs) and probs.min() < 0:
        raise ValueError(
            f"{name} must be class probabilities (e.g. a softmax, not logits);"
            f" got a negative value {probs.min().item():.6g}"
        )
    sums = probs.double().sum(dim=1)
    off = (sums - 1).abs() > SUM_TOLERANCE
    if off.any():
        raise ValueError(
            f"{name} rows must sum to 1 (class probabilities, e.g. a softmax, not logits);"
            f" row {off.nonzero()[0].item()} sums to {sums[off][0].item():.6g}"
        )


def split_score(probs: torch.Tensor) -> torch.Tensor:
    """exp(mean_x KL(p(y|x) ‖ p(y))) of one split ``(n, K)`` of float64 probabilities."""
    marginal = probs.mean(dim=0, keepdim=True)  # p(y), (1, K)
    kl = (torch.xlogy(probs, probs) - torch.xlogy(probs, marginal)).sum(dim=1)  # (n,)
    return kl.mean().exp()


def inception_score(probs: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score of Salimans et al. 2016: mean and std over consecutive splits.

    Args:
        probs: class probabilities p(y|x) ``(N, K)``, in a fixed order.
        splits: number of splits, each of N // splits or N // splits + 1 samples.

    Returns:
        (mean, std) of the per-split scores.
    """
    check_probabilities(probs)
    n = len(probs)
    if not 1 <= splits <= n:
        raise ValueError(f"splits={splits} must be between 1 and the number of samples {n}")
    probs = probs.double()
    bounds = [i * n // splits for i in range(splits + 1)]
    scores = torch.stack([split_score(probs[a:b]) for a, b in zip(bounds, bounds[1:])])
    return scores.mean().item(), scores.std(correction=0).item()


class InceptionScore(Metric):
    """Inception Score (Salimans et al. 2016) of generated samples' class probabilities.

    ``update(probs, index)`` gathers p(y|x) ``(B, K)`` with the global item index (``cat``
    states); ``compute`` sorts by index and returns (mean, std) of :func:`inception_score` as
    float64 scalars.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, splits: int = 10, **kwargs) -> None:
        super().__init__(**kwargs)
        self.splits = splits
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, index: torch.Tensor) -> None:
        """Add class probabilities ``(B, K)`` of the items ``index`` ``(B,)``."""
        check_features(probs, "probs", dim=state_dim(self.probs))
        check_probabilities(probs)
        check_index(index, len(probs))
        self.probs.append(probs.detach())
        self.index.append(index.detach().long())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the Inception Score over the splits, float64 scalars."""
        mean, std = inception_score(sort_by_index(self.probs, self.index), self.splits)
        as_tensor = {"dtype": torch.float64, "device": self.device}
        return torch.tensor(mean, **as_tensor), torch.tensor(std, **as_tensor)
