"""Noise schedules as small pure functions in float64 (STYLE.md 4), and the ``Schedule`` that
turns one into ᾱ at any model time.

Notation (Ho et al. 2020): β_t the variance added at step t (t = 0..T-1 here, the paper's
t = 1..T), α_t = 1 - β_t, ᾱ_t = ∏_{s≤t} α_s ("alpha_bar"), so x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε.
The log signal-to-noise ratio is λ = log(ᾱ / (1 - ᾱ)) (Kingma et al. 2021, VDM). Karras et al.
2022 write the same noise level as σ = √((1-ᾱ)/ᾱ) = exp(-λ/2), the noise std of x_t / √ᾱ_t.

Model time: a discrete schedule has T steps t = 0..T-1; a continuous one (for cascades, Imagen;
Kingma et al. 2021) accepts any real t in (-1, T-1], where τ = (t + 1)/T ∈ (0, 1] is the fraction
of the diffusion, so both kinds share one time axis, one network input range and one sampling
grid: discrete step t is the end of the continuous interval τ = (t + 1)/T (Eq. 17 of Nichol &
Dhariwal 2021 defines β_t that way).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

ScheduleName = Literal["linear", "cosine", "sigmoid"]
Spacing = Literal["linspace", "trailing", "karras"]

LOG_SNR_LIMIT = 20.0  # continuous schedules clip λ to [-20, 20]: ᾱ from 2e-9 to 1 - 2e-9


# ---------------------------------------------------------------------------------------------
# discrete β schedules
def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """β rising linearly from 1e-4 to 0.02, scaled to keep the T=1000 shape (Ho et al. 2020, §4)."""
    scale = 1000.0 / num_steps
    if scale * beta_end >= 1.0:  # β ≥ 1 would make ᾱ ≤ 0
        raise ValueError(
            f"num_timesteps={num_steps} is too few for the linear schedule: its last β would be "
            f"{scale * beta_end:g} (must be < 1; use at least {math.floor(1000 * beta_end) + 1})"
        )
    return torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64)


def betas_for_alpha_bar(
    alpha_bar: Callable[[float], float], num_steps: int, max_beta: float = 0.999
) -> torch.Tensor:
    """β_t = 1 - ᾱ((t+1)/T) / ᾱ(t/T), clipped at ``max_beta`` (Nichol & Dhariwal 2021, Eq. 17)."""
    betas = [
        min(1.0 - alpha_bar((t + 1) / num_steps) / alpha_bar(t / num_steps), max_beta)
        for t in range(num_steps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def cosine_alpha_bar(tau: float, s: float = 0.008) -> float:
    """ᾱ(τ) = f(τ)/f(0), f(τ) = cos²((τ + s)/(1 + s) · π/2) (Nichol & Dhariwal 2021, Eq. 17)."""
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return math.cos((tau + s) / (1 + s) * math.pi / 2) ** 2 / f0


def cosine_betas(num_steps: int, s: float = 0.008) -> torch.Tensor:
    """The cosine schedule's β (Nichol & Dhariwal 2021, Eq. 17), clipped at 0.999."""
    return betas_for_alpha_bar(lambda tau: cosine_alpha_bar(tau, s), num_steps)


def sigmoid_alpha_bar(
    tau: float, start: float = -3.0, end: float = 3.0, tau_: float = 1.0
) -> float:
    """ᾱ(τ) = (σ(end/τ') - σ((start + τ(end - start))/τ')) / (σ(end/τ') - σ(start/τ')), the
    sigmoid schedule of Jabri et al. 2023 (RIN), Alg. 1 (τ' its temperature)."""

    def sigmoid(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-z))

    v_start, v_end = sigmoid(start / tau_), sigmoid(end / tau_)
    return (v_end - sigmoid((tau * (end - start) + start) / tau_)) / (v_end - v_start)


def sigmoid_betas(
    num_steps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0
) -> torch.Tensor:
    """The sigmoid schedule's β by Eq. 17 of Nichol & Dhariwal 2021."""
    return betas_for_alpha_bar(
        lambda t: max(sigmoid_alpha_bar(t, start, end, tau), 1e-12), num_steps
    )


def make_betas(name: ScheduleName, num_steps: int) -> torch.Tensor:
    """The named schedule's β_0..β_{T-1}, float64."""
    schedules = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}
    if name not in schedules:
        raise ValueError(f"schedule={name!r} is not one of {sorted(schedules)}")
    return schedules[name](num_steps)


def alpha_bar_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 - β_s), float64."""
    return torch.cumprod(1.0 - betas.double(), dim=0)


def respaced_betas(alpha_bar: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """β'_k = 1 - ᾱ_{t_k} / ᾱ_{t_{k-1}} of a model trained with ᾱ, run on the ascending
    subsequence ``timesteps`` (improved-diffusion's respacing, Nichol & Dhariwal 2021, §4).

    The respaced process has the same ᾱ at every kept step, so the trained network applies
    unchanged; with every step kept, β' is the original β.
    """
    kept = alpha_bar.double()[timesteps.long()]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), kept[:-1]])
    return 1.0 - kept / previous


# ---------------------------------------------------------------------------------------------
# continuous log-SNR schedules, λ(τ) for τ ∈ [0, 1]
def log_snr_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """λ = log ᾱ - log(1 - ᾱ)."""
    alpha_bar = alpha_bar.double()
    return alpha_bar.log() - (-alpha_bar).log1p()


def linear_log_snr(tau: torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0):
    """λ(τ) of the continuous limit of the linear schedule, the VP SDE of Song et al. 2021
    (Eq. 29 of their App. B): ᾱ(τ) = exp(-β_min τ - (β_max - β_min) τ²/2), so
    λ = -log(expm1(β_min τ + (β_max - β_min) τ²/2))."""
    integral = beta_min * tau + 0.5 * (beta_max - beta_min) * tau**2
    return -torch.special.expm1(integral.double()).log()


def cosine_log_snr(tau: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """λ(τ) of the cosine schedule taken in continuous time: ᾱ(τ) of ``cosine_alpha_bar``
    without the discrete schedule's clipping of β."""
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    alpha_bar = torch.cos((tau.double() + s) / (1 + s) * math.pi / 2) ** 2 / f0
    return log_snr_from_alpha_bar(alpha_bar.clamp(1e-30, 1.0))


def sigmoid_log_snr(tau: torch.Tensor, start: float = -3.0, end: float = 3.0, tau_: float = 1.0):
    """λ(τ) of the sigmoid schedule (Jabri et al. 2023) in continuous time."""
    v_start, v_end = torch.tensor([start / tau_, end / tau_], dtype=torch.float64).sigmoid()
    alpha_bar = (v_end - ((tau.double() * (end - start) + start) / tau_).sigmoid()) / (
        v_end - v_start
    )
    return log_snr_from_alpha_bar(alpha_bar.clamp(1e-30, 1.0))


LOG_SNR_FUNCTIONS = {"linear": linear_log_snr, "cosine": cosine_log_snr, "sigmoid": sigmoid_log_snr}


# ---------------------------------------------------------------------------------------------
# sampling grids
def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0):
    """σ_i = (σ_max^(1/ρ) + i/(N-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, i = 0..N-1
    (Karras et al. 2022, Eq. 5), float64, descending."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class Schedule:
    """ᾱ(t) at any model time t, for training and for every sampler.

    Args:
        name: ``linear`` (Ho et al. 2020), ``cosine`` (Nichol & Dhariwal 2021) or ``sigmoid``
            (Jabri et al. 2023).
        num_timesteps: T, the number of training steps (discrete) or the time scale
            (continuous: τ = (t + 1)/T).
        continuous: draw real training times and take ᾱ from the schedule's continuous λ(τ)
            (clipped to ±20) instead of the T-step β table.
        log_snr_shift: added to λ everywhere, e.g. 2 log(64/d) to give a d-pixel model the
            noise levels a 64-pixel one sees (Hoogeboom et al. 2023, "simple diffusion", §3.1).

    Between integer steps of a discrete schedule λ is interpolated linearly, so samplers on
    Karras grids may evaluate the network at fractional t, exactly as at integer t elsewhere.
    """

    def __init__(
        self,
        name: ScheduleName = "cosine",
        num_timesteps: int = 1000,
        *,
        continuous: bool = False,
        log_snr_shift: float = 0.0,
    ):
        if name not in LOG_SNR_FUNCTIONS:
            raise ValueError(f"schedule={name!r} is not one of {sorted(LOG_SNR_FUNCTIONS)}")
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps={num_timesteps} must be at least 1")
        self.name, self.num_timesteps = name, num_timesteps
        self.continuous, self.log_snr_shift = continuous, log_snr_shift
        if continuous:
            tau = (torch.arange(num_timesteps, dtype=torch.float64) + 1) / num_timesteps
            table = self.continuous_log_snr(tau)
        else:
            table = log_snr_from_alpha_bar(alpha_bar_from_betas(make_betas(name, num_timesteps)))
            table = table + log_snr_shift
        self.log_snr_table = table  # λ at t = 0..T-1, float64, decreasing
        if continuous:  # a fine grid of (t, λ) for t_from_log_snr, built once
            self.inverse_t = torch.linspace(
                -1 + 1e-6, num_timesteps - 1, 100 * num_timesteps + 1, dtype=torch.float64
            )
            self.inverse_log_snr = self.log_snr(self.inverse_t)
        else:
            self.inverse_t = torch.arange(num_timesteps, dtype=torch.float64)
            self.inverse_log_snr = table

    def __repr__(self) -> str:
        kind = "continuous" if self.continuous else "discrete"
        return (
            f"Schedule({self.name!r}, T={self.num_timesteps}, {kind}, shift={self.log_snr_shift})"
        )

    def continuous_log_snr(self, tau: torch.Tensor) -> torch.Tensor:
        lam = LOG_SNR_FUNCTIONS[self.name](tau.double()) + self.log_snr_shift
        return lam.clamp(-LOG_SNR_LIMIT, LOG_SNR_LIMIT)

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """λ(t), float64, for model times t of any shape."""
        t = torch.as_tensor(t).double().cpu()
        if self.continuous:
            return self.continuous_log_snr((t + 1) / self.num_timesteps)
        t = t.clamp(0, self.num_timesteps - 1)
        if self.num_timesteps == 1:
            return self.log_snr_table[torch.zeros_like(t, dtype=torch.long)]
        lo = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - lo  # 0 at integer t (and 1 at t = T-1): the table's value exactly
        return (1 - w) * self.log_snr_table[lo] + w * self.log_snr_table[lo + 1]

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ(t) = sigmoid(λ(t)), float64 on the CPU (exactly the β table's ᾱ at integer t)."""
        return self.log_snr(t).sigmoid()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t) = √((1-ᾱ)/ᾱ) = exp(-λ/2) (Karras et al. 2022)."""
        return (-0.5 * self.log_snr(t)).exp()

    def t_from_log_snr(self, log_snr: torch.Tensor) -> torch.Tensor:
        """The model time with λ(t) = ``log_snr`` (inverse by interpolation on a fine grid;
        clamped to the schedule's range), float64."""
        grid_t, grid_lam = self.inverse_t, self.inverse_log_snr
        lam = torch.as_tensor(log_snr).double().clamp(grid_lam.min(), grid_lam.max())
        # λ decreases with t: search on -λ, which increases
        idx = torch.searchsorted(-grid_lam, -lam).clamp(1, len(grid_t) - 1)
        lam_hi, lam_lo = grid_lam[idx - 1], grid_lam[idx]
        gap = lam_hi - lam_lo
        w = torch.where(gap > 0, (lam_hi - lam) / gap.clamp(min=1e-300), torch.zeros_like(gap))
        return grid_t[idx - 1] + w * (grid_t[idx] - grid_t[idx - 1])

    def check_same(self, other: Schedule, what: str) -> None:
        """Raise a ``ValueError`` unless ``other`` (a diffusion model's) is this schedule, which
        ``what`` (a guide: a noisy classifier, a noise-aware CLIP) was trained on: the same
        name, T, time kind and log-SNR shift; else the guide would read t wrongly."""
        fields = ("name", "num_timesteps", "continuous", "log_snr_shift")
        differ = [
            f"{f}: {what} {getattr(self, f)!r}, diffusion model {getattr(other, f)!r}"
            for f in fields
            if getattr(self, f) != getattr(other, f)
        ]
        if differ:
            raise ValueError(
                f"the {what} was trained on another noise schedule than the diffusion model it "
                "should guide, so it would read t wrongly (" + "; ".join(differ) + "): train it "
                "with the diffusion model's model.schedule / num_timesteps / continuous_time / "
                "log_snr_shift"
            )

    def sample_t(self, n: int, *, generator=None, device=None) -> torch.Tensor:
        """Training times: uniform integers in [0, T) or, continuous, uniform τ ∈ (0, 1]."""
        if self.continuous:
            u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
            return ((1 - u) * self.num_timesteps - 1).float()
        return torch.randint(0, self.num_timesteps, (n,), generator=generator, device=device)

    def timesteps(
        self,
        steps: int,
        spacing: Spacing = "linspace",
        *,
        rho: float = 7.0,
        sigma_max: float = 80.0,
    ):
        """A descending sampling grid of ``steps`` model times (float64); samplers step from
        each to the next and from the last to clean data (ᾱ = 1).

        * ``linspace``: evenly from T-1 to 0 (rounded to integers for a discrete schedule);
          with steps = T it is every training step (the "respacing" of Nichol & Dhariwal 2021).
        * ``trailing``: t_i = T - i T/steps - 1, i = 0..steps-1 (Lin et al. 2024, Table 2).
        * ``karras``: σ evenly in σ^(1/ρ) from min(σ(T-1), ``sigma_max``) to σ(0) (Karras et
          al. 2022, Eq. 5, ρ = 7, σ_max = 80), at fractional t. The cap matters for the cosine
          schedule, whose σ(T-1) ≈ 2·10⁴ would spend most steps on pure noise.
        """
        T = self.num_timesteps
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1")
        if not self.continuous and spacing != "karras" and steps > T:
            raise ValueError(
                f"steps={steps} exceeds the {T} training steps of this discrete schedule "
                "(use spacing=karras or fewer steps)"
            )
        if spacing == "linspace":
            ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64)
        elif spacing == "trailing":
            ts = T - torch.arange(steps, dtype=torch.float64) * T / steps - 1
        elif spacing == "karras":
            top = self.sigma(T - 1).item()
            sigmas = karras_sigmas(self.sigma(0).item(), min(top, sigma_max), steps, rho)
            ts = self.t_from_log_snr(-2 * sigmas.log())
            if top <= sigma_max:
                ts[0] = T - 1  # exact ends despite the interpolated inverse
            if steps > 1:
                ts[-1] = 0.0
            return ts
        else:
            raise ValueError(
                f"spacing={spacing!r} is not one of ['karras', 'linspace', 'trailing']"
            )
        return ts if self.continuous else ts.round()
