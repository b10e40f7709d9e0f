"""Golden values and properties of the diffusion toolbox (``genlab.diffusion``): schedules,
parametrizations, the denoiser interface, losses and the variational bound, samplers, guidance.

Every expected number is computed here from the papers' formulas with Python ``math`` (or plain
tensor arithmetic written out in the test), never by calling the code under test.

Notation (as in the modules): ᾱ the cumulative signal fraction, x_t = √ᾱ x0 + √(1-ᾱ) ε,
λ = log(ᾱ/(1-ᾱ)), σ = √((1-ᾱ)/ᾱ) (Karras et al. 2022), x̃ = x_t/√ᾱ = x0 + σ ε.

The sampler tests use data x0 ~ N(μ, s²) in every dimension, whose exact denoiser is known:
E[x0 | x_t] = μ + √ᾱ s²/(ᾱ s² + 1 - ᾱ) (x_t - √ᾱ μ), the Gaussian posterior mean (Tweedie).
"""

import math

import pytest
import torch

from genlab.diffusion.denoiser import Denoiser, DenoiserOutput, broadcast, from_network, with_x0
from genlab.diffusion.guidance import (
    classifier_free_guidance,
    classifier_guidance,
    guidance_pair,
    inpainting,
    thresholded,
)
from genlab.diffusion.losses import (
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    min_snr_weight,
    mse_per_sample,
    normal_kl,
    prior_bits,
    step_log_variances,
    vlb_term_bits,
)
from genlab.diffusion.parametrization import convert, eps_from_x0, q_sample, snr, target
from genlab.diffusion.samplers import Sampler, ddim, ddpm, dpm_solver_pp_2m, euler, heun
from genlab.diffusion.schedules import (
    Schedule,
    alpha_bar_from_betas,
    cosine_alpha_bar,
    cosine_betas,
    linear_betas,
    make_betas,
    respaced_betas,
    sigmoid_betas,
)

MU, S = 0.3, 0.5  # the Gaussian data of the sampler tests


# ---------------------------------------------------------------------------------------------
# helpers: the paper formulas, written with math
def cosine_f(tau: float, s: float = 0.008) -> float:
    """f(τ) = cos²((τ + s)/(1 + s) · π/2) (Nichol & Dhariwal 2021, Eq. 17)."""
    return math.cos((tau + s) / (1 + s) * math.pi / 2) ** 2


def cosine_alpha_bars(num_steps: int) -> list[float]:
    """ᾱ_t of the discrete cosine schedule: ∏ (1 - β), β_t = min(1 - f((t+1)/T)/f(t/T), 0.999)."""
    alpha_bars, alpha_bar = [], 1.0
    for t in range(num_steps):
        beta = min(1 - cosine_f((t + 1) / num_steps) / cosine_f(t / num_steps), 0.999)
        alpha_bar *= 1 - beta
        alpha_bars.append(alpha_bar)
    return alpha_bars


def phi(z: float) -> float:
    """The standard normal CDF Φ."""
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def gaussian_denoiser(schedule: Schedule, mean: float = MU, std: float = S) -> Denoiser:
    """The exact denoiser of data ~ N(mean, std²) per dimension, in x_t's dtype."""

    def fn(x, t):
        alpha_bar = broadcast(schedule.alpha_bar(t), x)
        gain = alpha_bar.sqrt() * std**2 / (alpha_bar * std**2 + 1 - alpha_bar)
        x0 = mean + gain * (x - alpha_bar.sqrt() * mean)
        return DenoiserOutput(x0, (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt())

    return Denoiser(fn, schedule)


def constant_eps_denoiser(schedule: Schedule, c: float, var_frac: float | None = None):
    """A dummy denoiser with ε̂ ≡ c and the x̂0 = (x_t - √(1-ᾱ) c)/√ᾱ consistent with it."""

    def fn(x, t):
        alpha_bar = broadcast(schedule.alpha_bar(t), x)
        eps = torch.full_like(x, c)
        f = None if var_frac is None else torch.full_like(x, var_frac)
        return DenoiserOutput((x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt(), eps, f)

    return Denoiser(fn, schedule)


def counting(denoiser: Denoiser, calls: list) -> Denoiser:
    """``denoiser`` that appends the batch size of each call to ``calls``."""

    def fn(x, t):
        calls.append(x.shape[0])
        return denoiser(x, t)

    return denoiser.wrap(fn)


def assert_consistent(out: DenoiserOutput, x_t, alpha_bar, atol=1e-5):
    """x_t = √ᾱ x̂0 + √(1-ᾱ) ε̂ (the invariant of every Denoiser)."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    torch.testing.assert_close(a * out.x0 + s * out.eps, x_t, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------
# 1. schedules
def test_linear_schedule_golden_values():
    """β from 1e-4 to 0.02 and ᾱ_999 = ∏(1 - β_i) (Ho et al. 2020, §4)."""
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    expected = math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(1000))
    assert alpha_bar_from_betas(betas)[-1].item() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(4.0358e-5, rel=1e-4)  # the value often quoted for DDPM


def test_linear_schedule_rejects_too_few_steps():
    """Scaled to keep the T=1000 shape, β_end = 20/T: T ≤ 20 would give β ≥ 1 (ᾱ ≤ 0)."""
    assert linear_betas(21).max().item() == pytest.approx(20 / 21)
    with pytest.raises(ValueError, match="num_timesteps=20"):
        linear_betas(20)
    with pytest.raises(ValueError, match="num_timesteps=10"):
        Schedule("linear", 10)


def test_cosine_schedule_golden_values():
    """ᾱ_t = f(t+1)/f(0) until the last β, clipped at 0.999 (Nichol & Dhariwal 2021, Eq. 17)."""
    alpha_bar = alpha_bar_from_betas(cosine_betas(1000))
    for t in (0, 1, 10, 500, 900, 998):
        assert alpha_bar[t].item() == pytest.approx(
            cosine_f((t + 1) / 1000) / cosine_f(0), rel=1e-9
        )
    assert cosine_betas(1000)[-1].item() == pytest.approx(0.999, rel=1e-12)
    assert cosine_betas(1000)[:-1].max().item() < 0.999
    expected_last = cosine_f(0.999) / cosine_f(0) * (1 - 0.999)
    assert alpha_bar[-1].item() == pytest.approx(expected_last, rel=1e-9)
    for tau in (0.0, 0.3, 0.9):
        assert cosine_alpha_bar(tau) == pytest.approx(cosine_f(tau) / cosine_f(0), rel=1e-12)


def test_sigmoid_schedule_golden_values():
    """ᾱ(τ) = (σ(3) - σ(6τ - 3))/(σ(3) - σ(-3)) (Jabri et al. 2023, Alg. 1, τ' = 1)."""

    def expected(tau):
        sig = [1 / (1 + math.exp(-z)) for z in (3.0, 6 * tau - 3, -3.0)]
        return (sig[0] - sig[1]) / (sig[0] - sig[2])

    alpha_bar = alpha_bar_from_betas(sigmoid_betas(1000))
    assert alpha_bar[0].item() > 0.999  # starts near 1
    for t in (0, 100, 500, 998):
        assert alpha_bar[t].item() == pytest.approx(expected((t + 1) / 1000), rel=1e-9)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_schedules_are_monotone(name):
    betas = make_betas(name, 1000)
    alpha_bar = alpha_bar_from_betas(betas)
    assert ((betas > 0) & (betas <= 0.999)).all()
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()
    assert 0.99 < alpha_bar[0] < 1 and alpha_bar[-1] < 1e-3
    assert (Schedule(name, 1000).log_snr_table.diff() < 0).all()


def test_schedule_name_and_size_errors():
    with pytest.raises(ValueError, match="'quadratic'"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="'quadratic'"):
        Schedule("quadratic", 10)
    with pytest.raises(ValueError, match="num_timesteps=0"):
        Schedule("cosine", 0)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_schedule_alpha_bar_is_the_beta_tables_at_integer_t(name):
    """λ = log(ᾱ/(1-ᾱ)), ᾱ = sigmoid(λ) (Kingma et al. 2021): the table's ᾱ to float64 rounding."""
    expected = alpha_bar_from_betas(make_betas(name, 1000))
    schedule = Schedule(name, 1000)
    t = torch.arange(1000)
    torch.testing.assert_close(schedule.alpha_bar(t), expected, rtol=1e-13, atol=0)
    lam = (expected / (1 - expected)).log()
    torch.testing.assert_close(schedule.log_snr(t), lam, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(schedule.sigma(t), lam.mul(-0.5).exp(), rtol=1e-12, atol=0)


def test_log_snr_interpolates_between_integer_steps():
    schedule = Schedule("cosine", 1000)
    t = torch.tensor([0.25, 10.5, 500.75, 998.5], dtype=torch.float64)
    lo, hi = schedule.log_snr(t.floor()), schedule.log_snr(t.ceil())
    lam = schedule.log_snr(t)
    assert ((lam < lo) & (lam > hi)).all()
    torch.testing.assert_close(lam, lo + (t - t.floor()) * (hi - lo), rtol=1e-12, atol=0)
    ab = schedule.alpha_bar(t)
    assert ((ab < schedule.alpha_bar(t.floor())) & (ab > schedule.alpha_bar(t.ceil()))).all()


@pytest.mark.parametrize(
    "name, continuous, lo, hi, atol",
    [
        ("linear", False, 0.0, 999.0, 1e-9),
        ("cosine", False, 0.0, 999.0, 1e-9),
        ("linear", True, -0.5, 999.0, 1e-5),  # a fine grid's interpolation
        ("cosine", True, -0.5, 990.0, 1e-5),  # λ clipped to -20 beyond t ≈ 991
        ("sigmoid", True, -0.5, 990.0, 1e-5),
    ],
)
def test_t_from_log_snr_inverts_log_snr(name, continuous, lo, hi, atol):
    schedule = Schedule(name, 1000, continuous=continuous)
    t = torch.linspace(lo, hi, 777, dtype=torch.float64)
    back = schedule.t_from_log_snr(schedule.log_snr(t))
    torch.testing.assert_close(back, t, atol=atol, rtol=0)


def test_continuous_linear_schedule_is_the_vp_sde():
    """ᾱ(τ) = exp(-0.1 τ - 9.95 τ²), τ = (t + 1)/T (Song et al. 2021, score SDE, Eq. 29)."""
    schedule = Schedule("linear", 1000, continuous=True)
    for tau in (0.001, 0.1, 0.5, 0.75, 1.0):
        expected = math.exp(-0.1 * tau - 9.95 * tau**2)
        t = torch.tensor(tau * 1000 - 1, dtype=torch.float64)
        assert schedule.alpha_bar(t).item() == pytest.approx(expected, rel=1e-9)


def test_continuous_cosine_matches_discrete_until_clipping():
    """Without clipping, ∏(1 - β_s) telescopes to f(t+1)/f(0): continuous = discrete."""
    t = torch.arange(999)  # β_999 is the clipped one
    discrete, continuous = Schedule("cosine", 1000), Schedule("cosine", 1000, continuous=True)
    torch.testing.assert_close(continuous.alpha_bar(t), discrete.alpha_bar(t), rtol=1e-9, atol=0)
    expected = torch.tensor(
        [cosine_f((k + 1) / 1000) / cosine_f(0) for k in range(999)], dtype=torch.float64
    )
    torch.testing.assert_close(continuous.alpha_bar(t), expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("continuous", [False, True])
def test_log_snr_shift_adds_to_lambda(continuous):
    """λ + shift (Hoogeboom et al. 2023, §3.1), away from the continuous ±20 clip."""
    base = Schedule("cosine", 1000, continuous=continuous)
    shifted = Schedule("cosine", 1000, continuous=continuous, log_snr_shift=-1.5)
    t = torch.tensor([0.0, 3.5, 100.0, 700.25, 950.0], dtype=torch.float64)
    torch.testing.assert_close(shifted.log_snr(t), base.log_snr(t) - 1.5, rtol=0, atol=1e-12)


@pytest.mark.parametrize("continuous", [False, True])
def test_sample_t_range_and_generator(continuous):
    schedule = Schedule("cosine", 50, continuous=continuous)
    t = schedule.sample_t(4000, generator=torch.Generator().manual_seed(0))
    again = schedule.sample_t(4000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    assert t.min() > -1 and t.max() <= 49 and t.max() > 48
    if continuous:
        assert t.is_floating_point() and t.min() < -0.9
    else:
        assert t.dtype == torch.long and set(t.tolist()) == set(range(50))


# ---------------------------------------------------------------------------------------------
# 2. respacing and sampling grids
def test_respaced_betas_keep_alpha_bar_at_kept_steps():
    """β'_k = 1 - ᾱ_{t_k}/ᾱ_{t_{k-1}} (Nichol & Dhariwal 2021, §4)."""
    betas = cosine_betas(1000)
    alpha_bar = alpha_bar_from_betas(betas)
    torch.testing.assert_close(
        respaced_betas(alpha_bar, torch.arange(1000)), betas, rtol=1e-10, atol=1e-15
    )
    kept = torch.tensor([0, 3, 40, 41, 500, 998, 999])
    respaced = respaced_betas(alpha_bar, kept)
    assert ((respaced > 0) & (respaced < 1)).all()
    torch.testing.assert_close((1 - respaced).cumprod(0), alpha_bar[kept], rtol=1e-10, atol=0)


def test_linspace_grid():
    schedule = Schedule("linear", 1000)
    assert schedule.timesteps(1000).tolist() == list(range(999, -1, -1))  # every step
    ts = schedule.timesteps(50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and (ts.diff() < 0).all()
    assert (ts == ts.round()).all()
    assert Schedule("cosine", 10).timesteps(3).tolist() == [9.0, 4.0, 0.0]  # 4.5 rounds to even
    with pytest.raises(ValueError, match="steps=0"):
        schedule.timesteps(0)


def test_trailing_grid():
    """t_i = T - i T/N - 1 (Lin et al. 2024, Table 2): starts at T-1, ends at T/N - 1."""
    schedule = Schedule("linear", 1000)
    assert schedule.timesteps(10, "trailing").tolist() == [999.0 - 100 * i for i in range(10)]
    ts = schedule.timesteps(7, "trailing")
    assert len(ts) == 7 and ts[0] == 999 and (ts.diff() < 0).all()
    assert ts[-1] == round(1000 / 7 - 1)
    continuous = Schedule("linear", 1000, continuous=True).timesteps(7, "trailing")
    assert continuous[-1].item() == pytest.approx(1000 / 7 - 1, rel=1e-12)


@pytest.mark.parametrize("shift", [0.0, 4.0])
@pytest.mark.parametrize("steps", [2, 18])
def test_karras_grid_follows_eq5(shift, steps):
    """σ_i = (σ_max^(1/ρ) + i/(N-1)(σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, ρ = 7 (Karras et al. 2022,
    Eq. 5), σ_min = σ(0), σ_max = min(σ(T-1), 80); σ = exp(-λ/2) moves by e^(-shift/2)."""
    schedule = Schedule("linear", 1000, log_snr_shift=shift)
    alpha_bar_first = math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(1000))
    scale = math.exp(-shift / 2)
    sigma_min = scale * math.sqrt(1e-4 / (1 - 1e-4))
    sigma_top = scale * math.sqrt((1 - alpha_bar_first) / alpha_bar_first)
    sigma_max = min(sigma_top, 80.0)
    assert (sigma_top > 80) == (shift == 0.0)  # both branches: capped (157) and not (21)
    expected = [
        (sigma_max ** (1 / 7) + i / (steps - 1) * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7)))
        ** 7
        for i in range(steps)
    ]
    ts = schedule.timesteps(steps, "karras")
    assert ts.dtype == torch.float64 and len(ts) == steps and (ts.diff() < 0).all()
    assert ts[-1] == 0 and (ts[0] == 999) == (shift != 0.0)
    got = schedule.sigma(ts)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=0)


def test_karras_grid_on_a_continuous_schedule_is_capped():
    schedule = Schedule("cosine", 1000, continuous=True)  # σ(T-1) = e^10 (λ clipped at -20)
    ts = schedule.timesteps(5, "karras")
    assert schedule.sigma(ts[0]).item() == pytest.approx(80.0, rel=1e-5)
    assert ts[-1] == 0 and (ts.diff() < 0).all()


def test_timestep_grid_errors():
    discrete = Schedule("cosine", 100)
    with pytest.raises(ValueError, match="steps=0"):
        discrete.timesteps(0)
    for spacing in ("linspace", "trailing"):
        with pytest.raises(ValueError, match="steps=101"):
            discrete.timesteps(101, spacing)
    assert len(discrete.timesteps(150, "karras")) == 150  # fractional t: allowed
    assert len(Schedule("cosine", 100, continuous=True).timesteps(150)) == 150
    with pytest.raises(ValueError, match="'uniform'"):
        discrete.timesteps(10, "uniform")


# ---------------------------------------------------------------------------------------------
# 3. parametrizations and the denoiser interface
def hand_targets(x0, eps, alpha_bar):
    """x_t and the targets ε, x0, v = √ᾱ ε - √(1-ᾱ) x0 (Salimans & Ho 2022, §4)."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return a * x0 + s * eps, {"eps": eps, "x0": x0, "v": a * eps - s * x0}


def random_pair(shape=(5, 3, 4, 4), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=dtype)
    eps = torch.randn(shape, generator=g, dtype=dtype)
    alpha_bar = torch.tensor([0.9999, 0.9, 0.5, 0.1, 1e-4], dtype=dtype)[:, None, None, None]
    return x0, eps, alpha_bar


def test_q_sample_target_and_snr_golden_values():
    x0, eps, ab = torch.tensor(0.5), torch.tensor(-1.0), torch.tensor(0.36)
    assert q_sample(x0, eps, ab).item() == pytest.approx(0.6 * 0.5 + 0.8 * -1.0)
    assert target("v", x0, eps, ab).item() == pytest.approx(0.6 * -1.0 - 0.8 * 0.5)
    assert target("eps", x0, eps, ab).item() == -1.0 and target("x0", x0, eps, ab).item() == 0.5
    assert snr(torch.tensor(0.8)).item() == pytest.approx(4.0)


@pytest.mark.parametrize("source", ["eps", "x0", "v"])
@pytest.mark.parametrize("dest", ["eps", "x0", "v"])
def test_convert_between_parametrizations_is_exact(source, dest):
    x0, eps, alpha_bar = random_pair()
    x_t, targets = hand_targets(x0, eps, alpha_bar)
    torch.testing.assert_close(q_sample(x0, eps, alpha_bar), x_t, rtol=1e-12, atol=1e-12)
    got = convert(targets[source], source, dest, x_t, alpha_bar)
    torch.testing.assert_close(got, targets[dest], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(target(dest, x0, eps, alpha_bar), targets[dest], rtol=0, atol=1e-15)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("learned_variance", [False, True])
def test_from_network_returns_consistent_x0_and_eps(prediction, learned_variance):
    schedule = Schedule("cosine", 1000)
    t = torch.tensor([0, 10, 500, 900, 990])  # ᾱ from 0.99996 to 2e-4
    x0, eps, _ = random_pair(dtype=torch.float32)
    alpha_bar = broadcast(schedule.alpha_bar(t), x0)
    x_t, targets = hand_targets(x0, eps, alpha_bar)
    v = torch.linspace(-1, 1, x0.numel()).reshape(x0.shape)

    def net(x, t_in):
        assert torch.equal(x, x_t) and torch.equal(t_in, t)
        return torch.cat([targets[prediction], v], 1) if learned_variance else targets[prediction]

    out = from_network(net, schedule, prediction, learned_variance=learned_variance)(x_t, t)
    torch.testing.assert_close(out.x0, x0, atol=1e-4, rtol=0)  # float32, ÷√ᾱ or ÷√(1-ᾱ)
    torch.testing.assert_close(out.eps, eps, atol=1e-4, rtol=0)
    assert_consistent(out, x_t, alpha_bar)
    if learned_variance:
        torch.testing.assert_close(out.var_frac, (v + 1) / 2)  # improved-diffusion's (v + 1)/2
    else:
        assert out.var_frac is None


def test_denoiser_broadcast_and_with_x0():
    schedule = Schedule("cosine", 1000)
    values = torch.tensor([0.5, 0.25], dtype=torch.float64)
    like = torch.zeros(2, 3, 4, 4, dtype=torch.float32)
    b = broadcast(values, like)
    assert b.shape == (2, 1, 1, 1) and b.dtype == torch.float32
    assert b.flatten().tolist() == [0.5, 0.25]
    den = gaussian_denoiser(schedule)
    t = torch.tensor([3, 700])
    torch.testing.assert_close(den.alpha_bar(t, like), broadcast(schedule.alpha_bar(t), like))
    x_t = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ab = den.alpha_bar(t, x_t)
    out = with_x0(den(x_t, t), torch.full_like(x_t, 0.7), x_t, ab)
    assert (out.x0 == 0.7).all()
    assert_consistent(out, x_t, ab)
    torch.testing.assert_close(eps_from_x0(out.x0, x_t, ab), out.eps)


# ---------------------------------------------------------------------------------------------
# 4. losses and the variational bound
def test_mse_per_sample():
    pred = torch.zeros(3, 2, 2)
    tgt = torch.stack([torch.zeros(2, 2), torch.ones(2, 2), torch.full((2, 2), 2.0)])
    assert mse_per_sample(pred, tgt).tolist() == [0.0, 1.0, 4.0]


@pytest.mark.parametrize(
    "alpha_bar, weights",  # SNR = 1 and 9 with γ = 5: min(SNR, γ)/SNR, /(SNR + 1), min(SNR, γ)
    [(0.5, {"eps": 1.0, "v": 0.5, "x0": 1.0}), (0.9, {"eps": 5 / 9, "v": 0.5, "x0": 5.0})],
)
def test_min_snr_weight_golden_values(alpha_bar, weights):
    for prediction, expected in weights.items():
        got = min_snr_weight(torch.tensor([alpha_bar]), prediction, gamma=5.0).item()
        assert got == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="'score'"):
        min_snr_weight(torch.tensor([0.5]), "score")


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weight_turns_every_target_into_clipped_x0_loss(prediction):
    """w_t ‖target error‖² = min(SNR_t, γ) ‖x0 error‖² at fixed x_t (Hang et al. 2023, Eq. 9)."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(64, 3, 4, 4, generator=g), torch.randn(64, 3, 4, 4, generator=g)
    alpha_bar = torch.rand(64, generator=g).clamp(0.01, 0.99)
    ab = alpha_bar[:, None, None, None]
    x_t, targets = hand_targets(x0, eps, ab)
    x0_hat = x0 + torch.randn(x0.shape, generator=g)  # an arbitrary prediction error
    eps_hat = (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()  # the same prediction, as ε and v
    _, predicted = hand_targets(x0_hat, eps_hat, ab)
    weighted = min_snr_weight(alpha_bar, prediction, gamma=5.0) * mse_per_sample(
        predicted[prediction], targets[prediction]
    )
    expected = (alpha_bar / (1 - alpha_bar)).clamp(max=5.0) * mse_per_sample(x0_hat, x0)
    assert (alpha_bar / (1 - alpha_bar) > 5).any() and (alpha_bar / (1 - alpha_bar) < 5).any()
    torch.testing.assert_close(weighted, expected, rtol=1e-4, atol=1e-6)


def test_normal_kl():
    """KL(N(m1, v1) ‖ N(m2, v2)) = ½ (log(v2/v1) + (v1 + (m1 - m2)²)/v2 - 1)."""
    m = torch.tensor([0.3, -2.0])
    log_v = torch.tensor([0.1, -3.0])
    assert torch.equal(normal_kl(m, log_v, m, log_v), torch.zeros(2))
    for m1, v1, m2, v2 in [(1.0, 2.0, 0.0, 3.0), (-0.5, 0.1, 0.7, 0.05), (0.0, 1.0, 0.0, 1e-3)]:
        expected = 0.5 * (math.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)
        got = normal_kl(
            *(torch.tensor(z, dtype=torch.float64) for z in (m1, math.log(v1), m2, math.log(v2)))
        )
        assert got.item() == pytest.approx(expected, rel=1e-12)


def test_discretized_gaussian_sums_to_one_over_the_256_bins():
    """Ho et al. 2020, Eq. 13: the bins of width 2/255 with the edge bins to ±∞ cover ℝ."""
    x = torch.arange(256, dtype=torch.float64) / 255 * 2 - 1
    for mean, scale in [(0.1, 0.3), (-0.95, 0.02), (0.999, 1.5), (0.0, 1e-3)]:
        log_p = discretized_gaussian_log_likelihood(
            x, torch.full_like(x, mean), torch.full_like(x, math.log(scale))
        )
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    # one interior and both edge bins by hand: Φ((x ± 1/255 - m)/s)
    mean, scale = 0.1, 0.3
    for k in (0, 140, 255):
        xk = k / 255 * 2 - 1
        upper = 1.0 if k == 255 else phi((xk + 1 / 255 - mean) / scale)
        lower = 0.0 if k == 0 else phi((xk - 1 / 255 - mean) / scale)
        got = discretized_gaussian_log_likelihood(
            torch.tensor(xk, dtype=torch.float64),
            torch.tensor(mean, dtype=torch.float64),
            torch.tensor(math.log(scale), dtype=torch.float64),
        )
        assert got.item() == pytest.approx(math.log(upper - lower), rel=1e-9)


def posterior_variances(alpha_bars: list[float], t: int) -> tuple[float, float]:
    """(β_t, β̃_t = β_t (1 - ᾱ_{t-1})/(1 - ᾱ_t)) (Ho et al. 2020, Eq. 7)."""
    prev = alpha_bars[t - 1] if t > 0 else 1.0
    beta = 1 - alpha_bars[t] / prev
    return beta, beta * (1 - prev) / (1 - alpha_bars[t])


def eight_bit_batch(batch=3, seed=0):
    """8-bit images scaled to [-1, 1], including both edge values."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 256, (batch, 1, 4, 4), generator=g).float() / 255 * 2 - 1
    x0[:, 0, 0, 0], x0[:, 0, 0, 1] = -1.0, 1.0
    return x0


def decoder_bits(x0: torch.Tensor, mean: torch.Tensor, variance: float) -> torch.Tensor:
    """-log₂ P(x0) per sample, averaged over pixels, with P the mass of N(mean, variance) on
    x0's bin [x0 - 1/255, x0 + 1/255], the edge bins extended to ±∞ (Ho et al. 2020, Eq. 13)."""
    std, bits = math.sqrt(variance), []
    for row, row_mean in zip(x0.flatten(1).tolist(), mean.flatten(1).tolist()):
        per_pixel = []
        for v, m in zip(row, row_mean):
            upper = 1.0 if v > 0.999 else phi((v + 1 / 255 - m) / std)
            lower = 0.0 if v < -0.999 else phi((v - 1 / 255 - m) / std)
            per_pixel.append(-math.log2(upper - lower))
        bits.append(sum(per_pixel) / len(per_pixel))
    return torch.tensor(bits)


def test_vlb_terms_vanish_for_the_true_x0_with_posterior_variance():
    """KL(q(x_{t-1}|x_t,x0) ‖ p) = 0 when p's mean uses the true x0 and Σ = β̃_t (Ho et al. 2020,
    Eq. 5); with Σ = β_t it is ½ (log(β/β̃) + β̃/β - 1). At t = 0 the decoder term, whose mean
    is the model's x̂0 (μ̃ at ᾱ_prev = 1) and variance β̃_1."""
    T = 20
    alpha_bars = cosine_alpha_bars(T)
    table = torch.tensor(alpha_bars, dtype=torch.float64)
    x0 = eight_bit_batch()
    g = torch.Generator().manual_seed(3)
    for step in (1, 7, 19):
        t = torch.full((3,), step)
        x_t = q_sample(x0, torch.randn(x0.shape, generator=g), broadcast(table[t], x0))
        assert vlb_term_bits(x0, x_t, t, x0, table).abs().max() < 1e-6
        beta, beta_tilde = posterior_variances(alpha_bars, step)
        large = 0.5 * (math.log(beta / beta_tilde) + beta_tilde / beta - 1) / math.log(2)
        got = vlb_term_bits(x0, x_t, t, x0, table, variance="large")
        torch.testing.assert_close(got, torch.full((3,), large), rtol=1e-4, atol=1e-7)
    t = torch.zeros(3, dtype=torch.long)
    x_t = q_sample(x0, torch.randn(x0.shape, generator=g), broadcast(table[t], x0))
    _, beta_tilde_1 = posterior_variances(alpha_bars, 1)  # β̃_0 = 0 is replaced by β̃_1
    for model_x0 in (x0, x0 + torch.linspace(-0.02, 0.02, x0.numel()).reshape(x0.shape)):
        expected = decoder_bits(x0, model_x0, beta_tilde_1)
        got = vlb_term_bits(x0, x_t, t, model_x0, table)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_step_log_variances_golden_values():
    alpha_bars = cosine_alpha_bars(20)
    log_beta, log_tilde = step_log_variances(torch.tensor(alpha_bars, dtype=torch.float64))
    for t in (1, 5, 19):
        beta, beta_tilde = posterior_variances(alpha_bars, t)
        assert log_beta[t].item() == pytest.approx(math.log(beta), rel=1e-10)
        assert log_tilde[t].item() == pytest.approx(math.log(beta_tilde), rel=1e-10)
    assert log_beta[0].item() == pytest.approx(math.log(1 - alpha_bars[0]), rel=1e-10)
    assert log_tilde[0] == log_tilde[1]


def test_learned_variance_interpolates_and_trains_only_var_frac():
    """log Σ = f log β + (1-f) log β̃ (Nichol & Dhariwal 2021, Eq. 15): f = 0 is "small", f = 1
    "large"; with a stop-gradient on x̂0 (their §3.1, L_hybrid) only f receives gradient."""
    table = torch.tensor(cosine_alpha_bars(20), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x0 = eight_bit_batch(4)
    t = torch.tensor([1, 5, 12, 19])
    x_t = q_sample(x0, torch.randn(x0.shape, generator=g), broadcast(table[t], x0))
    model_x0 = (x0 + 0.1 * torch.randn(x0.shape, generator=g)).requires_grad_()
    for f, variance in [(0.0, "small"), (1.0, "large")]:
        fixed = vlb_term_bits(x0, x_t, t, model_x0, table, variance=variance)
        learned = vlb_term_bits(x0, x_t, t, model_x0, table, var_frac=torch.full_like(x0, f))
        torch.testing.assert_close(learned, fixed, rtol=1e-5, atol=1e-6)
    var_frac = torch.full_like(x0, 0.3).requires_grad_()
    vlb_term_bits(x0, x_t, t, model_x0.detach(), table, var_frac=var_frac).sum().backward()
    assert model_x0.grad is None
    assert var_frac.grad is not None and var_frac.grad.abs().min() > 0
    vlb_term_bits(x0, x_t, t, model_x0, table, var_frac=var_frac).sum().backward()
    assert model_x0.grad is not None and model_x0.grad.abs().max() > 0  # without the stop


def test_prior_bits_golden_value():
    """L_T = KL(N(√ᾱ x0, 1-ᾱ) ‖ N(0, 1)) = ½ (-1 - log(1-ᾱ) + (1-ᾱ) + ᾱ x0²) nats per dim."""
    x0 = torch.tensor([[0.5, -1.0], [0.0, 0.0]])
    ab = 0.01
    expected = [
        sum(0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * v * v) for v in row) / 2 / math.log(2)
        for row in x0.tolist()
    ]
    torch.testing.assert_close(prior_bits(x0, ab), torch.tensor(expected), rtol=1e-5, atol=1e-7)


def test_bits_per_dim_of_an_oracle_is_prior_plus_decoder():
    """With x̂0 = x0 and Σ = β̃ every L_t, 1 ≤ t < T, is 0: the bound is L_T + L_0. The log-SNR
    shift of 8, ᾱ' = sigmoid(logit ᾱ + 8), leaves ᾱ_T = 0.02 so that L_T is not negligible."""
    T, shift = 20, 8.0
    alpha_bars = [1 / (1 + (1 - a) / a * math.exp(-shift)) for a in cosine_alpha_bars(T)]
    assert 0.01 < alpha_bars[-1] < 0.03
    x0 = eight_bit_batch()
    schedule = Schedule("cosine", T, log_snr_shift=shift)

    def oracle(x, t):  # x̂0 = the true x0, and the consistent ε̂
        return with_x0(DenoiserOutput(x, x), x0, x, broadcast(schedule.alpha_bar(t), x))

    got = bits_per_dim(Denoiser(oracle, schedule), x0, generator=torch.Generator().manual_seed(0))
    ab = alpha_bars[-1]
    prior = [
        sum(0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * v * v) for v in row) / len(row)
        for row in x0.flatten(1).tolist()
    ]
    _, beta_tilde_1 = posterior_variances(alpha_bars, 1)
    expected = torch.tensor(prior) / math.log(2) + decoder_bits(x0, x0, beta_tilde_1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bits_per_dim_needs_a_discrete_schedule():
    den = gaussian_denoiser(Schedule("cosine", 20, continuous=True))
    with pytest.raises(ValueError, match="discrete schedule"):
        bits_per_dim(den, eight_bit_batch())


# ---------------------------------------------------------------------------------------------
# 5. samplers
def stats(samples: torch.Tensor) -> tuple[float, float]:
    return samples.mean().item(), samples.std().item()


@pytest.mark.parametrize(
    "sampler, continuous, tol_std",
    [  # first-order methods get the looser tolerance (their error at 200 steps is ~0.004-0.007)
        (Sampler("ddim", 200, "linspace"), False, 0.01),
        (Sampler("ddim", 200, "linspace"), True, 0.01),
        (Sampler("euler", 200, "linspace"), False, 0.01),
        (Sampler("euler", 200, "karras"), False, 0.01),
        (Sampler("dpmpp_2m", 50, "karras"), False, 0.005),
        (Sampler("dpmpp_2m", 50, "karras"), True, 0.005),
        (Sampler("heun", 40, "karras"), False, 0.006),
    ],
    ids=lambda v: str(v) if isinstance(v, Sampler) else None,
)
def test_deterministic_sampler_recovers_gaussian_data_exactly(sampler, continuous, tol_std):
    """With the exact denoiser every deterministic sampler is affine in x_T, x0 = A x_T + B, so
    for x_T ~ N(0, 1) the sample distribution is exactly N(B, A²): no Monte Carlo error. The mean
    may miss μ by μ s/√(s² + σ_start²) ≤ 0.002, the start's mismatch of N(0, 1) with q(x_T)."""
    den = gaussian_denoiser(Schedule("cosine", 1000, continuous=continuous))
    out = sampler(den, torch.tensor([[0.0], [1.0]]))
    mean, std = out[0].item(), (out[1] - out[0]).item()
    assert mean == pytest.approx(MU, abs=2.5e-3)
    assert std == pytest.approx(S, abs=tol_std)
    x_T = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))  # affine indeed
    torch.testing.assert_close(sampler(den, x_T), mean + std * x_T, atol=5e-5, rtol=0)


@pytest.mark.parametrize(
    "sampler",
    [
        Sampler("ddpm", 1000),
        Sampler("ddpm", 1000, variance="large"),
        Sampler("ddim", 1000, eta=1.0),
        # Alg. 2 is first order in the steps: +0.012 in std at 40 steps, +0.003 at 80
        Sampler("heun", 80, "karras", churn=10, churn_sigma_min=0.05, churn_sigma_max=50),
    ],
    ids=str,
)
def test_stochastic_sampler_recovers_gaussian_data(sampler):
    """Monte Carlo over 40 000 values: standard errors 0.0025 (mean) and 0.0018 (std)."""
    den = gaussian_denoiser(Schedule("linear", 1000))
    g = torch.Generator().manual_seed(0)
    mean, std = stats(sampler(den, torch.randn(10_000, 4, generator=g), generator=g))
    assert mean == pytest.approx(MU, abs=0.01)
    assert std == pytest.approx(S, abs=0.01)


def exact_ode_solution(schedule: Schedule, ts: torch.Tensor, x_T: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE dx̃/dσ = (x̃ - D(x̃; σ))/σ for Gaussian data, solved exactly:
    x̃(σ) = μ + (x̃_T - μ) √(s² + σ²)/√(s² + σ_T²) (Karras et al. 2022, Eq. 4 with D affine),
    from the grid's first time to its last, σ_0; then the samplers' common final step to σ = 0,
    x0 = D(x̃(σ_0); σ_0) = μ + s²/(s² + σ_0²)(x̃(σ_0) - μ), which does not depend on the grid."""
    ab_first, ab_last = schedule.alpha_bar(ts[0]).item(), schedule.alpha_bar(ts[-1]).item()
    sigma2_first, sigma2_last = (1 - ab_first) / ab_first, (1 - ab_last) / ab_last
    x_tilde = MU + (x_T / math.sqrt(ab_first) - MU) * math.sqrt(
        (S**2 + sigma2_last) / (S**2 + sigma2_first)
    )
    return MU + S**2 / (S**2 + sigma2_last) * (x_tilde - MU)


@pytest.mark.parametrize(
    "sampler, order", [(euler, 1), (ddim, 1), (heun, 2), (dpm_solver_pp_2m, 2)]
)
def test_order_of_convergence(sampler, order):
    """Doubling the steps halves the error of a first-order method (Euler; DDIM, which is Euler
    in σ) and divides that of a second-order one (Heun, Karras et al. 2022 Alg. 1; DPM-Solver++
    (2M), Lu et al. 2022) by about 4. float64, linspace grids (first time T-1)."""
    schedule = Schedule("linear", 1000)
    den = gaussian_denoiser(schedule)
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for steps in (40, 80, 160):
        ts = schedule.timesteps(steps, "linspace")
        errors.append((sampler(den, x_T, ts) - exact_ode_solution(schedule, ts, x_T)).abs().max())
    ratios = [(a / b).item() for a, b in zip(errors, errors[1:])]
    if order == 1:
        assert all(1.8 < r < 2.2 for r in ratios), ratios
    else:
        assert all(3.5 < r < 4.8 for r in ratios), ratios
    assert errors[-1] < (0.05 if order == 1 else 0.02)


@pytest.mark.parametrize(
    "spacing, atol", [("linspace", 1e-12), ("trailing", 1e-12), ("karras", 1e-7)]
)
def test_euler_equals_ddim_eta_zero(spacing, atol):
    """DDIM's update divided by √ᾱ_next is x̃ + (σ_next - σ) ε̂ (Karras et al. 2022, §3). In
    float64 both agree to rounding on integer grids; at the fractional times of a Karras grid the
    samplers pass t to the denoiser in float32, which moves its ᾱ by ~1e-8."""
    schedule = Schedule("cosine", 1000)
    den = gaussian_denoiser(schedule)
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = schedule.timesteps(25, spacing)
    torch.testing.assert_close(euler(den, x_T, ts), ddim(den, x_T, ts), rtol=0, atol=atol)


def test_ddim_eta_one_equals_ddpm_with_posterior_variance():
    """σ of Eq. 16 (Song et al. 2021) with η = 1 is √β̃ (Ho et al. 2020, Eq. 7)."""
    schedule = Schedule("linear", 1000)
    den = gaussian_denoiser(schedule)
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    ts = schedule.timesteps(25)
    a = ddim(den, x_T, ts, eta=1.0, generator=torch.Generator().manual_seed(2))
    b = ddpm(den, x_T, ts, variance="small", generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", [ddim, heun])
def test_deterministic_samplers_ignore_the_generator(sampler):
    """DDIM with η = 0 and Heun without churn draw no noise (DPM-Solver++ and Euler take no
    generator at all)."""
    schedule = Schedule("cosine", 1000)
    den = gaussian_denoiser(schedule)
    x_T = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    ts = schedule.timesteps(10)
    reference = sampler(den, x_T, ts)
    for seed in (2, 3):
        assert torch.equal(
            sampler(den, x_T, ts, generator=torch.Generator().manual_seed(seed)), reference
        )


def test_ddim_eta_zero_is_invertible_to_first_order():
    """Run DDIM (η = 0) to x0, then its steps backwards, x_next = √ᾱ_next x̂0 + √(1-ᾱ_next) ε̂ at
    the current point (Song et al. 2021, Eq. 13 read forward in time; "DDIM inversion"): x_T
    comes back up to an error that halves when the steps double."""
    schedule = Schedule("linear", 1000)
    den = gaussian_denoiser(schedule)
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for steps in (50, 100, 200, 1000):
        ts = schedule.timesteps(steps)
        x = ddim(den, x_T, ts)
        ascending = ts.flip(0).tolist()  # the clean sample is treated as x at t = 0
        for t, t_next in zip(ascending, ascending[1:]):
            out = den(x, torch.full((x.shape[0],), t))
            ab_next = schedule.alpha_bar(torch.tensor(t_next)).item()
            x = math.sqrt(ab_next) * out.x0 + math.sqrt(1 - ab_next) * out.eps
        errors.append((x - x_T).abs().max().item())
    assert all(1.7 < a / b < 2.3 for a, b in zip(errors[:3], errors[1:3])), errors
    assert errors[-1] < 0.03


@pytest.mark.parametrize("sampler", [ddim, euler, heun, dpm_solver_pp_2m])
def test_ode_samplers_golden_value_with_constant_eps(sampler):
    """With ε̂ ≡ c the ODE dx̃/dσ = c gives x̃ = x̃_T + (σ - σ_T) c, so x0 = x_T/√ᾱ_T - σ_T c,
    which every ODE sampler reproduces exactly (DPM-Solver++ because x̂0 stays constant along
    the path). Cosine schedule, T = 10, grid [9, 4, 0]."""
    schedule = Schedule("cosine", 10)
    ab_T = cosine_alpha_bars(10)[9]  # β_9 clipped: ᾱ_9 = f(0.9)/f(0) · 0.001
    assert ab_T == pytest.approx(cosine_f(0.9) / cosine_f(0) * 0.001, rel=1e-12)
    c, x_T = 0.5, torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    expected = x_T / math.sqrt(ab_T) - math.sqrt((1 - ab_T) / ab_T) * c
    got = sampler(constant_eps_denoiser(schedule, c), x_T, schedule.timesteps(3))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("variance, var_frac", [("small", None), ("large", None), (None, 0.25)])
def test_ddpm_golden_value(variance, var_frac):
    """Ancestral steps by hand on the cosine T = 10 grid [9, 4, 0] with ε̂ ≡ c, replicating the
    generator's draws: μ = (x_t - β/√(1-ᾱ_t) ε̂)/√(1-β) (Ho et al. 2020, Eq. 11) with the step's
    β = 1 - ᾱ_t/ᾱ_prev; Σ = β̃, β or exp(f log β + (1-f) log β̃) (Nichol & Dhariwal 2021,
    Eq. 15); the last step returns x̂0."""
    schedule, c = Schedule("cosine", 10), 0.5
    ab = cosine_alpha_bars(10)
    x_T = torch.tensor([[1.0, -0.5], [-2.0, 0.25]], dtype=torch.float64)
    draws = torch.Generator().manual_seed(7)
    x = x_T.clone()
    for t, t_prev in [(9, 4), (4, 0)]:
        beta = 1 - ab[t] / ab[t_prev]
        beta_tilde = beta * (1 - ab[t_prev]) / (1 - ab[t])
        x = (x - beta / math.sqrt(1 - ab[t]) * c) / math.sqrt(1 - beta)
        log_var = {"small": math.log(beta_tilde), "large": math.log(beta)}.get(
            variance, 0.25 * math.log(beta) + 0.75 * math.log(beta_tilde)
        )
        x = x + math.exp(0.5 * log_var) * torch.randn(x.shape, generator=draws).double()
    expected = (x - math.sqrt(1 - ab[0]) * c) / math.sqrt(ab[0])
    den = constant_eps_denoiser(schedule, c, var_frac)
    got = ddpm(
        den,
        x_T,
        schedule.timesteps(3),
        variance=variance,
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("var_frac, variance", [(0.0, "small"), (1.0, "large")])
def test_ddpm_learned_variance_endpoints(var_frac, variance):
    schedule = Schedule("linear", 1000)
    den = gaussian_denoiser(schedule)

    def with_var_frac(x, t):
        return den(x, t)._replace(var_frac=torch.full_like(x, var_frac))

    x_T = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    ts = schedule.timesteps(20)
    learned = ddpm(den.wrap(with_var_frac), x_T, ts, generator=torch.Generator().manual_seed(1))
    fixed = ddpm(den, x_T, ts, variance=variance, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(learned, fixed, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="learned"):
        ddpm(den, x_T, ts, variance="learned")


@pytest.mark.parametrize(
    "sampler",
    [
        Sampler("ddpm", 20),
        Sampler("ddim", 20, eta=1.0),
        Sampler("ddim", 20, eta=0.5),
        Sampler("heun", 10, "karras", churn=5),
    ],
    ids=str,
)
def test_randomness_comes_only_from_the_generator(sampler):
    den = gaussian_denoiser(Schedule("cosine", 1000))
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    a = sampler(den, x_T, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(456)  # the global RNG must not matter
    b = sampler(den, x_T, generator=torch.Generator().manual_seed(1))
    c = sampler(den, x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_heun_churn_outside_its_sigma_window_is_alg1():
    """γ_i = 0 unless σ_i ∈ [S_tmin, S_tmax] (Karras et al. 2022, Alg. 2)."""
    schedule = Schedule("cosine", 1000)
    den = gaussian_denoiser(schedule)
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    ts = schedule.timesteps(10, "karras")
    plain = heun(den, x_T, ts)
    outside = heun(den, x_T, ts, churn=30, churn_sigma_min=100.0, generator=torch.Generator())
    assert torch.equal(plain, outside)
    inside = heun(den, x_T, ts, churn=30, churn_sigma_max=1.0, generator=torch.Generator())
    assert (inside - plain).abs().max() > 1e-3


@pytest.mark.parametrize(
    "sampler, function, kwargs",
    [
        (Sampler("ddpm", 12, variance="large"), ddpm, {"variance": "large"}),
        (Sampler("ddim", 12, "trailing", eta=0.3), ddim, {"eta": 0.3}),
        (Sampler("dpmpp_2m", 12, "karras"), dpm_solver_pp_2m, {}),
        (Sampler("euler", 12, "karras"), euler, {}),
        (
            Sampler("heun", 12, "karras", churn=3, churn_noise=1.01),
            heun,
            {"churn": 3, "churn_noise": 1.01},
        ),
    ],
    ids=["ddpm", "ddim", "dpmpp_2m", "euler", "heun"],  # stable across processes (pytest-xdist)
)
def test_sampler_config_dispatches_and_counts_evaluations(sampler, function, kwargs):
    schedule = Schedule("cosine", 1000)
    calls = []
    den = counting(gaussian_denoiser(schedule), calls)
    x_T = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    got = sampler(den, x_T, generator=torch.Generator().manual_seed(1))
    assert len(calls) == sampler.network_evaluations()
    assert sampler.network_evaluations() == (23 if sampler.name == "heun" else 12)
    if function not in (dpm_solver_pp_2m, euler):
        kwargs = {**kwargs, "generator": torch.Generator().manual_seed(1)}
    expected = function(den, x_T, schedule.timesteps(12, sampler.grid), **kwargs)
    assert torch.equal(got, expected)


def test_sampler_default_grids():
    """spacing=None: linspace for DDPM and DDIM, the Karras et al. 2022 grid for the ODE solvers."""
    defaults = {"ddpm": "linspace", "ddim": "linspace", "dpmpp_2m": "karras", "euler": "karras"}
    for name, grid in {**defaults, "heun": "karras"}.items():
        assert Sampler(name).grid == grid
        assert Sampler(name, spacing="trailing").grid == "trailing"
    assert str(Sampler("heun", 18)) == "heun-18 (karras, churn=0.0)"


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"name": "plms"}, "sampler.name='plms'"),
        ({"steps": 0}, "sampler.steps=0"),
        ({"steps": 2.5}, "sampler.steps=2.5"),
        ({"eta": 1.5}, "sampler.eta=1.5"),
        ({"spacing": "uniform"}, "sampler.spacing='uniform'"),
        ({"variance": "fixed"}, "sampler.variance='fixed'"),
        ({"churn": -1.0}, "sampler.churn=-1.0"),
    ],
)
def test_sampler_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Sampler(**kwargs)


# ---------------------------------------------------------------------------------------------
# 6. guidance
def cfg_pair(schedule: Schedule, calls: list):
    """``denoiser_for(inputs)`` of a network whose condition input ``mean`` is the mean of its
    Gaussian data: the conditional inputs say N(1, 0.5²), the null ones N(-1, 0.5²); learned
    variance 0.2 for the first half of the batch and 0.9 for the second."""

    def denoiser_for(inputs):
        means, mask = inputs["mean"], inputs["mask"]
        assert mask is None  # None inputs stay None in the pair

        def fn(x2, t2):
            calls.append(x2.shape[0])
            (xc, xu), (tc, tu) = x2.chunk(2), t2.chunk(2)
            mc, mu = means.chunk(2)
            assert (mc == mc[0]).all() and (mu == mu[0]).all()
            a = gaussian_denoiser(schedule, float(mc[0]))(xc, tc)
            b = gaussian_denoiser(schedule, float(mu[0]))(xu, tu)
            var_frac = torch.cat([torch.full_like(xc, 0.2), torch.full_like(xu, 0.9)])
            return DenoiserOutput(torch.cat([a.x0, b.x0]), torch.cat([a.eps, b.eps]), var_frac)

        return Denoiser(fn, schedule)

    return denoiser_for


def test_classifier_free_guidance():
    """ε̃ = ε_u + w (ε_c - ε_u) (Ho & Salimans 2022, Eq. 6), x̂0 likewise; one doubled forward
    on the inputs [cond; null]."""
    schedule, calls = Schedule("cosine", 1000), []
    pair = cfg_pair(schedule, calls)
    cond_in = {"mean": torch.ones(5), "mask": None}
    null_in = {"mean": -torch.ones(5), "mask": None}
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 10, 300, 700, 999])
    cond, uncond = gaussian_denoiser(schedule, 1.0)(x, t), gaussian_denoiser(schedule, -1.0)(x, t)
    for w, expected in [(1.0, cond), (0.0, uncond)]:
        out = classifier_free_guidance(pair, cond_in, null_in, w)(x, t)
        torch.testing.assert_close(out.x0, expected.x0)
        torch.testing.assert_close(out.eps, expected.eps)
    w = 3.0
    out = classifier_free_guidance(pair, cond_in, null_in, w)(x, t)
    torch.testing.assert_close(out.eps, uncond.eps + w * (cond.eps - uncond.eps))
    torch.testing.assert_close(out.x0, uncond.x0 + w * (cond.x0 - uncond.x0))
    assert_consistent(out, x, broadcast(schedule.alpha_bar(t), x), atol=1e-4)
    assert (out.var_frac == 0.2).all()  # the conditional half's (GLIDE)
    assert calls == [10, 10, 10]
    # a different null (a negative prompt) is the only change: here the conditional one itself
    same = classifier_free_guidance(pair, cond_in, cond_in, w)(x, t)
    torch.testing.assert_close(same.eps, cond.eps)
    with pytest.raises(ValueError, match="differ"):
        guidance_pair(cond_in, {"mean": torch.ones(5)})


def fixed_x0_denoiser(schedule: Schedule, x0: torch.Tensor) -> Denoiser:
    """A denoiser whose x̂0 is ``x0`` whatever x_t, with the consistent ε̂."""

    def fn(x, t):
        return DenoiserOutput(x0, eps_from_x0(x0, x, broadcast(schedule.alpha_bar(t), x)))

    return Denoiser(fn, schedule)


def test_static_thresholding_clips_and_stays_consistent():
    schedule = Schedule("cosine", 1000)
    x0 = torch.tensor([[-3.0, -1.0, -0.2, 0.0], [0.5, 0.999, 1.5, 40.0]])
    x_t, t = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([50, 400])
    out = thresholded(fixed_x0_denoiser(schedule, x0), "static")(x_t, t)
    assert torch.equal(out.x0, torch.tensor([[-1.0, -1.0, -0.2, 0.0], [0.5, 0.999, 1.0, 1.0]]))
    assert_consistent(out, x_t, broadcast(schedule.alpha_bar(t), x_t))


def quantile_by_hand(values: list[float], p: float) -> float:
    """The p-quantile with linear interpolation between order statistics (numpy's default)."""
    ordered, position = sorted(values), p * (len(values) - 1)
    lo = math.floor(position)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (position - lo) * (ordered[hi] - ordered[lo])


def test_dynamic_thresholding_golden_values():
    """s = max(1, quantile_p |x̂0|), x̂0 ← clip(x̂0, -s, s)/s (Saharia et al. 2022, §2.3)."""
    schedule = Schedule("cosine", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.stack(
        [
            3 * torch.randn(2, 5, 5, generator=g),  # s > 1
            0.9 * torch.rand(2, 5, 5, generator=g) * 2 - 0.9,  # in range: s = 1, untouched
            torch.linspace(-1.2, 1.2, 50).reshape(2, 5, 5),  # s barely above 1
        ]
    )
    x_t, t = torch.randn(x0.shape, generator=g), torch.tensor([10, 500, 990])
    p = 0.9
    out = thresholded(fixed_x0_denoiser(schedule, x0), "dynamic", p)(x_t, t)
    for i, sample in enumerate(x0.flatten(1).tolist()):
        s = max(1.0, quantile_by_hand([abs(v) for v in sample], p))
        expected = [max(-s, min(s, v)) / s for v in sample]
        torch.testing.assert_close(
            out.x0[i].flatten(), torch.tensor(expected), rtol=1e-6, atol=1e-6
        )
    assert torch.equal(out.x0[1], x0[1])
    assert out.x0[0].abs().max() == 1.0 and out.x0[2].abs().max() == 1.0
    assert_consistent(out, x_t, broadcast(schedule.alpha_bar(t), x_t))


def test_thresholding_options():
    den = gaussian_denoiser(Schedule("cosine", 1000))
    assert thresholded(den, "none") is den
    with pytest.raises(ValueError, match="'clamp'"):
        thresholded(den, "clamp")
    with pytest.raises(ValueError, match="percentile=1.5"):
        thresholded(den, "dynamic", 1.5)


def test_classifier_guidance_golden_value():
    """ε̂' = ε̂ - s √(1-ᾱ) ∇ log p(y|x_t) (Dhariwal & Nichol 2021, Alg. 2), x̂0 consistent."""
    schedule = Schedule("linear", 1000)
    den = gaussian_denoiser(schedule)
    grad = torch.tensor([0.5, -1.0, 2.0])
    guided = classifier_guidance(den, lambda x, t: grad.expand_as(x), scale=2.5)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 100, 500, 999])
    out, plain = guided(x, t), den(x, t)
    for i, ti in enumerate(t.tolist()):
        ab = math.prod(1 - (1e-4 + k * (0.02 - 1e-4) / 999) for k in range(ti + 1))
        eps = [
            e - 2.5 * math.sqrt(1 - ab) * gr for e, gr in zip(plain.eps[i].tolist(), grad.tolist())
        ]
        x0 = [(xi - math.sqrt(1 - ab) * e) / math.sqrt(ab) for xi, e in zip(x[i].tolist(), eps)]
        torch.testing.assert_close(out.eps[i], torch.tensor(eps), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.x0[i], torch.tensor(x0), rtol=1e-4, atol=1e-4)


def test_classifier_guidance_samples_the_gaussian_posterior():
    """Prior x0 ~ N(0, 1), likelihood y | x0 ~ N(x0, r²): the exact noisy-classifier gradient is
    ∇_{x_t} log N(y; m_t(x_t), r² + v_t), m_t = E[x0|x_t] = k x_t, k = √ᾱ/(ᾱ + 1-ᾱ) = √ᾱ,
    v_t = Var[x0|x_t] = 1-ᾱ; guidance at scale 1 then samples the posterior
    N(y/(1 + r²), r²/(1 + r²)) (product of Gaussians), here N(0.8, 0.2) for y = 1, r² = 0.25."""
    schedule = Schedule("linear", 1000)
    y, r2 = 1.0, 0.25

    def grad_log_prob(x, t):
        ab = broadcast(schedule.alpha_bar(t), x)
        return ab.sqrt() * (y - ab.sqrt() * x) / (r2 + 1 - ab)

    guided = classifier_guidance(gaussian_denoiser(schedule, 0.0, 1.0), grad_log_prob, scale=1.0)
    g = torch.Generator().manual_seed(0)
    mean, std = stats(
        Sampler("ddpm", 1000)(guided, torch.randn(10_000, 4, generator=g), generator=g)
    )
    assert mean == pytest.approx(y / (1 + r2), abs=0.01)
    assert std == pytest.approx(math.sqrt(r2 / (1 + r2)), abs=0.01)


@pytest.mark.parametrize(
    "sampler, atol",
    [  # the last step of DDPM, DDIM and DPM-Solver++ returns x̂0: the known image to rounding.
        # Euler and Heun end with x̃ - σ_0 ε̂, and ε̂ divides by √(1-ᾱ_0) computed in float32 from
        # ᾱ_0 = 1 - 4e-5 (relative error ~1e-3): the known image to ~σ_0 · 1e-3 ≈ 1e-5
        (Sampler("ddpm", 1000), 1e-6),
        (Sampler("ddim", 100), 1e-6),
        (Sampler("ddim", 20, eta=1.0), 1e-6),
        (Sampler("dpmpp_2m", 50, "karras"), 1e-6),
        (Sampler("euler", 200, "linspace"), 2e-5),
        (Sampler("euler", 200, "karras"), 2e-5),
        (Sampler("heun", 40, "karras"), 2e-5),
        (Sampler("heun", 80, "karras", churn=10, churn_sigma_min=0.05, churn_sigma_max=50), 2e-5),
    ],
    ids=str,
)
def test_inpainting_keeps_the_known_region(sampler, atol):
    """The known region of the final sample is the known image (Lugmayr et al. 2022, Eq. 8); with
    independent pixels the unknown region is untouched by the conditioning: it equals the
    unconditional sample from the same x_T and noise, and (except for DDIM η = 1 at 20 steps,
    whose ancestral steps from E[x0|x_t] under-disperse: Bao et al. 2022) it has the data's
    mean and std."""
    den = gaussian_denoiser(Schedule("cosine", 1000))
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(5000, 1, 2, 2, generator=g)
    known = torch.tensor([[[[0.9, 0.0], [-1.0, 0.0]]]]).expand_as(x_T)
    mask = torch.tensor([[[[1, 0], [1, 0]]]])
    out = sampler(inpainting(den, known, mask), x_T, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out[..., 0], known[..., 0], atol=atol, rtol=0)
    free = sampler(den, x_T, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out[..., 1], free[..., 1], atol=1e-6, rtol=0)
    if sampler.eta == 0.0:
        mean, std = stats(out[..., 1])
        assert mean == pytest.approx(MU, abs=0.015) and std == pytest.approx(S, abs=0.015)
