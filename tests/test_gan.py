"""The GAN (``genlab/models/adversarial/gan.py``, ``genlab/nn/gan.py``): one generator and one discriminator
step per batch, the projection discriminator, the R1 penalty against finite differences, sampling
with the EMA weights (the recipe through the real entry point: test_recipes.py)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import genlab
from conftest import TINY_GAN, compose_model, quiet_trainer, shapes_data
from genlab.data.tokenizer import BPETokenizer
from genlab.models.adversarial import gan as gan_module
from genlab.models.adversarial.gan import GAN, sample_latents
from genlab.nn.gan import DCGANDiscriminator, DCGANGenerator, r1_penalty
from genlab.utils.checkpoint import ModelConfigInCheckpoint
from genlab.utils.instantiate import instantiate

TINY_NETS = ["data.resolution=16", *TINY_GAN]  # a few thousand parameters at 16 px
UNCONDITIONAL = ["model.condition=none", "model.text_encoder=null"]
PROMPTS = ["a large red circle at the top left", "a small blue square in the center"]


def tiny_config(*overrides: str) -> dict:
    """The real ``conf/model/gan.yaml``, shrunk."""
    return compose_model(["model=gan", *TINY_NETS, *overrides])


def with_tokenizer(module: GAN) -> GAN:
    """A text GAN's BPE tokenizer, trained on the tiny data's captions as ``setup`` would."""
    data = shapes_data()
    data.setup("fit")
    module.tokenizer = BPETokenizer.train(data.train_captions(), vocab_size=128)
    return module


class StepRecorder(L.Callback):
    """Whether G's and D's weights changed in each training batch, and the step counter."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = (
            trainer.global_step,
            pl_module.generator["net"].input.weight.detach().clone(),
            pl_module.discriminator["net"].score.weight.detach().clone(),
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, g, d = self.before
        self.rows.append(
            {
                "step": step,
                "after": trainer.global_step,
                "g": not torch.equal(g, pl_module.generator["net"].input.weight),
                "d": not torch.equal(d, pl_module.discriminator["net"].score.weight),
            }
        )


# ----------------------------------------------------------------------------------------------
# training


def test_generator_and_discriminator_step_once_per_batch(tmp_path, monkeypatch) -> None:
    config = tiny_config("model.discriminator.norm=none", "model.r1_gamma=1", "model.r1_interval=2")
    module = instantiate(config)
    r1_calls = []

    def counted_r1(logits, real):
        r1_calls.append(module.global_step)
        return r1_penalty(logits, real)

    monkeypatch.setattr(gan_module, "r1_penalty", counted_r1)
    recorder = StepRecorder()
    trainer = quiet_trainer(
        tmp_path,
        max_steps=4,
        limit_val_batches=1,
        log_every_n_steps=1,
        precision="bf16-mixed",
        callbacks=[recorder, ModelConfigInCheckpoint(config)],
    )
    trainer.fit(module, datamodule=shapes_data())  # 4 batches of 8: one epoch, then validation
    rows = recorder.rows
    assert [(r["step"], r["after"]) for r in rows] == [(i, i + 1) for i in range(4)]
    assert all(r["g"] and r["d"] for r in rows)
    opt_g, opt_d = trainer.optimizers
    assert opt_g.state[module.generator["net"].input.weight]["step"].item() == 4
    assert opt_d.state[module.discriminator["net"].score.weight]["step"].item() == 4
    assert int(module.ema.num_updates) == 4
    assert r1_calls == [1, 3]  # due at steps 0 and 2; global_step already counts G's step
    metrics = trainer.callback_metrics
    for key in ("train/d_loss", "train/g_loss", "train/d_real", "train/d_fake", "train/r1"):
        assert key in metrics, key
    for key in ("val/loss", "val/d_real", "val/d_fake", "val/g_loss"):
        assert key in metrics, key

    path = tmp_path / "gan.ckpt"  # the tokenizer and EMA travel in the checkpoint
    trainer.save_checkpoint(path)
    loaded = genlab.load(path)
    module.eval()
    a = loaded.generate(PROMPTS, n=2, generator=torch.Generator().manual_seed(3))
    b = module.generate(PROMPTS, n=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_validation_scores_do_not_depend_on_batching() -> None:
    module = with_tokenizer(instantiate(tiny_config())).eval()
    data = shapes_data()
    data.setup("validate")
    items = [data.split("val")[i] for i in range(6)]
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }
    with torch.no_grad():
        whole = module.evaluation_scores(batch)
        halves = [
            module.evaluation_scores({k: v[s] for k, v in batch.items()})
            for s in (slice(0, 2), slice(2, 6))
        ]
    for i in range(2):
        assert torch.allclose(whole[i], torch.cat([h[i] for h in halves]), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# the networks


def test_projection_discriminator_score_follows_eq3() -> None:
    torch.manual_seed(0)
    d = DCGANDiscriminator(channels=[8, 16], image_size=16, cond_dim=5, norm="none")
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    y1, y2 = torch.randn(3, 5), torch.randn(3, 5)
    with torch.no_grad():
        phi = d.features(x).flatten(1)
        expected = d.score(phi).squeeze(1) + (d.embed(y1) * phi).sum(1)  # Miyato & Koyama Eq. 3
        assert torch.allclose(d(x, y1), expected, atol=1e-6)
        assert (d(x, y1) - d(x, y2)).abs().min() > 1e-4  # the condition changes every score
        d.embed.weight.zero_()  # no projection: the score ignores the condition
        assert torch.equal(d(x, y1), d(x, y2))
    with pytest.raises(ValueError, match="conditional"):
        d(x)


def test_text_condition_changes_the_models_scores() -> None:
    module = with_tokenizer(instantiate(tiny_config())).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        scores = [
            module.discriminator["net"](
                x, module.condition_vector(module.discriminator, captions=[p, p])
            )
            for p in PROMPTS
        ]
    assert (scores[0] - scores[1]).abs().min() > 1e-5


def test_generator_shapes_and_layout_errors() -> None:
    g = DCGANGenerator(
        z_dim=8,
        channels=[16, 8, 4],
        image_size=32,
        cond_dim=3,
        norm="group",
        groups=4,
        upsample="nearest",
    )
    out = g(torch.randn(2, 8), torch.randn(2, 3))
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1
    with pytest.raises(ValueError, match=r"model.generator.channels=\[16, 8\].*image_size=32"):
        DCGANGenerator(channels=[16, 8], image_size=32)
    with pytest.raises(ValueError, match=r"model.discriminator.channels"):
        DCGANDiscriminator(channels=[8, 16], image_size=24)


def test_r1_penalty_of_a_quadratic_is_its_gradient_norm() -> None:
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    logits = 1.5 * x.square().flatten(1).sum(1) + 2.0  # D(x) = 1.5‖x‖² + 2: ∇D = 3x
    r1 = r1_penalty(logits, x)
    assert torch.allclose(r1, 9 * x.detach().square().flatten(1).sum(1))
    r1.sum().backward()  # the penalty itself is differentiable (create_graph)
    assert torch.allclose(x.grad, 2 * 9 * x.detach())


def test_r1_term_equals_finite_differences() -> None:
    module = instantiate(
        tiny_config(
            *UNCONDITIONAL,
            "model.discriminator.norm=none",
            "model.r1_gamma=0.4",
            "model.r1_interval=3",
        )
    ).double()
    d = module.discriminator["net"]
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    fake = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    total, logs = module.discriminator_objective(x, fake, {}, regularize=True)

    h, dims = 1e-6, x[0].numel()  # central differences of every pixel of both images
    steps = torch.eye(dims, dtype=torch.float64).view(dims, *x.shape[1:]) * h
    with torch.no_grad():
        grads = torch.stack([(d(xi + steps) - d(xi - steps)) / (2 * h) for xi in x])  # (B, C·H·W)
    expected = grads.square().sum(1).mean()
    assert logs["r1"].dtype == torch.float64
    assert torch.allclose(logs["r1"], expected, rtol=1e-6)
    assert torch.allclose(total, logs["d_loss"] + 0.5 * 0.4 * 3 * expected, rtol=1e-6)
    plain, logs = module.discriminator_objective(x, fake, {}, regularize=False)
    assert "r1" not in logs and torch.equal(plain, logs["d_loss"])


# ----------------------------------------------------------------------------------------------
# sampling


def test_generate_shapes_range_seeds_and_ema() -> None:
    module = with_tokenizer(instantiate(tiny_config("model.truncation=0.7"))).eval()
    seeded = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    images = module.generate(PROMPTS, n=3, generator=seeded(0))
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, module.generate(PROMPTS, n=3, generator=seeded(0)))
    assert not torch.equal(images, module.generate(PROMPTS, n=3, generator=seeded(1)))
    assert not torch.equal(images[0], images[1])  # one prompt, different z
    # the EMA weights draw: changing the trained ones changes nothing
    with torch.no_grad():
        module.generator["net"].input.weight.add_(1.0)
    assert module.uses_ema and torch.equal(
        images, module.generate(PROMPTS, n=3, generator=seeded(0))
    )
    ema = module.ema.module
    z = sample_latents(6, 16, generator=seeded(0), truncation=0.7)
    with torch.no_grad():
        direct = ema["net"](
            z, module.condition_vector(ema, captions=[p for p in PROMPTS for _ in "abc"])
        )
    assert torch.allclose(images, direct.clamp(-1, 1), atol=1e-6)
    protocol = module.sampling_options(temperature=0.5).protocol()
    assert protocol == {"sampler": "generator (one pass)", "truncation": 0.7, "temperature": 0.5}


def test_truncation_and_temperature_of_z() -> None:
    z = sample_latents(64, 32, generator=torch.Generator().manual_seed(0), truncation=0.5)
    assert z.abs().max() <= 0.5 and z.abs().max() > 0.4
    hot = sample_latents(4, 8, generator=torch.Generator().manual_seed(1), temperature=2.0)
    cold = sample_latents(4, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(hot, 2 * cold)


def test_label_and_unconditional_generation_and_errors() -> None:
    labelled = instantiate(
        tiny_config(
            "model.condition=label",
            "model.num_classes=4",
            "model.text_encoder=null",
            "model.label_dim=8",
            "model.ema_decay=null",
        )
    ).eval()
    assert not labelled.uses_ema
    assert labelled.generate(labels=[0, 3, 3]).shape == (3, 3, 16, 16)
    assert labelled.generate(n=5, generator=torch.Generator().manual_seed(0)).shape[0] == 5
    with pytest.raises(ValueError, match=r"labels must be .* \[0, 4\)"):
        labelled.generate(labels=[4])
    with pytest.raises(ValueError, match="takes no prompts"):
        labelled.generate(PROMPTS)
    plain = instantiate(tiny_config(*UNCONDITIONAL)).eval()
    assert plain.generate(n=2).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="unconditional"):
        plain.generate()
    texts = with_tokenizer(instantiate(tiny_config()))
    with pytest.raises(ValueError, match="text-conditional"):
        texts.generate(n=2)
    with pytest.raises(ValueError, match="truncation=0"):
        texts.generate(PROMPTS, truncation=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.loss=wasserstein"], "model.loss='wasserstein'"),
        (["model.condition=label"], "model.num_classes"),
        (["model.r1_interval=0"], "model.r1_interval=0"),
        (["model.generator.channels=[16,8,8]"], r"model.generator.channels=\[16, 8, 8\]"),
        (
            ["model.generator._partial_=false", "model.generator.channels=[32,16,8]"],
            "model.generator must be a partial",
        ),
    ],
)
def test_bad_configs_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        instantiate(tiny_config(*overrides))
