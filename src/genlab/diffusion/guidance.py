"""Guidance as wrappers around a noise predictor."""

from __future__ import annotations

from collections.abc import Callable

import torch

from genlab.diffusion.samplers import EpsFn


def classifier_free_guidance(
    eps_fn_pair: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scale: float
) -> EpsFn:
    """ε̃ = ε_u + w (ε_c - ε_u) (Ho & Salimans 2022, Eq. 6, with w = 1 + their w).

    ``eps_fn_pair(x2, t2)`` is evaluated once on the batch doubled as [x; x], whose first half
    the model conditions on the prompts and whose second half on the null condition, so the
    conditional and unconditional predictions come from one batched forward. ``scale = 1`` is
    plain conditional sampling.
    """

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_c, eps_u = eps_fn_pair(torch.cat([x, x]), torch.cat([t, t])).float().chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return guided
