"""Diffusion losses, each returning one value per sample (STYLE.md 5).

* ``mse_per_sample``: L_simple of Ho et al. 2020 (Eq. 14) for whichever target the network
  predicts (ε, v or x0);
* ``min_snr_weight``: min-SNR-γ weighting (Hang et al. 2023) expressed for each target;
* ``vlb_term_bits``: one term L_t of the variational bound (Ho et al. 2020, Eq. 5), used with a
  stop-gradient on the mean by the hybrid loss of Nichol & Dhariwal 2021 (§3.1) to learn the
  variance;
* ``bits_per_dim``: the whole bound, L_T + Σ_t L_t, in bits per dimension, for evaluation.

The bound is defined for a discrete schedule (T steps) and 8-bit data scaled to [-1, 1]: its
decoder L_0 is the discretized Gaussian of Ho et al. 2020 (Eq. 13), with bins of width 2/255.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from genlab.diffusion.denoiser import Denoiser, broadcast
from genlab.diffusion.parametrization import Prediction, q_sample, snr

FixedVariance = Literal["small", "large"]


def mse_per_sample(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖prediction - target‖² averaged over all but the batch dimension: L_simple, Ho et al. Eq. 14."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def min_snr_weight(alpha_bar: torch.Tensor, prediction: Prediction, gamma: float = 5.0):
    """Per-sample weight w_t with w_t ‖target error‖² = min(SNR_t, γ) ‖x0 error‖² (Hang et al.
    2023, Eq. 9), for the target the network predicts.

    With x_t fixed, the errors of the parametrizations satisfy ‖ε err‖² = SNR ‖x0 err‖² and
    ‖v err‖² = (SNR + 1) ‖x0 err‖², hence w = min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1)
    for v and min(SNR, γ) for x0.
    """
    ratio = snr(alpha_bar.double())
    clipped = ratio.clamp(max=gamma)
    if prediction == "eps":
        weight = clipped / ratio
    elif prediction == "v":
        weight = clipped / (ratio + 1)
    elif prediction == "x0":
        weight = clipped
    else:
        raise ValueError(f"prediction={prediction!r} is not one of ['eps', 'v', 'x0']")
    return weight.float()


# ---------------------------------------------------------------------------------------------
# the variational bound
def normal_kl(mean1, log_var1, mean2, log_var2) -> torch.Tensor:
    """KL(N(mean1, e^log_var1) ‖ N(mean2, e^log_var2)) elementwise, in nats."""
    return 0.5 * (
        -1.0
        + log_var2
        - log_var1
        + (log_var1 - log_var2).exp()
        + (mean1 - mean2).pow(2) * (-log_var2).exp()
    )


def discretized_gaussian_log_likelihood(x, mean, log_scale) -> torch.Tensor:
    """log P(x) of 8-bit data x ∈ [-1, 1] under N(mean, e^(2 log_scale)) integrated over each
    value's bin of width 2/255, the edge bins extended to ±∞ (Ho et al. 2020, Eq. 13); nats."""
    centered, inv_std = x - mean, (-log_scale).exp()
    upper, lower = inv_std * (centered + 1 / 255), inv_std * (centered - 1 / 255)
    log_cdf_upper = torch.special.log_ndtr(upper)  # the bin (-∞, x + 1/255]
    log_sf_lower = torch.special.log_ndtr(-lower)  # the bin [x - 1/255, ∞)
    # P(lower < Z < upper), computed on the side of the tail that keeps its precision
    mass = torch.where(
        centered > 0,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    middle = mass.clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, middle))


def step_log_variances(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log β_t, log β̃_t) of the T-step chain with this ᾱ, float64; β̃_0 = 0 is replaced by β̃_1
    as in improved-diffusion (only the decoder term uses it)."""
    alpha_bar = alpha_bar.double()
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    beta = 1 - alpha_bar / prev
    posterior = beta * (1 - prev) / (1 - alpha_bar)
    if len(posterior) > 1:
        posterior[0] = posterior[1]
    return beta.log(), posterior.log()


def posterior_mean(x0, x_t, alpha_bar_t, alpha_bar_prev):
    """μ̃_t(x_t, x0) of q(x_{t-1} | x_t, x0) (Ho et al. 2020, Eq. 7)."""
    beta = 1 - alpha_bar_t / alpha_bar_prev
    return (alpha_bar_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - alpha_bar_prev) * x_t) / (
        1 - alpha_bar_t
    )


def vlb_term_bits(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    model_x0: torch.Tensor,
    alpha_bar: torch.Tensor,
    *,
    var_frac: torch.Tensor | None = None,
    variance: FixedVariance = "small",
) -> torch.Tensor:
    """L_t per sample in bits per dimension (Ho et al. 2020, Eq. 5; t = 0 here is their t = 1).

    For t ≥ 1: KL(q(x_{t-1} | x_t, x0) ‖ p(x_{t-1} | x_t)), p's mean the posterior mean at the
    model's x̂0 and its variance fixed (β̃_t "small", β_t "large") or learned (``var_frac`` f:
    log Σ = f log β_t + (1-f) log β̃_t, Nichol & Dhariwal 2021, Eq. 15). For t = 0: the decoder's
    -log p(x0 | x_1) under the discretized Gaussian. ``alpha_bar`` is the T-step table.
    """
    log_beta, log_posterior = (v[t.long().cpu()] for v in step_log_variances(alpha_bar))
    log_beta, log_posterior = broadcast(log_beta, x0), broadcast(log_posterior, x0)
    table = alpha_bar.double()
    ab_t = broadcast(table[t.long().cpu()], x0)
    ab_prev = broadcast(torch.where(t.cpu() > 0, table[(t.long().cpu() - 1).clamp(min=0)], 1.0), x0)
    if var_frac is not None:
        model_log_var = var_frac * log_beta + (1 - var_frac) * log_posterior
    else:
        model_log_var = (log_posterior if variance == "small" else log_beta).expand_as(x0)
    true_mean = posterior_mean(x0, x_t, ab_t, ab_prev)
    model_mean = posterior_mean(model_x0, x_t, ab_t, ab_prev)
    kl = normal_kl(true_mean, log_posterior, model_mean, model_log_var).flatten(1).mean(1)
    decoder = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    nats = torch.where(t.to(x0.device) == 0, decoder.flatten(1).mean(1), kl)
    return nats / math.log(2.0)


def prior_bits(x0: torch.Tensor, alpha_bar_last: float) -> torch.Tensor:
    """L_T = KL(q(x_T | x0) ‖ N(0, I)) per sample, bits per dimension."""
    ab = torch.tensor(alpha_bar_last, dtype=x0.dtype, device=x0.device)
    kl = normal_kl(ab.sqrt() * x0, (1 - ab).log(), torch.zeros_like(x0), torch.zeros_like(x0))
    return kl.flatten(1).mean(1) / math.log(2.0)


@torch.no_grad()
def bits_per_dim(
    denoiser: Denoiser,
    x0: torch.Tensor,
    *,
    variance: FixedVariance = "small",
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """The variational bound L_T + Σ_{t<T} L_t of each sample, in bits per dimension: an upper
    bound on -log₂ p(x0)/D (Ho et al. 2020, Eq. 5; Nichol & Dhariwal 2021, Table 2). Each term
    uses its own noise draw; it costs T network evaluations per image.

    ``denoiser`` must use a discrete schedule; its learned variance is used when it returns one,
    else the fixed ``variance``. ``generator`` may be a list, one per sample, which makes each
    sample's figure independent of the batch it is in.
    """
    schedule = denoiser.schedule
    if schedule.continuous:
        raise ValueError(
            "bits per dimension needs a discrete schedule (model.continuous_time=false)"
        )
    x0 = x0.float()
    alpha_bar = schedule.alpha_bar(torch.arange(schedule.num_timesteps))
    total = prior_bits(x0, alpha_bar[-1].item())
    for step in range(schedule.num_timesteps):
        t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
        if isinstance(generator, list):
            eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generator])
        else:
            device = x0.device if generator is None else generator.device
            eps = torch.randn(x0.shape, generator=generator, device=device)
        eps = eps.to(x0.device)
        x_t = q_sample(x0, eps, broadcast(alpha_bar[t.cpu()], x0))
        out = denoiser(x_t, t)
        total = total + vlb_term_bits(
            x0, x_t, t, out.x0, alpha_bar, var_frac=out.var_frac, variance=variance
        )
    return total
