"""A feature bank that gathers per-sample features across ranks in a fixed order, and the input
checks that every metric of ``genlab.metrics`` shares.

Under DDP each rank sees a shard of the samples (rank r gets items r, r+W, ...; docs/architecture.md,
"Evaluation protocol"). Metrics whose value depends on the order of the samples (KID's random
subsets, the Inception Score's splits) therefore receive each sample's global item ``index``
and sort by it after the ranks' states are gathered, so that the result does not depend on the
batch size, the batch order or the number of ranks. A duplicated index means that two ranks
(or two batches) produced the same item — a sharding bug — and is an error.

Every rank must call ``update`` at least once before ``compute``: a rank with no items passes
an empty ``(0, D)`` batch, which gives its states the right shape for the gather.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def check_features(features: torch.Tensor, name: str = "features", dim: int | None = None) -> None:
    """Check a batch of feature vectors ``(N, D)``: a 2-D floating-point tensor of finite values.

    Args:
        features: the batch to check (``N`` may be 0).
        name: what the error message calls it.
        dim: the required feature dimension ``D``, if any (e.g. the reference's).

    Raises:
        ValueError: naming the problem and the value found.
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
        raise ValueError(f"{name} must be a tensor shaped (N, D), got {shape}")
    if not features.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {features.dtype}")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(
            f"{name} have dimension {features.shape[1]} but {dim} was expected (the dimension of"
            " the reference or of the features seen so far): were they made by another extractor?"
        )
    if not torch.isfinite(features).all():
        bad = (~torch.isfinite(features)).any(dim=1).nonzero().flatten()
        raise ValueError(f"{name} contain NaN or infinite values (rows {bad[:10].tolist()})")


def check_index(index: torch.Tensor, batch_size: int) -> None:
    """Check global item indices: a 1-D integer tensor of ``batch_size`` non-negative values."""
    if not isinstance(index, torch.Tensor) or index.ndim != 1 or len(index) != batch_size:
        shape = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index)
        raise ValueError(f"index must be a tensor shaped ({batch_size},), got {shape}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"index must be an integer tensor, got dtype {index.dtype}")
    if len(index) and index.min() < 0:
        raise ValueError(f"index must be non-negative, got {index.min().item()}")


def state_dim(features: list[torch.Tensor] | torch.Tensor) -> int | None:
    """The feature dimension ``D`` of a ``cat`` state (a list of ``(B, D)`` tensors, or their
    concatenation after a sync), or None while it is empty."""
    if isinstance(features, torch.Tensor):
        return features.shape[1] if features.ndim == 2 else None
    return features[0].shape[1] if features else None


def sort_by_index(
    features: list[torch.Tensor] | torch.Tensor, index: list[torch.Tensor] | torch.Tensor
) -> torch.Tensor:
    """Concatenate ``cat`` states and return the features ``(N, D)`` in the order of their global
    index.

    Raises:
        ValueError: if there are no features at all, or if an index appears more than once.
    """
    if isinstance(index, list) and not index:
        raise ValueError("no features were given: call update() before compute()")
    features, index = dim_zero_cat(features), dim_zero_cat(index).long()
    order = torch.argsort(index)
    index = index[order]
    duplicated = index[1:][index[1:] == index[:-1]].unique()
    if len(duplicated):
        raise ValueError(
            f"{len(duplicated)} item indices appear more than once (e.g. {duplicated[:10].tolist()}):"
            " the same items were fed twice, by two ranks or two batches — check the sharding"
        )
    return features[order]


class FeatureBank(Metric):
    """Gather per-sample features ``(N, D)`` from all batches and ranks, sorted by global index.

    Used to collect generated features for the order-dependent metrics and to gather the
    reference (real-data) features once, across ranks, before they are cached.
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        """Add a batch of features ``(B, D)`` of the items ``index`` ``(B,)``."""
        check_features(features, dim=state_dim(self.features))
        check_index(index, len(features))
        self.features.append(features.detach())
        self.index.append(index.detach().long())

    def compute(self) -> torch.Tensor:
        """All features ``(N, D)`` in the order of their index, in the dtype they were given."""
        return sort_by_index(self.features, self.index)


class ReferenceMetric(FeatureBank):
    """A metric of generated features against reference (real) features: KID, precision/recall.

    The generated features are gathered as in :class:`FeatureBank`; the reference is not a state:
    every rank gets all of it with ``reference=`` or :meth:`set_reference`, so it is never summed
    or concatenated over ranks. Subclasses compute from :meth:`pair`.
    """

    def __init__(self, reference: torch.Tensor | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.reference = None  # not a buffer: no .half() or .float()
        if reference is not None:
            self.set_reference(reference)

    def set_reference(self, features: torch.Tensor) -> None:
        """Use these real features ``(N_ref, D)`` (all of them, on every rank)."""
        check_features(features, "reference features", dim=state_dim(self.features))
        self.reference = features.detach()

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        """Add generated features ``(B, D)`` of the items ``index`` ``(B,)``."""
        if self.reference is not None:
            check_features(features, dim=self.reference.shape[1])
        super().update(features, index)

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference, generated features sorted by index), on the same device."""
        if self.reference is None:
            name = type(self).__name__
            raise ValueError(f"{name} has no reference: pass reference= or call set_reference()")
        fake = sort_by_index(self.features, self.index)
        return self.reference.to(fake.device), fake
