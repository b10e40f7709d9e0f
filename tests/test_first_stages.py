"""The first-stage autoencoders (VAE, VQ-GAN / VQ-VAE, dVAE) as LightningModules: their
interfaces, the adversarial loop of manual optimization, the schedules, and checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import genlab
from conftest import CONF, TINY_DATA, TINY_RUN, check_ok, quiet_trainer, run_entry
from genlab.data.shapes import ShapesDataModule
from genlab.models.autoencoders.ae import corrupt
from genlab.nn.adversarial import adaptive_weight, discriminator_loss, generator_loss
from genlab.utils.checkpoint import ModelConfigInCheckpoint
from genlab.utils.instantiate import instantiate
from genlab.utils.ramps import Ramp

MODELS = ["vae", "beta_vae", "vqgan", "vqvae", "dvae", "ae", "dae"]


def tiny_config(model: str, *overrides: str, size: int = 16, f: int = 4) -> dict:
    """The real ``conf/model/<model>.yaml``, shrunk to a few thousand parameters."""
    channels = {2: "[8,16]", 4: "[8,16,16]", 8: "[8,16,16,16]"}[f]
    shrink = [
        f"model.encoder.channels={channels}",
        "model.encoder.groups=8",
        "model.encoder.mid_attention=false",
    ]
    if model in ("vqgan", "vqvae"):
        shrink += ["model.quantizer.num_codes=32", "model.quantizer.code_dim=8"]
        shrink += ["model.encoder.latent_channels=8", "model.quantizer.kmeans_init=false"]
    if model == "dvae":
        shrink += ["model.quantizer.num_codes=32", "model.quantizer.code_dim=8"]
    if model in ("vqgan", "vae"):
        shrink += ["model.discriminator.channels=8", "model.discriminator.layers=2"]
        shrink += ["model.discriminator.groups=8", "model.perceptual=null"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train.yaml",
            overrides=[f"model={model}", f"data.resolution={size}", *shrink, *overrides],
        )
    return OmegaConf.to_container(cfg.model, resolve=True)


def tiny_data(size: int = 16, batch: int = 8, n: int = 64) -> ShapesDataModule:
    return ShapesDataModule(
        resolution=size, batch_size=batch, train_size=n, val_size=16, test_size=16
    )


# ----------------------------------------------------------------------------------------------
# interfaces


@pytest.mark.parametrize("f", [4, 8])
@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("model", ["vae", "vqgan", "dvae"])
def test_encode_decode_shapes(model: str, size: int, f: int) -> None:
    module = instantiate(tiny_config(model, size=size, f=f)).eval()
    x = torch.rand(2, 3, size, size) * 2 - 1
    h = size // f
    assert module.downsample_factor == f and module.latent_size == h
    with torch.no_grad():
        if model == "vae":
            posterior = module.encode(x)
            assert posterior.mean.shape == (2, 4, h, h) and posterior.kl().shape == (2,)
            assert module.decode(posterior.mode()).shape == x.shape
            assert module.generate(n=3).shape == (3, 3, size, size)
        elif model == "vqgan":
            z = module.encode(x)
            assert z.shape == (2, 8, h, h)
            assert module.decode(z).shape == x.shape
            indices = module.encode_indices(x)
            assert indices.shape == (2, h, h) and indices.dtype == torch.long
            assert module.decode_indices(indices).shape == x.shape
        else:
            indices = module.encode(x)
            assert indices.shape == (2, h, h) and int(indices.max()) < 32
            assert module.decode(indices).shape == x.shape
        out = module.reconstruct(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1


def test_vq_reconstruction_is_the_decoded_tokens() -> None:
    module = instantiate(tiny_config("vqgan")).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        tokens = module.decode_indices(module.encode_indices(x))
        assert torch.allclose(module.reconstruct(x), tokens, atol=1e-4)  # z + sg[e - z] ~ e


def test_vae_kl_is_the_closed_form() -> None:
    from genlab.nn.distributions import DiagonalGaussian

    mean, logvar = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4) * 0.5
    q = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    p = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    expected = torch.distributions.kl_divergence(p, torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(q.kl(), expected.flatten(1).sum(1), atol=1e-5)
    z = q.sample(torch.Generator().manual_seed(0))
    assert torch.allclose(q.nll(z), -p.log_prob(z).flatten(1).sum(1), atol=1e-4)


def test_vae_regularization_scales_kl_per_image_dimension() -> None:
    module = instantiate(tiny_config("vae", "model.kl_weight.start=0.5"))
    module.eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = module.forward_train(x)
    kl = module.encode(x).kl().mean()
    assert torch.allclose(out.regularization, 0.5 * kl / (3 * 16 * 16))


@pytest.mark.parametrize("model", MODELS)
def test_bad_shapes_are_named(model: str) -> None:
    with pytest.raises(ValueError, match="image_size=18"):
        instantiate(tiny_config(model, "model.image_size=18"))


# ----------------------------------------------------------------------------------------------
# losses


def test_adversarial_losses_by_hand() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    hinge_d = 0.5 * ((0.0 + 0.5) / 2 + (0.0 + 1.5) / 2)
    assert math.isclose(discriminator_loss(real, fake, "hinge").item(), hinge_d, rel_tol=1e-6)
    assert math.isclose(generator_loss(fake, "hinge").item(), 0.75, rel_tol=1e-6)
    sp = torch.nn.functional.softplus
    ns_d = 0.5 * (sp(-real).mean() + sp(fake).mean())
    assert torch.allclose(discriminator_loss(real, fake, "non_saturating"), ns_d)
    assert torch.allclose(generator_loss(fake, "non_saturating"), -torch.sigmoid(fake).log().mean())


def test_adaptive_weight_equals_the_gradient_norm_ratio() -> None:
    module = instantiate(tiny_config("vqgan"))
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    out = module.forward_train(x)
    rec = module.reconstruction_loss(out.reconstruction, x)["rec"]
    adv = generator_loss(module.discriminator(out.reconstruction))
    weight = module.adversarial_weight(rec, adv)

    layer = module.decoder.last_layer
    rec.backward(retain_graph=True)
    g_rec = layer.grad.clone()
    layer.grad = None
    adv.backward()
    expected = g_rec.norm() / (layer.grad.norm() + 1e-4)
    assert torch.allclose(weight, module.disc_weight * expected, rtol=1e-5)
    assert not weight.requires_grad


def test_adaptive_weight_is_clamped() -> None:
    w = torch.ones(3, requires_grad=True)
    assert adaptive_weight((w * 1e9).sum(), (w * 0.0).sum(), w).item() == 1e4


def test_ramps_follow_their_formulas() -> None:
    cosine = Ramp(1.0, 1 / 16, steps=100, begin=10, kind="cosine")
    assert cosine(0) == 1.0 and cosine(10) == 1.0 and cosine(110) == 1 / 16
    assert math.isclose(cosine(60), 1.0 + (1 / 16 - 1.0) * 0.5)
    assert math.isclose(cosine(35), 1.0 + (1 / 16 - 1.0) * (1 - math.cos(math.pi / 4)) / 2)
    assert math.isclose(Ramp(0.0, 2.0, steps=4, kind="linear")(1), 0.5)
    assert math.isclose(Ramp(1.0, 0.01, steps=2, kind="exponential")(1), 0.1)
    assert Ramp(3.0, kind="constant")(10**6) == 3.0
    with pytest.raises(ValueError, match="kind"):
        Ramp(1.0, kind="step")


# ----------------------------------------------------------------------------------------------
# the training loop


class StepRecorder(L.Callback):
    """Which parameters changed at each training batch, and what the model logged."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = {
            "g": pl_module.decoder.last_layer.detach().clone(),
            "d": None
            if pl_module.discriminator is None
            else next(pl_module.discriminator.parameters()).detach().clone(),
            "step": trainer.global_step,
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        row = {
            "step": self.before["step"],
            "global_step_after": trainer.global_step,
            "g": not torch.equal(self.before["g"], pl_module.decoder.last_layer),
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        if self.before["d"] is not None:
            row["d"] = not torch.equal(self.before["d"], next(pl_module.discriminator.parameters()))
        self.rows.append(row)


def fit(module, tmp_path: Path, steps: int, **trainer_kwargs) -> StepRecorder:
    recorder = StepRecorder()
    trainer = quiet_trainer(
        tmp_path,
        max_steps=steps,
        callbacks=[recorder],
        log_every_n_steps=1,
        limit_val_batches=0,
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=tiny_data())
    return recorder


def test_generator_and_discriminator_step_once_per_batch_after_disc_start(tmp_path) -> None:
    module = instantiate(tiny_config("vqgan", "model.disc_start=3"))
    rows = fit(module, tmp_path, steps=6).rows
    assert [r["step"] for r in rows] == list(range(6))  # global_step counts batches
    assert [r["global_step_after"] for r in rows] == list(range(1, 7))
    assert all(r["g"] for r in rows)
    assert [r["d"] for r in rows] == [False, False, False, True, True, True]
    opt_g, opt_d = module.trainer.optimizers
    assert opt_g.state[module.decoder.last_layer]["step"].item() == 6
    assert opt_d.state[next(module.discriminator.parameters())]["step"].item() == 3
    assert "train/d_loss" in rows[-1]["metrics"] and "train/d_loss" not in rows[2]["metrics"]


def test_vqvae_has_one_optimizer_and_no_adversary(tmp_path) -> None:
    module = instantiate(tiny_config("vqvae"))
    assert module.discriminator is None and module.perceptual is None
    rows = fit(module, tmp_path, steps=2).rows
    assert len(module.trainer.optimizers) == 1 and all(r["g"] for r in rows)


def test_gumbel_temperature_and_kl_weight_follow_their_schedules(tmp_path) -> None:
    module = instantiate(
        tiny_config(
            "dvae",
            "model.temperature.steps=4",
            "model.kl_weight.steps=4",
            "model.kl_weight.end=0.5",
        )
    )
    rows = fit(module, tmp_path, steps=6).rows
    for row in rows:
        step = row["step"]
        assert math.isclose(
            row["metrics"]["train/temperature"], module.temperature(step), rel_tol=1e-6
        )
        assert math.isclose(row["metrics"]["train/kl_weight"], module.kl_weight(step), rel_tol=1e-6)
    assert rows[0]["metrics"]["train/temperature"] == 1.0
    assert math.isclose(rows[-1]["metrics"]["train/temperature"], 1 / 16)
    assert math.isclose(rows[-1]["metrics"]["train/kl_weight"], 0.5)


def test_gradient_clipping_applies_to_manual_optimization(tmp_path) -> None:
    module = instantiate(tiny_config("vqgan", "model.disc_start=0", "model.grad_clip=1e-6"))
    norms = []
    original = module.clip_gradients

    def clip(optimizer, **kwargs):
        original(optimizer, **kwargs)
        params = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())

    module.clip_gradients = clip
    fit(module, tmp_path, steps=2)
    assert len(norms) == 4 and max(norms) <= 1e-6 * 1.01


@pytest.mark.parametrize("model", MODELS)
def test_checkpoint_round_trip_through_genlab_load(model: str, tmp_path: Path) -> None:
    config = tiny_config(model, "model.disc_start=1")
    module = instantiate(config)
    trainer = quiet_trainer(
        tmp_path,
        max_steps=3,
        limit_val_batches=1,
        callbacks=[ModelConfigInCheckpoint(config)],
        precision="bf16-mixed",
    )
    trainer.fit(module, datamodule=tiny_data())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = genlab.load(path)
    module.eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.reconstruct(x), module.reconstruct(x))
        if model in ("vae", "beta_vae"):
            assert torch.equal(loaded.encode(x).mean, module.encode(x).mean)
            z = torch.randn(3, module.latent_channels, 4, 4)
            assert torch.equal(loaded.decode(z), module.decode(z))
        elif model in ("ae", "dae"):
            assert torch.equal(loaded.encode(x), module.encode(x))
            assert loaded.denoising == (model == "dae")
        else:
            tokens = loaded.encode_indices(x)
            assert torch.equal(tokens, module.encode_indices(x))
            assert torch.equal(loaded.decode_indices(tokens), module.decode_indices(tokens))
    assert not any(k.startswith("perceptual.") for k in torch.load(path)["state_dict"])


def test_codebook_usage_is_logged_every_validation(tmp_path) -> None:
    module = instantiate(tiny_config("vqgan"))
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=2, log_every_n_steps=1)
    trainer.fit(module, datamodule=tiny_data(n=16))  # one epoch of 2 batches, then validation
    metrics = trainer.callback_metrics
    for key in ("val/psnr", "val/ssim", "val/codebook_usage", "val/perplexity", "val/loss"):
        assert key in metrics, key
    assert 0 < metrics["val/codebook_usage"] <= 1
    assert 1 <= metrics["val/perplexity"] <= 32


def test_dae_corrupts_inputs_in_training_only(tmp_path) -> None:
    """The DAE's encoder sees corrupted inputs in training and clean ones in evaluation, where
    the corrupted-input metrics use a corruption seeded by each item's index; the AE never
    corrupts in training. Masking keeps or zeroes whole pixels."""
    seen: list[torch.Tensor] = []
    for model in ("dae", "ae"):
        module = instantiate(tiny_config(model))
        module.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
        x = torch.rand(4, 3, 16, 16) * 2 - 1
        module.train()
        module.forward_train(x)
        assert torch.equal(seen[-1], x) == (model == "ae")
        if model == "dae":
            assert (seen[-1] - x).std() == pytest.approx(0.5, rel=0.1)  # noise_std
        module.eval()
        module.forward_eval(x)
        assert torch.equal(seen[-1], x)

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    masked = corrupt(x, "mask", noise_std=0.0, mask_prob=0.5)
    zero = masked == 0
    assert torch.equal(zero.all(1), zero.any(1))  # whole pixels
    assert 0.3 < zero.all(1).float().mean() < 0.7
    torch.testing.assert_close(masked[~zero], x[~zero])
    gens = lambda: [torch.Generator().manual_seed(i) for i in (3, 4)]  # noqa: E731
    assert torch.equal(
        corrupt(x, "gaussian", noise_std=0.2, mask_prob=0.0, generators=gens()),
        corrupt(x, "gaussian", noise_std=0.2, mask_prob=0.0, generators=gens()),
    )

    module = instantiate(tiny_config("dae", "model.corruption=mask"))
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=2, log_every_n_steps=1)
    trainer.fit(module, datamodule=tiny_data(n=16))
    metrics = trainer.callback_metrics
    for key in ("val/psnr", "val/ssim", "val/psnr_corrupted", "val/ssim_corrupted"):
        assert key in metrics, key
    with pytest.raises(ValueError, match="double_latent: false"):
        instantiate(tiny_config("ae", "model.encoder.double_latent=true"))
    with pytest.raises(ValueError, match="corruption='blur'"):
        instantiate(tiny_config("dae", "model.corruption=blur"))


def test_collapse_warning(caplog) -> None:
    module = instantiate(tiny_config("vqgan"))
    with caplog.at_level("WARNING"):
        module.warn_collapse(0.01, 1.2)
    assert "codebook collapse" in caplog.text


# ----------------------------------------------------------------------------------------------
# the recipes through the real entry point

RECIPE_TINY = [
    *TINY_DATA,
    "data.train_size=32",  # 4 steps are one whole epoch
    *TINY_RUN,
    "model.encoder.channels=[16,32,32]",
    "model.encoder.groups=8",
]
RECIPES = {
    # the adversary from step 2 and the offline LPIPS: every loss of the method runs
    "vqgan_shapes": [
        "model.disc_start=2",
        "model.perceptual_weight=1.0",
        "model.perceptual.weights=offline",
        "model.discriminator.channels=8",
        "model.quantizer.num_codes=64",
    ],
    "vqvae_shapes": ["model.quantizer.num_codes=64"],
    "vae_shapes": ["model.disc_start=2", "model.discriminator.channels=8"],
    "dvae_shapes": ["model.quantizer.num_codes=64"],
    "dae_shapes": ["model.corruption=mask"],
}


@pytest.mark.parametrize("experiment", list(RECIPES))
def test_recipe_trains_and_evaluates_through_train_py(experiment: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_entry(
        "train.py",
        f"experiment={experiment}",
        *RECIPE_TINY,
        *RECIPES[experiment],
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert "the trainer does not clip" in result.stdout + result.stderr
    (report,) = (run_dir / "metrics").glob("test_step*.json")
    results = {r["name"]: r for r in json.loads(report.read_text())}
    recon = results["reconstructed"]["metrics"]
    assert {"fid", "psnr", "ssim", "caption_exact"} <= set(recon)
    assert ("generated" in results) == experiment.startswith("vae")
    assert (run_dir / "samples" / "recon_final.png").is_file()
    (ckpt,) = (run_dir / "checkpoints").glob("epoch_*.ckpt")
    model = genlab.load(ckpt)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert model.reconstruct(images).shape == images.shape


def test_vqgan_trains_under_ddp(tmp_path: Path) -> None:
    """Two gloo processes: the generator and discriminator steps each leave the other's
    parameters without gradients, which train.py's find_unused_parameters makes legal."""
    run_dir = tmp_path / "run"
    result = run_entry(
        "train.py",
        "experiment=vqgan_shapes",
        "trainer=ddp_cpu",
        *RECIPE_TINY,
        *RECIPES["vqgan_shapes"],
        "model.perceptual_weight=0",
        "callbacks.generative_metrics=null",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    (ckpt,) = (run_dir / "checkpoints").glob("epoch_*.ckpt")
    assert torch.load(ckpt, weights_only=False)["global_step"] == 4


def test_perceptual_network_is_kept_out_of_checkpoints_and_ddp_sync() -> None:
    on = instantiate(
        tiny_config(
            "vqgan",
            "+model.perceptual={_target_: genlab.nn.lpips.LPIPS, weights: offline}",
            "model.perceptual_weight=1.0",
        )
    )
    assert on.perceptual is not None and on.perceptual.kind == "offline"
    assert not any(k.startswith("perceptual.") for k in on.state_dict())
    ignored = set(on._ddp_params_and_buffers_to_ignore)
    assert ignored == {f"perceptual.{n}" for n, _ in on.perceptual.named_buffers()} and ignored
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    losses = on.reconstruction_loss(x.flip(0), x)
    assert losses["perceptual"] > 0 and torch.allclose(
        losses["rec"], losses["pixel"] + losses["perceptual"]
    )
    off = instantiate(tiny_config("vqgan", "model.perceptual_weight=0"))
    assert off.perceptual is None  # weight 0: never computed, not kept


def test_evaluation_loss_uses_the_final_schedule_values() -> None:
    module = instantiate(tiny_config("dvae", "model.kl_weight.end=0.5")).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = module.forward_eval(x)  # no trainer: step 0, where the ramp is still at 0
    assert module.kl_weight(0) == 0.0 and module.kl_weight.final == 0.5
    assert torch.allclose(out.regularization, 0.5 * out.logs["kl"] * 16 / (3 * 16 * 16))
    assert "temperature" not in out.logs and "kl_weight" not in out.logs
