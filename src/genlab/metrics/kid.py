"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs").

KID is the squared maximum mean discrepancy between real features x and generated features y
under the polynomial kernel k(x, y) = (γ xᵀy + c₀)^d, with d = 3, γ = 1/D and c₀ = 1 by default.
It is estimated without bias on m real and m generated samples — the within-set sums leave out
i = j, the cross term averages all m² pairs (the estimator of the authors' code, torch-fidelity
and torchmetrics):

    MMD²_u = Σ_{i≠j} k(xᵢ, xⱼ) / (m(m-1)) + Σ_{i≠j} k(yᵢ, yⱼ) / (m(m-1)) - 2 Σ_{i,j} k(xᵢ, yⱼ) / m².

**Paired sets.** When generated item i is made *for* real item i — an image for the reference
item's caption, a reconstruction of it, the same scene drawn again — the pairs (xᵢ, yᵢ) are
dependent, and the estimator above is biased low: its cross term includes the k(xᵢ, yᵢ) of
matched pairs (a real-vs-real KID comes out clearly negative). With ``paired=True`` both subsets
take the same indices and the cross term leaves out i = j too: the U-statistic of Gretton et al.
2012 (JMLR, Eq. 3),

    MMD²_u = Σ_{i≠j} [k(xᵢ, xⱼ) + k(yᵢ, yⱼ) - k(xᵢ, yⱼ) - k(xⱼ, yᵢ)] / (m(m-1)),

which is unbiased whenever the pairs are independent of each other, matched or not.

It is averaged over ``subsets`` random subsets of ``subset_size`` samples from each set; the
standard deviation over subsets (ddof 0, as torch-fidelity) comes with it. A subset of all N
samples would make every subset the same set and the std 0, so the metrics protocol takes
subsets of at most half the samples (:func:`subset_size_for`). The subsets are drawn
by a ``torch.Generator`` seeded with ``seed``, from the samples in the order of their global
index, so the result is reproducible and independent of batching and of the number of ranks.
Kernels are computed in float64.
"""

from __future__ import annotations

import warnings

import torch

from genlab.metrics.feature_bank import ReferenceMetric, check_features


def polynomial_kernel(
    x: torch.Tensor, y: torch.Tensor, *, degree: int, gamma: float, coef0: float
) -> torch.Tensor:
    """k(xᵢ, yⱼ) = (γ xᵢᵀyⱼ + c₀)^d for all pairs: ``(M, D), (N, D) -> (M, N)``."""
    return (gamma * (x @ y.T) + coef0) ** degree


def mmd2_unbiased(k_xx: torch.Tensor, k_yy: torch.Tensor, k_xy: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² from the three ``(m, m)`` kernel matrices (module docstring)."""
    m = len(k_xx)
    within = (k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()) / (m * (m - 1))
    return within - 2 * k_xy.mean()


def mmd2_paired(k_xx: torch.Tensor, k_yy: torch.Tensor, k_xy: torch.Tensor) -> torch.Tensor:
    """Gretton et al.'s U-statistic MMD²_u of m matched pairs (module docstring): the unbiased
    estimate with every i = j term left out, the matched cross pairs included."""
    m = len(k_xx)
    off = k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()
    return (off - 2 * (k_xy.sum() - k_xy.trace())) / (m * (m - 1))


def subset_size_for(n: int, wanted: int) -> int:
    """KID's subset size for sets of n samples: ``wanted``, but at most n // 2 (at least 2), so
    that subsets differ and their standard deviation means something."""
    return max(2, min(wanted, n // 2))


def kernel_inception_distance(
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
    paired: bool = False,
) -> tuple[float, float]:
    """KID of Bińkowski et al. 2018: mean and std over subsets of the unbiased MMD².

    Args:
        real: real features ``(N_real, D)``.
        fake: generated features ``(N_fake, D)``, in a fixed order (e.g. by global index).
        subsets: number of random subsets.
        subset_size: samples per subset from each set; clipped, with a warning, to
            ``min(N_real, N_fake)``.
        degree: d of the polynomial kernel.
        gamma: γ of the kernel; default 1/D.
        coef0: c₀ of the kernel.
        seed: seed of the ``torch.Generator`` that draws the subsets.
        paired: fake item i was made for real item i (same number of each): the subsets take
            the same indices from both, and the estimate is :func:`mmd2_paired`.

    Returns:
        (mean, std) of MMD² over the subsets.
    """
    check_features(real, "real features")
    check_features(fake, "fake features", dim=real.shape[1])
    if subsets < 1:
        raise ValueError(f"KID needs at least one subset, got subsets={subsets}")
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(real)} and {len(fake)}")
    if m < subset_size:
        warnings.warn(
            f"KID subset_size={subset_size} clipped to {m}, the smaller set's size", stacklevel=2
        )
    if paired and len(real) != len(fake):
        raise ValueError(
            f"paired KID needs as many fake as real samples, got {len(fake)} and {len(real)}"
        )
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    kernel = {"degree": degree, "gamma": gamma, "coef0": coef0}
    generator = torch.Generator().manual_seed(seed)
    mmd2 = torch.empty(subsets, dtype=torch.float64)
    for s in range(subsets):
        rows = torch.randperm(len(real), generator=generator)[:m]
        columns = rows if paired else torch.randperm(len(fake), generator=generator)[:m]
        x, y = real[rows.to(real.device)].double(), fake[columns.to(fake.device)].double()
        k_xx, k_yy = polynomial_kernel(x, x, **kernel), polynomial_kernel(y, y, **kernel)
        estimate = mmd2_paired if paired else mmd2_unbiased
        mmd2[s] = estimate(k_xx, k_yy, polynomial_kernel(x, y, **kernel))
    return mmd2.mean().item(), mmd2.std(correction=0).item()


class KID(ReferenceMetric):
    """Kernel Inception Distance (Bińkowski et al. 2018) of generated features to a reference.

    ``update(features, index)`` gathers the generated features with their global item index
    (``cat`` states); ``compute`` sorts them by index and returns (mean, std) of
    :func:`kernel_inception_distance` as float64 scalars. The reference features are not a state:
    every rank gets all of them with ``reference=`` or ``set_reference``. ``paired``: generated
    item i was made for reference item i (see the module docstring).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(
        self,
        reference: torch.Tensor | None = None,
        *,
        subsets: int = 100,
        subset_size: int = 1000,
        degree: int = 3,
        gamma: float | None = None,
        coef0: float = 1.0,
        seed: int = 0,
        paired: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(reference, **kwargs)
        self.kid_kwargs = {"subsets": subsets, "subset_size": subset_size, "degree": degree}
        self.kid_kwargs |= {"gamma": gamma, "coef0": coef0, "seed": seed, "paired": paired}

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of KID over the subsets, float64 scalars."""
        real, fake = self.pair()
        mean, std = kernel_inception_distance(real, fake, **self.kid_kwargs)
        as_tensor = {"dtype": torch.float64, "device": self.device}
        return torch.tensor(mean, **as_tensor), torch.tensor(std, **as_tensor)
