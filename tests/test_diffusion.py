"""Golden values and properties of the diffusion core (schedules, parametrizations, samplers)."""

import math

import pytest
import torch

from genlab.diffusion.guidance import classifier_free_guidance
from genlab.diffusion.losses import mse_per_sample
from genlab.diffusion.parametrization import q_sample, target, to_x0_eps
from genlab.diffusion.samplers import ddim_sample, ddpm_sample
from genlab.diffusion.schedules import (
    alpha_bar_from_betas,
    cosine_betas,
    linear_betas,
    make_betas,
    sigmoid_betas,
    spaced_timesteps,
)


def test_linear_schedule_matches_ho_et_al():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    # ᾱ_T = ∏(1 - β_t): computed here in closed form from the sum of logs of the linspace
    expected = math.exp(sum(math.log(1 - (1e-4 + i * (0.02 - 1e-4) / 999)) for i in range(1000)))
    assert alpha_bar_from_betas(betas)[-1].item() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(4.0358e-5, rel=1e-3)


def test_cosine_schedule_follows_its_alpha_bar_until_clipping():
    s, steps = 0.008, 1000

    def f(t):
        return math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = cosine_betas(steps, s)
    alpha_bar = alpha_bar_from_betas(betas)
    for t in (0, 10, 500, 900, 990):
        assert alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999)  # clipped at the end (Nichol & Dhariwal)
    assert betas[-1].item() == pytest.approx(0.999)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_schedules_are_monotone_and_in_range(name):
    alpha_bar = alpha_bar_from_betas(make_betas(name, 1000))
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()
    assert 0.99 < alpha_bar[0] < 1 and alpha_bar[-1] < 1e-3


def test_sigmoid_schedule_starts_near_one():
    assert alpha_bar_from_betas(sigmoid_betas(1000))[0] > 0.999


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="cosine"):
        make_betas("quadratic", 10)


def test_spaced_timesteps():
    ts = spaced_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0
    assert (ts[1:] < ts[:-1]).all()
    assert spaced_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps=0"):
        spaced_timesteps(1000, 0)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_parametrizations_invert_exactly(prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    alpha_bar = torch.tensor([0.99, 0.5, 0.1, 0.001], dtype=torch.float64)[:, None, None, None]
    x0, eps = x0.double(), eps.double()
    x_t = q_sample(x0, eps, alpha_bar)
    x0_hat, eps_hat = to_x0_eps(prediction, target(prediction, x0, eps, alpha_bar), x_t, alpha_bar)
    torch.testing.assert_close(x0_hat, x0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(eps_hat, eps, atol=1e-9, rtol=1e-9)


def test_v_target_definition():
    x0, eps, ab = torch.tensor(0.5), torch.tensor(-1.0), torch.tensor(0.36)
    assert target("v", x0, eps, ab).item() == pytest.approx(0.6 * -1.0 - 0.8 * 0.5)


def test_mse_is_per_sample():
    pred = torch.zeros(3, 2, 2)
    tgt = torch.stack([torch.zeros(2, 2), torch.ones(2, 2), 2 * torch.ones(2, 2)])
    assert mse_per_sample(pred, tgt).tolist() == [0.0, 1.0, 4.0]


def gaussian_eps_fn(mean: float, std: float, alpha_bar: torch.Tensor):
    """The exact ε-prediction for data ~ N(mean, std²) in every dimension."""

    def eps_fn(x, t):
        a = alpha_bar[t].float()[:, None]
        sa, s1 = a.sqrt(), (1 - a).sqrt()
        x0 = mean + sa * std**2 / (a * std**2 + 1 - a) * (x - sa * mean)  # E[x0 | x_t]
        return (x - sa * x0) / s1

    return eps_fn


@pytest.mark.parametrize(
    "sampler, kwargs, steps",
    [
        (ddim_sample, {"eta": 0.0}, 100),  # the ODE: accurate with few steps
        # ancestral steps from E[x0 | x_t] under-disperse on coarse grids (Bao et al. 2022,
        # Analytic-DPM): std 0.185 instead of 0.2 at 100 steps; exact at the full 1000
        (ddim_sample, {"eta": 1.0}, 1000),
        (ddpm_sample, {}, 1000),
    ],
)
def test_sampler_with_exact_denoiser_recovers_gaussian_data(sampler, kwargs, steps):
    alpha_bar = alpha_bar_from_betas(cosine_betas(1000))
    mean, std = 0.3, 0.2
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4000, 4, generator=g)
    x = sampler(
        gaussian_eps_fn(mean, std, alpha_bar),
        x_T,
        alpha_bar,
        spaced_timesteps(1000, steps),
        clip_x0=False,
        generator=g,
        **kwargs,
    )
    assert x.mean().item() == pytest.approx(mean, abs=0.01)
    assert x.std().item() == pytest.approx(std, abs=0.01)


def test_ddim_eta_one_equals_ddpm_ancestral_small_variance():
    alpha_bar = alpha_bar_from_betas(linear_betas(1000))
    eps_fn = gaussian_eps_fn(0.0, 0.5, alpha_bar)
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    ts = spaced_timesteps(1000, 25)
    a = ddim_sample(eps_fn, x_T, alpha_bar, ts, eta=1.0, generator=torch.Generator().manual_seed(2))
    b = ddpm_sample(eps_fn, x_T, alpha_bar, ts, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ddim_eta_zero_is_deterministic_and_ignores_generator():
    alpha_bar = alpha_bar_from_betas(cosine_betas(1000))
    eps_fn = gaussian_eps_fn(0.0, 0.5, alpha_bar)
    x_T = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    ts = spaced_timesteps(1000, 10)
    a = ddim_sample(eps_fn, x_T, alpha_bar, ts, generator=torch.Generator().manual_seed(2))
    b = ddim_sample(eps_fn, x_T, alpha_bar, ts, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


def test_clipping_keeps_samples_in_range():
    alpha_bar = alpha_bar_from_betas(cosine_betas(1000))
    x_T = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    x = ddim_sample(
        gaussian_eps_fn(0.9, 0.5, alpha_bar), x_T, alpha_bar, spaced_timesteps(1000, 20)
    )
    assert x.abs().max() <= 1.0 + 1e-5


def test_classifier_free_guidance_mixes_one_batched_forward():
    calls = []

    def eps_pair(x2, t2):
        calls.append(x2.shape[0])
        half = x2.shape[0] // 2
        return torch.cat([torch.full_like(x2[:half], 3.0), torch.full_like(x2[half:], 1.0)])

    x, t = torch.zeros(5, 2), torch.zeros(5, dtype=torch.long)
    assert torch.all(classifier_free_guidance(eps_pair, 1.0)(x, t) == 3.0)  # conditional
    assert torch.all(classifier_free_guidance(eps_pair, 0.0)(x, t) == 1.0)  # unconditional
    assert torch.all(classifier_free_guidance(eps_pair, 2.5)(x, t) == 1.0 + 2.5 * 2.0)
    assert calls == [10, 10, 10]
