"""Guidance as wrappers that turn one ``Denoiser`` into another (docs/architecture.md, "The diffusion system").

Each wrapper changes x̂0 or ε̂ and keeps the pair consistent with x_t, so every sampler works
with every combination. Order of composition in the models: classifier-free guidance, then
classifier guidance, then thresholding, then inpainting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

from genlab.diffusion.denoiser import Denoiser, DenoiserOutput, broadcast, with_x0
from genlab.diffusion.parametrization import eps_from_x0

Thresholding = Literal["none", "static", "dynamic"]


def guidance_pair(cond: dict[str, Any], null: dict[str, Any]) -> dict[str, Any]:
    """The network inputs of the batch doubled as [cond; null]: each input concatenated along the
    batch (None stays None). The only place genlab builds the pair, so a negative prompt is only
    another ``null``."""
    if cond.keys() != null.keys():
        raise ValueError(f"conditional inputs {sorted(cond)} and null inputs {sorted(null)} differ")
    return {k: None if v is None else torch.cat([v, null[k].to(v)]) for k, v in cond.items()}


def classifier_free_guidance(
    denoiser_for: Callable[[dict[str, Any]], Denoiser],
    cond: dict[str, Any],
    null: dict[str, Any],
    scale: float,
) -> Denoiser:
    """ε̃ = ε_u + w (ε_c - ε_u) (Ho & Salimans 2022, Eq. 6, with w = 1 + their w).

    ``denoiser_for(inputs)`` is the network as a denoiser for given condition inputs; it is
    evaluated once on the batch doubled as [x; x] with the inputs [cond; null]
    (:func:`guidance_pair`), so both predictions come from one batched forward. x̂0 is mixed the
    same way (it is affine in ε̂ at fixed x_t, so the pair stays consistent). A learned variance
    is taken from the conditional half (Nichol et al. 2022, GLIDE). ``scale = 1`` is the
    conditional model; ``scale = 0`` the one given ``null``.
    """
    pair = denoiser_for(guidance_pair(cond, null))

    def fn(x: torch.Tensor, t: torch.Tensor) -> DenoiserOutput:
        out = pair(torch.cat([x, x]), torch.cat([t, t]))
        (x0_c, x0_u), (eps_c, eps_u) = out.x0.chunk(2), out.eps.chunk(2)
        var_frac = None if out.var_frac is None else out.var_frac.chunk(2)[0]
        return DenoiserOutput(
            x0_u + scale * (x0_c - x0_u), eps_u + scale * (eps_c - eps_u), var_frac
        )

    return pair.wrap(fn)


def thresholded(
    denoiser: Denoiser, kind: Thresholding = "static", percentile: float = 0.995
) -> Denoiser:
    """Keep x̂0 in the data range [-1, 1] at every step, recomputing ε̂ from it.

    * ``static``: clip x̂0 to [-1, 1] (Ho et al. 2020's sampler; Saharia et al. 2022, §2.3).
    * ``dynamic``: per sample, s = max(1, the ``percentile`` quantile of |x̂0|); clip x̂0 to
      [-s, s] and divide by s (Saharia et al. 2022, Imagen, §2.3), which keeps large guidance
      scales from saturating pixels.
    * ``none``: unchanged (e.g. latent diffusion, whose latents have no fixed range).
    """
    if kind == "none":
        return denoiser
    if kind not in ("static", "dynamic"):
        raise ValueError(f"thresholding={kind!r} is not one of ['dynamic', 'none', 'static']")
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"threshold percentile={percentile} must be in (0, 1]")

    def fn(x: torch.Tensor, t: torch.Tensor) -> DenoiserOutput:
        out = denoiser(x, t)
        if kind == "static":
            x0 = out.x0.clamp(-1, 1)
        else:
            s = torch.quantile(out.x0.abs().flatten(1), percentile, dim=1).clamp(min=1.0)
            s = broadcast(s, out.x0)  # (B, 1, 1, 1)
            x0 = torch.maximum(torch.minimum(out.x0, s), -s) / s
        return with_x0(out, x0, x, denoiser.alpha_bar(t, out.x0))

    return denoiser.wrap(fn)


def classifier_guidance(
    denoiser: Denoiser,
    grad_log_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scale: float,
) -> Denoiser:
    """ε̂' = ε̂ - s √(1-ᾱ_t) ∇_{x_t} log p_φ(y | x_t, t) (Dhariwal & Nichol 2021, Alg. 2).

    ``grad_log_prob(x_t, t)`` is the gradient of a noisy classifier's log-probability of the
    wanted labels (``genlab.models.diffusion.noisy_classifier``). The shift of ε̂ adds s ∇ log p to the
    score, so it guides every sampler (for ancestral sampling it is Alg. 1's mean shift up to
    O(β)); x̂0 is recomputed to stay consistent.
    """

    def fn(x: torch.Tensor, t: torch.Tensor) -> DenoiserOutput:
        out = denoiser(x, t)
        alpha_bar = denoiser.alpha_bar(t, out.eps)
        eps = out.eps - scale * (1 - alpha_bar).sqrt() * grad_log_prob(x, t).float()
        x0 = (x.float() - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        return DenoiserOutput(x0, eps, out.var_frac)

    return denoiser.wrap(fn)


def inpainting(denoiser: Denoiser, known: torch.Tensor, mask: torch.Tensor) -> Denoiser:
    """Keep the known region (``mask`` = 1) of ``known`` and generate the rest.

    At every step the known region's x̂0 is replaced by the known image and its ε̂ by the noise
    actually present in x_t there, (x_t - √ᾱ x0)/√(1-ᾱ). Each sampler step then moves the known
    region exactly along the forward process: ancestral steps draw it from q(x_{t-1} | x_t, x0),
    whose marginal is q(x_{t-1} | x0) — the replacement of the known region at each step of Song
    et al. 2021 (score SDE, App. I.2) and Lugmayr et al. 2022 (RePaint, Eq. 8), without a second
    noise draw — and the final sample equals ``known`` there. The unknown region sees a noisy
    version of the known one, which is how it is made to fit.
    """
    mask = mask.float()

    def fn(x: torch.Tensor, t: torch.Tensor) -> DenoiserOutput:
        out = denoiser(x, t)
        alpha_bar = denoiser.alpha_bar(t, out.x0)
        m, x0_known = mask.to(out.x0.device), known.to(out.x0)
        x0 = m * x0_known + (1 - m) * out.x0
        eps = m * eps_from_x0(x0_known, x.float(), alpha_bar) + (1 - m) * out.eps
        return DenoiserOutput(x0, eps, out.var_frac)

    return denoiser.wrap(fn)
