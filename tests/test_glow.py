"""Glow (``genlab.nn.flows``, ``genlab.models.flows.glow``): every layer and the multi-scale flow invert
exactly and their log-determinants equal brute-force log|det J|; ActNorm's data-dependent
initialization; bits/dim as the density of the 8-bit variable; training, sampling and the
class-conditional prior (the recipe through ``train.py``: test_recipes.py)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from torch.autograd.functional import jacobian

from conftest import quiet_trainer, shapes_data
from genlab.models.flows.glow import Glow, to_flow_space, to_images
from genlab.nn.flows import (
    ActNorm,
    AffineCoupling,
    FlowStep,
    InvConv2d,
    LearnedPrior,
    MultiScaleFlow,
    Split,
    Squeeze,
    standard_normal_log_prob,
)


def randomized(module: torch.nn.Module, x: torch.Tensor, scale: float = 0.3) -> torch.nn.Module:
    """``module`` in float64 with its ActNorms initialised on 64 inputs distributed like ``x``
    and every parameter moved off its (often zero) initial value, in eval mode: nothing is
    trivially the identity."""
    torch.manual_seed(0)
    module = module.double().train()
    x = x.mean() + x.std() * torch.randn(64, *x.shape[1:], dtype=torch.float64)
    labels = torch.zeros(len(x), dtype=torch.long)
    with torch.no_grad():
        needs_labels = getattr(module, "num_classes", None) or isinstance(
            module, Split | LearnedPrior
        )
        module(x, labels) if needs_labels else module(x)
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module.eval()


def brute_force_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det ∂fn(x)/∂x| of one sample x (1, C, H, W), fn returning a tensor of x's size."""
    jac = jacobian(lambda v: fn(v.view_as(x)).flatten(), x.flatten())  # (D, D)
    return torch.linalg.slogdet(jac)[1]


def flat(latents: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([z.flatten(1) for z in latents], dim=1)  # (B, D)


LABELS = torch.tensor([3])
LAYERS = {
    "actnorm": lambda: ActNorm(2),
    "invconv": lambda: InvConv2d(2, lu=False),
    "invconv_lu": lambda: InvConv2d(2, lu=True),
    "affine_coupling": lambda: AffineCoupling(2, hidden=8),
    "additive_coupling": lambda: AffineCoupling(2, hidden=8, affine=False),
    "flow_step": lambda: FlowStep(2, hidden=8),
    "squeeze": Squeeze,
    "split": lambda: Split(2),
    "split_class": lambda: Split(2, num_classes=5),
    "prior_class": lambda: LearnedPrior(2, num_classes=5),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_inverts_and_its_logdet_is_the_jacobians(name: str) -> None:
    """On a 2×4×4 input in float64: inverse(forward(x)) = x, and the logdet of each sample
    equals log|det J| computed from the full Jacobian by autograd."""
    torch.manual_seed(1)
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64) * 1.5 + 0.3
    layer = randomized(LAYERS[name](), x)
    conditional = isinstance(layer, Split | LearnedPrior)
    batch_args = (LABELS.expand(len(x)),) if conditional else ()
    one_args = (LABELS,) if conditional else ()
    with torch.no_grad():
        y, logdet = layer(x, *batch_args)
        assert y.shape[0] == 4 and y.numel() == x.numel() and logdet.shape == (4,)
        assert torch.allclose(layer.inverse(y, *batch_args), x, atol=1e-10)
    for i in range(2):
        expected = brute_force_logdet(lambda v: layer(v, *one_args)[0], x[i : i + 1])
        assert torch.allclose(logdet[i], expected, atol=1e-8), (name, logdet[i], expected)
    if name != "squeeze" and name != "additive_coupling":
        assert logdet.abs().min() > 1e-3  # not trivially zero


def tiny_flow(**overrides) -> MultiScaleFlow:
    args = dict(in_channels=2, levels=2, steps=2, hidden=8)
    return MultiScaleFlow(**{**args, **overrides})


@pytest.mark.parametrize("num_classes", [None, 5])
@pytest.mark.parametrize("lu", [True, False])
def test_multiscale_flow_inverts_and_its_logdet_is_the_jacobians(lu, num_classes) -> None:
    """The whole two-level flow on 2×4×4 inputs: x ↦ (ε_1, ε_2) is a bijection whose summed
    log-determinant equals log|det J| of the map, and the latents have the announced shapes."""
    torch.manual_seed(2)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    flow = randomized(tiny_flow(lu=lu, num_classes=num_classes), x, scale=0.1)
    labels = torch.tensor([0, 3, 4]) if num_classes else None
    with torch.no_grad():
        latents, logdet = flow(x, labels)
        assert [tuple(z.shape[1:]) for z in latents] == flow.latent_shapes(4)
        assert flat(latents).shape == (3, 32)
        assert torch.allclose(flow.inverse(latents, labels), x, atol=1e-10)
    for i in range(3):
        label = None if labels is None else labels[i : i + 1]
        expected = brute_force_logdet(lambda v, lb=label: flat(flow(v, lb)[0]), x[i : i + 1])
        assert torch.allclose(logdet[i], expected, atol=1e-8)


def test_three_level_flow_inverts_in_float32() -> None:
    torch.manual_seed(3)
    x = torch.rand(4, 3, 16, 16) - 0.5
    flow = randomized(MultiScaleFlow(in_channels=3, levels=3, steps=2, hidden=16), x, 0.05).float()
    with torch.no_grad():
        latents, _ = flow(x.float())
        assert torch.allclose(flow.inverse(latents), x, atol=1e-4)


def test_lu_and_plain_invertible_convolutions_agree() -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    lu = randomized(InvConv2d(6, lu=True), x)
    plain = InvConv2d(6, lu=False).double().eval()
    with torch.no_grad():
        plain.weight.copy_(lu.weight_matrix())
        (y_lu, ld_lu), (y_plain, ld_plain) = lu(x), plain(x)
        assert torch.allclose(y_lu, y_plain, atol=1e-12)
        assert torch.allclose(ld_lu, ld_plain, atol=1e-10)
        assert torch.allclose(ld_lu[0], 25 * torch.linalg.slogdet(plain.weight)[1], atol=1e-10)
        assert abs(float(ld_lu[0])) > 1e-3  # the perturbation moved W off a rotation


def test_actnorm_data_dependent_initialization() -> None:
    """The first training batch comes out with zero mean and unit variance per channel; later
    batches, eval mode, and a module loaded from a saved state do not initialise again."""
    torch.manual_seed(5)
    x = torch.randn(16, 3, 5, 5) * torch.tensor([2.0, 0.5, 7.0]).view(1, 3, 1, 1) + 4.0
    norm = ActNorm(3)
    assert not norm.initialized
    norm.eval()(x)
    assert not norm.initialized  # evaluation never initialises
    y, _ = norm.train()(x)
    assert norm.initialized
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.var((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    norm(x * 3 + 1)
    assert all(torch.equal(state[k], v) for k, v in norm.state_dict().items())
    reloaded = ActNorm(3)
    reloaded.load_state_dict(state)
    reloaded.train()(x * 3 + 1)
    assert torch.equal(reloaded.bias, state["bias"]) and torch.equal(reloaded.logs, state["logs"])


# ----------------------------------------------------------------------------------------------
# the LightningModule


def tiny_glow(**overrides) -> Glow:
    num_classes = overrides.get("num_classes")
    flow = MultiScaleFlow(
        in_channels=overrides.pop("channels", 3),
        levels=2,
        steps=overrides.pop("steps", 2),
        hidden=overrides.pop("hidden", 16),
        num_classes=num_classes,
    )
    args = dict(
        flow=flow,
        optimizer=functools.partial(torch.optim.Adam, lr=2e-3),
        image_size=16,
        channels=flow.in_channels,
        condition="label" if num_classes else "none",
    )
    return Glow(**{**args, **overrides})


def test_bits_per_dim_is_the_density_of_the_dequantized_8bit_variable() -> None:
    """bits/dim = −log₂ p_v(k + u) / D for v = k + u ∈ [0, 256)^D, with p_v computed by brute
    force: log N(g(v)) + log|det ∂g/∂v| for g = flow ∘ (v ↦ v/256 − 1/2). Checks the
    dequantization, the 1/256 scaling constant and the per-dimension normalisation."""
    torch.manual_seed(6)
    model = tiny_glow(channels=2)
    model.image_size = 4
    k = torch.randint(0, 256, (2, 2, 4, 4)).double()
    images, u = k / 127.5 - 1, torch.rand(2, 2, 4, 4, dtype=torch.float64)
    model.flow = randomized(model.flow, to_flow_space(images, u), scale=0.1)
    bpd = model.bits_per_dim(images, u)
    for i in range(2):
        v = (k + u)[i : i + 1]

        def g(w):
            return flat(model.flow(w / 256 - 0.5)[0])

        log_p = standard_normal_log_prob([g(v)]) + brute_force_logdet(g, v)
        assert torch.allclose(bpd[i], -log_p / (32 * math.log(2)), atol=1e-9)
    # the 8-bit values come back exactly, and the flow-space mean maps back to the image
    assert torch.equal(((images + 1) * 127.5).round(), k)
    assert torch.allclose(to_images(to_flow_space(images, torch.full_like(u, 0.5))), images)


def test_training_lowers_validation_bits_per_dim_below_8(tmp_path: Path) -> None:
    """A briefly trained flow beats the uniform model (8 bits/dim) and its freshly initialised
    self (ActNorms set on a training batch), and validation is reproducible (per-item
    dequantization noise)."""
    torch.manual_seed(7)
    model = tiny_glow()
    data = shapes_data(16, train_size=128)
    data.setup("fit")
    images = next(iter(data.train_dataloader()))["image"]
    with torch.no_grad():  # the data-dependent initialization that the first step would do
        model.flow.train()(to_flow_space(images, torch.rand_like(images)))
    trainer = quiet_trainer(tmp_path, max_steps=40, limit_val_batches=2, gradient_clip_val=1.0)
    before = trainer.validate(model, datamodule=data, verbose=False)[0]["val/bpd"]
    trainer.fit(model, datamodule=data)
    after = [trainer.validate(model, datamodule=data, verbose=False)[0] for _ in range(2)]
    assert after[0]["val/bpd"] == after[1]["val/bpd"] == after[0]["val/loss"]
    assert after[0]["val/bpd"] < min(8.0, before - 0.5), (before, after)


def test_generate_shapes_range_and_reproducibility() -> None:
    torch.manual_seed(8)
    model = randomize_model(tiny_glow())
    images = model.generate(n=3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0
    again = model.generate(n=3, generator=torch.Generator().manual_seed(0))
    other = model.generate(n=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(images, again) and not torch.equal(images, other)
    cold = model.generate(n=2, temperature=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(cold[0], cold[1])  # T = 0: every sample is the prior's mode
    hot = model.generate(n=3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(hot, images)
    model.sample_batch_size = 2  # chunked drawing gives the same images
    chunked = model.generate(n=3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(chunked, images, atol=1e-5)
    with pytest.raises(ValueError, match="unconditional"):
        model.generate(["a red circle"], n=1)
    with pytest.raises(ValueError, match="model.condition=none"):
        model.generate(labels=[1, 2])
    assert model.sampling_options().protocol() == {"sampler": "flow inverse", "temperature": 0.7}


def test_overflowing_samples_come_back_finite_and_counted(caplog) -> None:
    """A coupling scale σ(ŝ + 2) ≈ e^-200 makes its inverse overflow float32: the images are
    still finite and in [-1, 1] (what the metrics need), and a warning counts them."""
    torch.manual_seed(10)
    model = randomize_model(tiny_glow())
    coupling = model.flow.levels[0]["steps"][0].layers[2]
    with torch.no_grad():
        coupling.net.out.conv.bias[coupling.net.out.conv.bias.shape[0] // 2 :] = -200.0
    with caplog.at_level("WARNING"):
        images = model.generate(n=3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(images).all() and images.abs().max() <= 1
    assert "3 of 3 samples overflowed" in caplog.text


def randomize_model(model: Glow) -> Glow:
    """Initialise the ActNorms on random images and move every parameter off its initial value
    (a flow that is not the identity)."""
    images = torch.rand(32, model.channels, model.image_size, model.image_size) * 2 - 1
    with torch.no_grad():
        model.flow.train()(to_flow_space(images, torch.rand_like(images)))
        for p in model.flow.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def test_config_errors_name_the_key() -> None:
    flow = MultiScaleFlow(in_channels=3, levels=3, steps=1, hidden=4)
    opt = functools.partial(torch.optim.Adam)
    with pytest.raises(ValueError, match="model.image_size=20"):
        Glow(flow=flow, optimizer=opt, image_size=20)
    with pytest.raises(ValueError, match="model.flow.num_classes"):
        Glow(flow=flow, optimizer=opt, condition="label", num_classes=10)
    with pytest.raises(ValueError, match="model.flow.in_channels"):
        Glow(flow=flow, optimizer=opt, channels=1)


def test_class_conditional_prior_on_digits(tmp_path: Path) -> None:
    """condition=label on the labelled digits: trains on the labels, draws the requested
    classes (different labels, different images from the same noise), refuses bad labels and
    unlabelled batches."""
    from genlab.data.digits import DigitsDataModule

    torch.manual_seed(9)
    model = tiny_glow(channels=1, num_classes=10)
    data = DigitsDataModule(resolution=16, batch_size=32)
    trainer = quiet_trainer(
        tmp_path, max_steps=20, limit_train_batches=20, limit_val_batches=2, gradient_clip_val=1.0
    )
    trainer.fit(model, datamodule=data)  # one epoch of 20 batches, then validation
    assert trainer.callback_metrics["val/bpd"] < 8
    shift = model.flow.levels[-1]["prior"].class_shift.embedding.weight
    assert shift.abs().sum() > 0  # the per-class prior learned something
    model.eval()
    draw = functools.partial(model.generate, generator=torch.Generator().manual_seed(0))
    images = draw(labels=[0, 1, 2, 3])
    assert images.shape == (4, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    same_noise = torch.Generator().manual_seed(0)
    relabelled = model.generate(labels=[4, 5, 6, 7], generator=same_noise)
    assert not torch.allclose(images, relabelled)
    assert model.generate(n=5).shape == (5, 1, 16, 16)  # labels drawn uniformly
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        model.generate(labels=[10])
    with pytest.raises(ValueError, match="model.condition=label needs class labels"):
        model.training_step({"image": torch.zeros(2, 1, 16, 16)}, 0)
