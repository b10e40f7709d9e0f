"""The DDPM LightningModule: loss at initialisation, generation contract, evaluation
reproducibility, a short fit that learns, and a self-describing checkpoint round trip."""

import functools
import math

import lightning as L
import pytest
import torch

import genlab
from conftest import quiet_trainer
from genlab.data.shapes import ShapesDataModule
from genlab.diffusion.samplers import Sampler
from genlab.models.diffusion.model import DiffusionModel
from genlab.utils.checkpoint import ModelConfigInCheckpoint

NET = {
    "_target_": "genlab.nn.unet.UNet",
    "channels": [16, 32],
    "attention_levels": [1],
    "heads": 2,
    "context_dim": 32,
    "cond_dim": 32,
}
TEXT = {
    "_target_": "genlab.nn.text_encoder.TransformerTextEncoder",
    "vocab_size": 128,
    "context_length": 24,
    "width": 32,
    "layers": 1,
    "heads": 2,
}
MODEL = {
    "_target_": "genlab.models.diffusion.model.DiffusionModel",
    "net": NET,
    "text_encoder": TEXT,
    "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 2e-3},
    "image_size": 16,
    "tokenizer_vocab_size": 128,
    "sampler": {"_target_": "genlab.diffusion.samplers.Sampler", "steps": 5},
}


def tiny_data(**kw) -> ShapesDataModule:
    args = dict(resolution=16, batch_size=16, train_size=256, val_size=32, test_size=32)
    return ShapesDataModule(**{**args, **kw})


def tiny_model(**kw) -> DiffusionModel:
    return genlab.utils.instantiate.instantiate({**MODEL, **kw})


def trainer(tmp_path, **kw) -> L.Trainer:
    return quiet_trainer(tmp_path, **kw)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny model fitted for 60 steps on 16 px shapes, and its trainer."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("ddpm")
    model, data = tiny_model(), tiny_data()
    trainer_ = trainer(tmp, max_steps=60, callbacks=[ModelConfigInCheckpoint(MODEL)])
    trainer_.fit(model, data)
    return model, data, trainer_


def test_untrained_eps_loss_is_one():
    """The zero-initialised head predicts ε̂ = 0, so the ε-MSE is E[ε²] = 1."""
    model, data = tiny_model(), tiny_data()
    data.setup("fit")
    model.tokenizer = genlab.data.tokenizer.BPETokenizer.train(
        data.train_captions(), vocab_size=128
    )
    batch = next(iter(data.val_dataloader()))
    assert model.evaluation_loss(batch).mean().item() == pytest.approx(1.0, abs=0.05)


def test_training_lowers_the_loss(fitted):
    model, data, trainer_ = fitted
    metrics = trainer_.validate(model, data, verbose=False)[0]
    assert metrics["val/loss"] < 0.5


def test_evaluation_loss_does_not_depend_on_batching(fitted):
    model, data, _ = fitted
    batch = next(iter(data.val_dataloader()))
    whole = model.evaluation_loss(batch)
    halves = [{k: v[i : i + 8] for k, v in batch.items()} for i in (0, 8)]
    torch.testing.assert_close(torch.cat([model.evaluation_loss(h) for h in halves]), whole)


def test_generate_contract(fitted):
    model = fitted[0]
    prompts = ["a large red circle at the top left", "a small blue square in the center"]
    g = functools.partial(torch.Generator().manual_seed, 7)
    images = model.generate(prompts, n=3, generator=g())
    assert images.shape == (6, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(model.generate(prompts, n=3, generator=g()), images)
    ddpm = model.generate(prompts, sampler="ddpm", steps=4, guidance_scale=1.0, generator=g())
    assert ddpm.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate(["a red circle", "  "])
    with pytest.raises(ValueError, match="list of str"):
        model.generate("a red circle")
    with pytest.raises(ValueError, match="sampler.name='rk4'"):
        model.generate(prompts, sampler="rk4")


def test_negative_prompt_replaces_the_null_caption_of_guidance(fitted):
    """The empty negative prompt is the null caption itself: bitwise the plain draw; another one
    changes the draw; one per prompt is expanded over the n images of each prompt."""
    model = fitted[0]
    prompts = ["a large red circle at the top left", "a small blue square in the center"]
    g = functools.partial(torch.Generator().manual_seed, 3)
    plain = model.generate(prompts, n=2, generator=g())
    assert torch.equal(model.generate(prompts, n=2, generator=g(), negative_prompt=""), plain)
    away = model.generate(prompts, n=2, generator=g(), negative_prompt="a large red circle")
    assert (away - plain).abs().max() > 1e-3
    per_prompt = model.generate(
        prompts, n=2, generator=g(), negative_prompt=["a large red circle", ""]
    )
    torch.testing.assert_close(per_prompt[:2], away[:2])  # prompt 0: the red circle avoided
    torch.testing.assert_close(per_prompt[2:], plain[2:])  # prompt 1: the null caption
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        model.generate(prompts[:1], negative_prompt=["a", "b"])
    with pytest.raises(ValueError, match="needs classifier-free guidance: guidance_scale=1.0"):
        model.generate(prompts, guidance_scale=1.0, negative_prompt="a red circle")
    label = tiny_model(condition="label", num_classes=3, text_encoder=None)
    assert "negative_prompt" not in label.capabilities
    with pytest.raises(ValueError, match="no caption for it to replace"):
        label.generate(labels=[0], negative_prompt="a red circle")


def test_checkpoint_rebuilds_the_model_without_configs(fitted, tmp_path):
    model, _, trainer_ = fitted
    path = tmp_path / "model.ckpt"
    trainer_.save_checkpoint(path)
    loaded = genlab.load(path)
    assert loaded.tokenizer.to_json() == model.tokenizer.to_json()
    prompts = ["a large green triangle at the bottom"]
    a = model.generate(prompts, n=2, generator=torch.Generator().manual_seed(1))
    b = loaded.generate(prompts, n=2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)


def test_load_rejects_foreign_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        genlab.load(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not written by a genlab"):
        genlab.load(tmp_path / "foreign.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        genlab.load(tmp_path / "garbage.ckpt")


def test_label_and_unconditional_models():
    net = {**NET, "context_dim": None, "cond_dim": None, "num_classes": 4}
    model = tiny_model(net=net, text_encoder=None, condition="label", num_classes=4)
    assert model.generate(labels=[0, 3], generator=torch.Generator().manual_seed(0)).shape[0] == 2
    with pytest.raises(ValueError, match="labels must be in"):
        model.generate(labels=[4])
    uncond = tiny_model(
        net={**NET, "context_dim": None, "cond_dim": None}, text_encoder=None, condition="none"
    )
    assert uncond.generate(n=3).shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="needs a model.text_encoder"):
        tiny_model(text_encoder=None)


UNCOND = {"net": {**NET, "context_dim": None, "cond_dim": None}, "text_encoder": None}


@pytest.mark.parametrize(
    "options",
    [
        {"learned_variance": True, "net": {**NET, "out_channels": 6}},
        {"loss_weighting": "min_snr", "prediction": "eps"},
        {"continuous_time": True, "schedule": "linear"},
        {"offset_noise": 0.1, "schedule": "sigmoid", "prediction": "x0"},
    ],
    ids=["hybrid", "min_snr", "continuous", "offset_noise"],
)
def test_training_options_fit_and_sample(options, tmp_path):
    model = tiny_model(**options)
    trainer_ = trainer(tmp_path, max_steps=6, log_every_n_steps=1)
    data = tiny_data()
    trainer_.fit(model, data)
    logged = dict(trainer_.logged_metrics)
    val = trainer_.validate(model, data, verbose=False)[0]
    assert torch.isfinite(logged["train/loss"]) and math.isfinite(val["val/loss"])
    if options.get("learned_variance"):  # the hybrid loss logs its two parts
        assert logged["train/vlb"] > 0 and logged["train/mse"] > 0
    images = model.generate(["a red circle"], n=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_learned_variance_needs_twice_the_output_channels():
    with pytest.raises(ValueError, match=r"model.net.out_channels=3 must be 6"):
        tiny_model(learned_variance=True)
    with pytest.raises(ValueError, match="discrete schedule"):
        tiny_model(learned_variance=True, continuous_time=True, net={**NET, "out_channels": 6})


def test_min_snr_loss_is_the_weighted_simple_loss():
    """Same weights, t and ε: the min-SNR loss is min_snr_weight × the plain per-sample MSE."""
    torch.manual_seed(0)
    plain, weighted = tiny_model(prediction="eps", **UNCOND, condition="none"), None
    weighted = tiny_model(prediction="eps", loss_weighting="min_snr", **UNCOND, condition="none")
    weighted.load_state_dict(plain.state_dict())
    for layer in (plain.denoiser["net"].head[-1], weighted.denoiser["net"].head[-1]):
        torch.nn.init.normal_(layer.weight, std=0.1, generator=torch.Generator().manual_seed(1))
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    t, eps = torch.tensor([0, 10, 300, 999]), torch.randn(4, 3, 16, 16)
    a = plain.forward_loss(x0, t, eps, {}, plain.denoiser)["loss"]
    b = weighted.forward_loss(x0, t, eps, {}, weighted.denoiser)["loss"]
    alpha_bar = plain.schedule.alpha_bar(t)
    snr = alpha_bar / (1 - alpha_bar)
    torch.testing.assert_close(b, a * (snr.clamp(max=5.0) / snr).float())


@pytest.mark.parametrize(
    "sampler",
    [
        {"name": "ddpm", "steps": 6},
        {"name": "ddim", "steps": 6, "eta": 1.0},
        {"name": "dpmpp_2m", "steps": 6},
        {"name": "euler", "steps": 6},
        {"name": "heun", "steps": 4},
    ],
    ids=lambda s: s["name"] + ("-eta1" if s.get("eta") else ""),
)
def test_every_sampler_draws_reproducibly(fitted, sampler):
    model = fitted[0]
    spec = Sampler(**sampler)

    def draw():
        g = torch.Generator().manual_seed(3)
        return model.generate(["a red circle"], n=2, sampler=spec, generator=g)

    images = draw()
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    torch.testing.assert_close(draw(), images)


def test_inpainting_keeps_the_known_pixels_and_thresholding_options(fitted):
    model = fitted[0]
    known = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, :8] = 1  # keep the left half
    for sampler in ("ddim", "ddpm", "heun"):
        out = model.generate(
            ["a red circle"],
            n=2,
            sampler=sampler,
            steps=5,
            known=known,
            mask=mask,
            generator=torch.Generator().manual_seed(1),
        )
        torch.testing.assert_close(out[..., :8], known[..., :8].expand(2, -1, -1, -1))
        assert not torch.allclose(out[..., 8:], known[..., 8:].expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="needs a mask"):
        model.generate(["a red circle"], known=known)
    dynamic = model.generate(["a red circle"], thresholding="dynamic", guidance_scale=8.0)
    assert dynamic.shape == (1, 3, 16, 16)


def test_sdedit_strength_runs_the_tail_of_the_grid(fitted):
    """SDEdit (Meng et al. 2022): strength 0 returns the input, strength 1 is the draw from noise
    with the same seed, and strength s noises the input to the first of the sampler's last
    round(s · steps) grid times, then runs those steps (checked against the sampler by hand)."""
    model = fitted[0]
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    init = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a red circle"]
    plain = model.generate(prompts, n=2, steps=6, generator=g())
    assert torch.equal(
        model.generate(prompts, n=2, steps=6, init_image=init, strength=1.0, generator=g()), plain
    )
    torch.testing.assert_close(
        model.generate(prompts, n=2, steps=6, init_image=init, strength=0.0, generator=g()), init
    )
    edited = model.generate(prompts, n=2, steps=6, init_image=init, strength=0.5, generator=g())
    sampler = model.sampling_options(steps=6).sampler  # DDIM, deterministic
    ts = sampler.timesteps(model.schedule, 0.5)
    assert len(ts) == 3 and torch.equal(ts, sampler.timesteps(model.schedule)[3:])
    noise = torch.randn((2, 3, 16, 16), generator=g())
    a = float(model.schedule.alpha_bar(ts[:1]))
    x = a**0.5 * init + (1 - a) ** 0.5 * noise
    options = model.sampling_options(steps=6)
    denoiser = model.sampling_denoiser(
        {"caption": prompts * 2},
        guidance_scale=options.guidance_scale,
        thresholding=options.thresholding,
    )
    torch.testing.assert_close(edited, sampler(denoiser, x, timesteps=ts).clamp(-1, 1))
    assert (edited - init).abs().mean() < (plain - init).abs().mean()  # nearer its input
    one = model.generate(prompts, n=2, steps=6, init_image=init[:1], generator=g())  # 0.75
    assert one.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="pass init_image"):
        model.generate(prompts, strength=0.5)
    with pytest.raises(ValueError, match=r"strength=1.5 must be in \[0, 1\]"):
        model.generate(prompts, init_image=init[:1], strength=1.5)
    with pytest.raises(ValueError, match="init_image of shape"):
        model.generate(prompts, init_image=init[:1, :, :8])


def test_bits_per_dim_at_test_time_is_a_bound_independent_of_batching(tmp_path):
    """test/bpd on the first items, with T = 20 steps to stay fast; per-item noise seeds."""
    model = tiny_model(num_timesteps=20, bpd_images=8, **UNCOND, condition="none")
    data = tiny_data(test_size=16, batch_size=16)
    metrics = trainer(tmp_path).test(model, data, verbose=False)[0]
    # an untrained model (x̂0 from ε̂ = 0) still gives a finite bound; 8-bit data has at most 8
    # bits per dimension of information but a bad model may need more
    assert 0 < metrics["test/bpd"] < 100
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    keep = batch["index"] < 8
    whole = model.bits_per_dim(batch, keep)
    halves = [{k: v[i : i + 4] for k, v in batch.items()} for i in (0, 4)]
    split = torch.cat([model.bits_per_dim(h, h["index"] < 8) for h in halves])
    torch.testing.assert_close(split, whole)
    assert metrics["test/bpd"] == pytest.approx(whole.mean().item(), rel=1e-5)


def test_classifier_guidance_through_generate():
    """An unconditional model guided by a noisy classifier on its schedule; wrong use refused."""
    from genlab.models.diffusion.noisy_classifier import NoisyClassifier
    from genlab.nn.classifier import NoisyClassifierNet

    def classifier(**kw):
        net = NoisyClassifierNet(in_channels=3, num_classes=4, channels=[16, 32], groups=8)
        opt = functools.partial(torch.optim.AdamW, lr=1e-3)
        return NoisyClassifier(net=net, optimizer=opt, num_classes=4, image_size=16, **kw)

    torch.manual_seed(0)
    model = tiny_model(**UNCOND, condition="none")
    clf = classifier()

    def draw(**kw):
        g = torch.Generator().manual_seed(0)
        return model.generate(labels=[1, 2], generator=g, **kw)

    guided = draw(classifier=clf, classifier_scale=50.0)
    assert guided.shape == (2, 3, 16, 16)
    unguided = model.generate(n=2, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(guided, unguided)
    with pytest.raises(ValueError, match="num_timesteps"):
        draw(classifier=classifier(num_timesteps=500))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        model.generate(labels=[7], classifier=clf)
    with pytest.raises(ValueError, match="label-conditional or unconditional"):
        tiny_model().generate(["a red circle"], labels=[1], classifier=clf)
