"""Fréchet distance between feature distributions: FID (Heusel et al. 2017), and rFID.

FID fits a Gaussian N(μ, Σ) to each set of features (Inception-v3 pool features for the standard
FID; the shapes oracle's features offline) and reports the Fréchet (2-Wasserstein) distance
between the two Gaussians (Dowson & Landau 1982; Heusel et al. 2017, Eq. 6):

    d² = ‖μ₁ - μ₂‖² + Tr(Σ₁ + Σ₂ - 2 (Σ₁ Σ₂)^{1/2}).

Σ is the unbiased (N - 1) sample covariance, as in pytorch-fid and torch-fidelity. Everything
is computed in float64. Tr((Σ₁ Σ₂)^{1/2}) is the sum of the square roots of the eigenvalues of
Σ₁ Σ₂, which are those of the symmetric PSD matrix Σ₁^{1/2} Σ₂ Σ₁^{1/2}: a symmetric eigen-
decomposition whose tiny negative round-off eigenvalues are clamped to 0, so PSD input never
gives NaN (no ``sqrtm`` with its complex parts and offset fallback).

rFID, the reconstruction FID of autoencoders, is this same metric with the reconstructions as the
generated set and the original images as the reference.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from genlab.metrics.feature_bank import check_features


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean μ ``(D,)`` and unbiased covariance Σ ``(D, D)`` of features ``(N, D)``, in float64."""
    check_features(features)
    if len(features) < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {len(features)}")
    features = features.double()
    return features.mean(dim=0), torch.cov(features.T)


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric PSD square root of a symmetric matrix, negative eigenvalues clamped to 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂): Heusel et al. 2017, Eq. 6.

    ‖μ₁ - μ₂‖² + Tr(Σ₁) + Tr(Σ₂) - 2 Tr((Σ₁ Σ₂)^{1/2}), in float64. The result can be a
    round-off amount below 0 (about 1e-12 of the features' scale) for identical statistics.
    """
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != 2 * mu1.shape:
        raise ValueError(
            f"statistics do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)},"
            f" sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}"
        )
    sqrt_sigma1 = psd_sqrt(sigma1)
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1  # similar to Σ₁ Σ₂, symmetric PSD
    product = (product + product.T) / 2
    trace_sqrt = torch.linalg.eigvalsh(product).clamp(min=0).sqrt().sum()
    mean_term = (mu1 - mu2).square().sum()
    return float(mean_term + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


class FID(Metric):
    """Fréchet Inception Distance (Heusel et al. 2017) of generated features to a reference.

    ``update`` accumulates Σx, Σxxᵀ and the count in float64 (``sum`` states: the result does not
    depend on batching or on the number of ranks); ``compute`` turns them into μ and the unbiased
    Σ and returns the Fréchet distance to the reference statistics, a float64 scalar.

    The reference is not a state: every rank is given all of it with ``reference=`` or
    ``set_reference`` (features), or ``set_reference_statistics`` (cached μ, Σ). Under DDP every
    rank must have the reference set, or call ``update`` at least once (with an empty ``(0, D)``
    batch if it has no items), before ``compute``.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, reference: torch.Tensor | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reference_mu = self.reference_sigma = None  # not buffers: no .half() or .float()
        self.dim = None
        if reference is not None:
            self.set_reference(reference)

    def set_reference(self, features: torch.Tensor) -> None:
        """Use the statistics of these reference features ``(N_ref, D)`` (all of them, on every
        rank)."""
        check_features(features, "reference features", dim=self.dim)
        self.set_reference_statistics(*feature_statistics(features))

    def set_reference_statistics(self, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        """Use precomputed reference statistics μ ``(D,)``, Σ ``(D, D)`` (e.g. from a cache)."""
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise ValueError(f"expected mu (D,) and sigma (D, D), got {mu.shape}, {sigma.shape}")
        if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
            raise ValueError("reference statistics contain NaN or infinite values")
        if self.dim is not None and len(mu) != self.dim:
            raise ValueError(f"reference dimension {len(mu)} != feature dimension {self.dim}")
        self.add_dim_states(len(mu))
        self.reference_mu, self.reference_sigma = mu.double(), sigma.double()

    def add_dim_states(self, dim: int) -> None:
        """Create the sum states once the feature dimension D is known."""
        if self.dim is not None:
            return
        self.dim = dim
        zeros = {"device": self.device, "dtype": torch.float64}
        self.add_state("feature_sum", torch.zeros(dim, **zeros), dist_reduce_fx="sum")
        self.add_state("outer_sum", torch.zeros(dim, dim, **zeros), dist_reduce_fx="sum")
        self.add_state(
            "num_samples",
            torch.zeros((), dtype=torch.long, device=self.device),
            dist_reduce_fx="sum",
        )

    def update(self, features: torch.Tensor) -> None:
        """Add generated features ``(B, D)``."""
        check_features(features, dim=self.dim)
        self.add_dim_states(features.shape[1])
        x = features.detach().double()
        self.feature_sum += x.sum(dim=0)
        self.outer_sum += x.T @ x  # (D, D)
        self.num_samples += len(x)

    def compute(self) -> torch.Tensor:
        """FID of all generated features (over all ranks) to the reference, float64 scalar."""
        if self.reference_mu is None:
            raise ValueError("FID has no reference: pass reference= or call set_reference()")
        n = int(self.num_samples)
        if n < 2:
            raise ValueError(f"FID needs at least 2 generated feature vectors, got {n}")
        mu = self.feature_sum / n
        sigma = (self.outer_sum - n * torch.outer(mu, mu)) / (n - 1)
        mu_ref, sigma_ref = self.reference_mu.to(mu.device), self.reference_sigma.to(mu.device)
        distance = frechet_distance(mu, sigma, mu_ref, sigma_ref)
        return torch.tensor(distance, dtype=torch.float64, device=self.device)
