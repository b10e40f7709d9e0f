"""Improved precision and recall (Kynkäänniemi et al. 2019, §2, Eq. 1–3).

The manifold of a set of features Φ is approximated by the union of balls centred on each of its
points, of radius the distance to that point's k-th nearest neighbour in Φ (itself excluded):

    f(φ, Φ) = 1 if ‖φ - φ'‖ ≤ ‖φ' - NN_k(φ')‖ for at least one φ' ∈ Φ, else 0;
    precision = mean over generated φ_g of f(φ_g, Φ_real);
    recall    = mean over real φ_r of f(φ_r, Φ_fake).

k = 3 as in the paper and torch-fidelity (``prc_neighborhood``). Distances are computed in
float64, ``batch_size`` rows at a time, so memory stays at ``batch_size × N`` distances
(10k × 10k features need no 800 MB matrix).
"""

from __future__ import annotations

import torch

from genlab.metrics.feature_bank import ReferenceMetric, check_features


def knn_radii(features: torch.Tensor, k: int, batch_size: int = 1024) -> torch.Tensor:
    """Distance of each feature ``(N, D)`` to its k-th nearest neighbour among the others ``(N,)``."""
    radii = []
    for start in range(0, len(features), batch_size):
        distances = torch.cdist(features[start : start + batch_size], features)  # (b, N)
        rows = torch.arange(len(distances), device=features.device)
        distances[rows, start + rows] = torch.inf  # a point is not its own neighbour
        radii.append(distances.kthvalue(k, dim=1).values)
    return torch.cat(radii)


def inside_manifold(
    queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int = 1024
) -> torch.Tensor:
    """f(φ, Φ) of Kynkäänniemi et al. Eq. 1 for each query ``(M, D)``: bool ``(M,)``."""
    inside = []
    for batch in queries.split(batch_size):
        inside.append((torch.cdist(batch, centres) <= radii).any(dim=1))  # (b, N) -> (b,)
    return torch.cat(inside)


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, *, k: int = 3, batch_size: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall of Kynkäänniemi et al. 2019 (module docstring).

    Args:
        real: real features ``(N_real, D)``.
        fake: generated features ``(N_fake, D)``.
        k: the neighbour whose distance is each ball's radius.
        batch_size: rows of the distance matrix computed at a time.

    Returns:
        (precision, recall), each in [0, 1].
    """
    check_features(real, "real features")
    check_features(fake, "fake features", dim=real.shape[1])
    if not 0 < k < min(len(real), len(fake)):
        raise ValueError(f"k={k} must be in [1, {min(len(real), len(fake)) - 1}] (set sizes - 1)")
    real, fake = real.double(), fake.double()
    real_radii, fake_radii = knn_radii(real, k, batch_size), knn_radii(fake, k, batch_size)
    precision = inside_manifold(fake, real, real_radii, batch_size).double().mean()
    recall = inside_manifold(real, fake, fake_radii, batch_size).double().mean()
    return precision.item(), recall.item()


class PrecisionRecall(ReferenceMetric):
    """Improved precision and recall (Kynkäänniemi et al. 2019) of generated features.

    ``update(features, index)`` gathers the generated features (``cat`` states; the index only
    catches duplicated items); ``compute`` returns (precision, recall) as float64 scalars. The
    reference features are not a state: every rank gets all of them with ``reference=`` or
    ``set_reference``.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self, reference: torch.Tensor | None = None, *, k: int = 3, batch_size: int = 1024, **kwargs
    ) -> None:
        super().__init__(reference, **kwargs)
        self.k, self.batch_size = k, batch_size

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(precision, recall), float64 scalars."""
        real, fake = self.pair()
        precision, recall = precision_recall(real, fake, k=self.k, batch_size=self.batch_size)
        as_tensor = {"dtype": torch.float64, "device": self.device}
        return torch.tensor(precision, **as_tensor), torch.tensor(recall, **as_tensor)
