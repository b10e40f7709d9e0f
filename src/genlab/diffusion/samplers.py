"""Samplers as pure functions of (denoiser, x_T, timesteps) (STYLE.md 3).

``denoiser(x_t, t)`` returns x̂0 and ε̂ for a batch at model times t (``genlab.diffusion.
denoiser``) and carries the schedule giving ᾱ(t); ``timesteps`` is a descending grid of model
times (``Schedule.timesteps``); every sampler steps from each grid time to the next and from the
last to clean data (ᾱ = 1), so it runs with any number of steps. Randomness comes only from
``generator``. ``Sampler`` is the configurable choice of one of them (``conf/sampler/``).

Karras et al. 2022 notation for the ODE samplers: σ = √((1-ᾱ)/ᾱ) and x̃ = x_t/√ᾱ = x0 + σ ε,
whose probability-flow ODE is dx̃/dσ = (x̃ - D(x̃; σ))/σ = ε̂.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch

from genlab.diffusion.denoiser import Denoiser, DenoiserOutput
from genlab.diffusion.schedules import Spacing
from genlab.utils import progress

SamplerName = Literal["ddpm", "ddim", "dpmpp_2m", "euler", "heun"]
Variance = Literal["small", "large", "learned"]


def evaluate(denoiser: Denoiser, x: torch.Tensor, t: float) -> DenoiserOutput:
    """The denoiser on the whole batch at one model time."""
    return denoiser(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32))


def noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (a CPU generator
    gives the same samples whatever device x is on)."""
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, device=device).to(x.device)


def levels(denoiser: Denoiser, timesteps: torch.Tensor) -> Iterator[tuple[float, float, float]]:
    """(t, ᾱ_t, ᾱ_next) per step as Python floats (float64), ᾱ_next = 1 after the last."""
    ts = timesteps.double().cpu()
    alpha_bar = denoiser.schedule.alpha_bar(ts).tolist()
    for i, t in enumerate(progress.steps(ts.tolist(), "denoising steps")):
        yield t, alpha_bar[i], alpha_bar[i + 1] if i + 1 < len(ts) else 1.0


def ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    variance: Variance | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ancestral sampling from p(x_prev | x_t) = q(x_prev | x_t, x̂0) (Ho et al. 2020, Alg. 2).

    Posterior mean μ̃ = (√ᾱ_prev β x̂0 + √(1-β)(1-ᾱ_prev) x_t)/(1-ᾱ_t) (Eq. 7), with the step's
    β = 1 - ᾱ_t/ᾱ_prev on a respaced grid (Nichol & Dhariwal 2021, §4). Variance: the posterior's
    β̃ = β (1-ᾱ_prev)/(1-ᾱ_t) ("small"), β ("large"), or the network's interpolation
    exp(f log β + (1-f) log β̃) ("learned", Eq. 15; the default when the denoiser returns one).
    The last step returns the mean, with no noise.
    """
    for t, ab, ab_prev in levels(denoiser, timesteps):
        out = evaluate(denoiser, x, t)
        beta = 1 - ab / ab_prev
        x = (math.sqrt(ab_prev) * beta * out.x0 + math.sqrt(1 - beta) * (1 - ab_prev) * x) / (
            1 - ab
        )
        if ab_prev == 1.0:
            break
        posterior = beta * (1 - ab_prev) / (1 - ab)
        kind = variance or ("small" if out.var_frac is None else "learned")
        if kind == "learned":
            if out.var_frac is None:
                raise ValueError("variance='learned' needs a model trained with learned variance")
            f = out.var_frac
            std = (0.5 * (f * math.log(beta) + (1 - f) * math.log(posterior))).exp()
        else:
            std = math.sqrt(posterior if kind == "small" else beta)
        x = x + std * noise_like(x, generator)
    return x


def ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12): deterministic for η = 0, DDPM-like for η = 1.

    x_prev = √ᾱ_prev x̂0 + √(1 - ᾱ_prev - σ²) ε̂ + σ z,
    σ = η √((1 - ᾱ_prev)/(1 - ᾱ_t)) √(1 - ᾱ_t/ᾱ_prev)   (Eq. 16).
    """
    for t, ab, ab_prev in levels(denoiser, timesteps):
        out = evaluate(denoiser, x, t)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * out.x0 + math.sqrt(max(1 - ab_prev - sigma**2, 0.0)) * out.eps
        if sigma > 0:
            x = x + sigma * noise_like(x, generator)
    return x


def dpm_solver_pp_2m(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022,
    Alg. 2), with λ = log(α/σ), α = √ᾱ, σ = √(1-ᾱ), h = λ_next - λ:

    x_next = (σ_next/σ) x - α_next (e^{-h} - 1) D,  D = (1 + 1/2r) x̂0 - (1/2r) x̂0_prev,
    r = h_prev/h; the first step uses D = x̂0 (first order) and the last, to σ = 0, returns x̂0.
    """
    x0_prev, h_prev = None, None
    for t, ab, ab_next in levels(denoiser, timesteps):
        x0 = evaluate(denoiser, x, t).x0
        if ab_next == 1.0:
            return x0
        h = 0.5 * (math.log(ab_next / (1 - ab_next)) - math.log(ab / (1 - ab)))
        d = x0
        if x0_prev is not None:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = math.sqrt((1 - ab_next) / (1 - ab)) * x - math.sqrt(ab_next) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


def sigma_of(alpha_bar: float) -> float:
    """σ = √((1-ᾱ)/ᾱ) (Karras et al. 2022)."""
    return math.sqrt((1 - alpha_bar) / alpha_bar)


def ode_slope(denoiser: Denoiser, x_tilde: torch.Tensor, t: float, alpha_bar: float):
    """dx̃/dσ = ε̂, evaluated at x_t = √ᾱ x̃."""
    return evaluate(denoiser, math.sqrt(alpha_bar) * x_tilde, t).eps


def euler(denoiser: Denoiser, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Euler steps on the probability-flow ODE in σ (Karras et al. 2022, Alg. 1 without the
    correction): x̃_next = x̃ + (σ_next - σ) ε̂. On the same grid it equals DDIM with η = 0."""
    x_tilde = None
    for t, ab, ab_next in levels(denoiser, timesteps):
        if x_tilde is None:
            x_tilde = x / math.sqrt(ab)
        slope = ode_slope(denoiser, x_tilde, t, ab)
        x_tilde = x_tilde + (sigma_of(ab_next) - sigma_of(ab)) * slope
    return x_tilde


def heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    churn: float = 0.0,
    churn_sigma_min: float = 0.0,
    churn_sigma_max: float = float("inf"),
    churn_noise: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1; with
    ``churn`` > 0 the stochastic sampler of Alg. 2).

    Per step: (Alg. 2 only) raise the noise to σ̂ = σ(1 + γ), γ = min(S_churn/N, √2 - 1) for σ
    in [S_tmin, S_tmax], adding √(σ̂² - σ²) S_noise z; an Euler step to σ_next; then, unless
    σ_next = 0, the trapezoidal correction with the slope there (N steps cost 2N - 1 network
    evaluations).
    """
    schedule, n = denoiser.schedule, len(timesteps)
    x_tilde = None
    grid = list(levels(denoiser, timesteps))
    for i, (t, ab, ab_next) in enumerate(grid):
        if x_tilde is None:
            x_tilde = x / math.sqrt(ab)
        sigma, sigma_next = sigma_of(ab), sigma_of(ab_next)
        gamma = (
            min(churn / n, math.sqrt(2) - 1) if churn_sigma_min <= sigma <= churn_sigma_max else 0
        )
        if gamma > 0:
            t = schedule.t_from_log_snr(torch.tensor(-2 * math.log(sigma * (1 + gamma)))).item()
            ab = schedule.alpha_bar(torch.tensor(t)).item()
            sigma_hat = sigma_of(ab)
            extra = math.sqrt(max(sigma_hat**2 - sigma**2, 0.0)) * churn_noise
            x_tilde, sigma = x_tilde + extra * noise_like(x_tilde, generator), sigma_hat
        slope = ode_slope(denoiser, x_tilde, t, ab)
        x_next = x_tilde + (sigma_next - sigma) * slope
        if ab_next < 1.0:
            t_next = grid[i + 1][0]
            slope_next = ode_slope(denoiser, x_next, t_next, ab_next)
            x_next = x_tilde + (sigma_next - sigma) * 0.5 * (slope + slope_next)
        x_tilde = x_next
    return x_tilde


@dataclass(frozen=True)
class Sampler:
    """A sampler, its number of steps and its options, as chosen in ``conf/sampler/``.

    Args:
        name: ``ddpm`` | ``ddim`` | ``dpmpp_2m`` | ``euler`` | ``heun``.
        steps: number of grid times (network evaluations, except Heun's 2·steps - 1).
        spacing: the grid (``Schedule.timesteps``): ``linspace`` | ``trailing`` | ``karras``;
            None: ``linspace`` for ddpm and ddim, ``karras`` for the ODE solvers (Karras et al.
            2022 found it best for them).
        eta: DDIM's η (0 deterministic, 1 ancestral).
        variance: DDPM's variance, ``small`` | ``large`` | ``learned``; None: the learned one
            when the model has it, else ``small``.
        churn, churn_sigma_min, churn_sigma_max, churn_noise: Heun's S_churn, S_tmin, S_tmax,
            S_noise (Karras et al. 2022, Alg. 2); churn = 0 is the deterministic Alg. 1.
    """

    name: SamplerName = "ddim"
    steps: int = 50
    spacing: Spacing | None = None
    eta: float = 0.0
    variance: Variance | None = None
    churn: float = 0.0
    churn_sigma_min: float = 0.0
    churn_sigma_max: float = float("inf")
    churn_noise: float = 1.0

    def __post_init__(self):
        checks = {
            "name": self.name in SamplerName.__args__,
            "steps": isinstance(self.steps, int) and self.steps >= 1,
            "spacing": self.spacing is None or self.spacing in Spacing.__args__,
            "eta": 0.0 <= self.eta <= 1.0,
            "variance": self.variance is None or self.variance in Variance.__args__,
            "churn": self.churn >= 0.0,
        }
        allowed = {
            "name": f"one of {list(SamplerName.__args__)}",
            "steps": "an integer >= 1",
            "spacing": f"null or one of {list(Spacing.__args__)}",
            "eta": "in [0, 1]",
            "variance": f"null or one of {list(Variance.__args__)}",
            "churn": ">= 0",
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"sampler.{key}={getattr(self, key)!r} must be {allowed[key]}")

    @property
    def grid(self) -> Spacing:
        """The spacing used: the given one or the sampler's default."""
        if self.spacing is not None:
            return self.spacing
        return "linspace" if self.name in ("ddpm", "ddim") else "karras"

    def __str__(self) -> str:
        extra = {"ddim": f", eta={self.eta}", "heun": f", churn={self.churn}"}.get(self.name, "")
        return f"{self.name}-{self.steps} ({self.grid}{extra})"

    def network_evaluations(self) -> int:
        """Network evaluations per image (before classifier-free guidance's doubling)."""
        return 2 * self.steps - 1 if self.name == "heun" else self.steps

    def timesteps(self, schedule, strength: float = 1.0) -> torch.Tensor:
        """The grid this sampler steps through: all ``steps`` times, or for ``strength`` < 1 only
        its last round(strength · steps) (SDEdit, Meng et al. 2022: start from an input noised to
        the first of them; strength 0 keeps no step)."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength} must be in [0, 1]")
        ts = schedule.timesteps(self.steps, self.grid)
        keep = round(strength * self.steps)
        return ts[len(ts) - keep :]

    def __call__(
        self,
        denoiser: Denoiser,
        x_T: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw x_0 from the starting noise ``x_T`` at the first time of ``timesteps`` (the whole
        grid when None; an empty grid returns ``x_T``)."""
        ts = self.timesteps(denoiser.schedule) if timesteps is None else timesteps
        if len(ts) == 0:
            return x_T
        if self.name == "ddpm":
            return ddpm(denoiser, x_T, ts, variance=self.variance, generator=generator)
        if self.name == "ddim":
            return ddim(denoiser, x_T, ts, eta=self.eta, generator=generator)
        if self.name == "dpmpp_2m":
            return dpm_solver_pp_2m(denoiser, x_T, ts)
        if self.name == "euler":
            return euler(denoiser, x_T, ts)
        return heun(
            denoiser,
            x_T,
            ts,
            churn=self.churn,
            churn_sigma_min=self.churn_sigma_min,
            churn_sigma_max=self.churn_sigma_max,
            churn_noise=self.churn_noise,
            generator=generator,
        )


def resolve_sampler(own: Sampler, sampler: Sampler | str | None, steps: int | None) -> Sampler:
    """``own`` (a model's sampler), another sampler, or one by name (that sampler's defaults);
    with ``steps`` replaced if given."""
    if sampler is None:
        sampler = own
    elif isinstance(sampler, str):
        sampler = Sampler(name=sampler) if sampler != own.name else own
    return sampler if steps is None else replace(sampler, steps=steps)
