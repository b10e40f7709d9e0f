"""GLIDE's CLIP guidance: the noise-aware CLIP (trained on x_t, evaluated with t seeded by item),
its guidance gradient against finite differences, the ε shift it makes in generate(), what is
refused, and sample.py with a tiny DDPM and a tiny noise-aware CLIP trained by its recipe through train.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import genlab
from conftest import (
    CLIP_TINY,
    TINY_BPE,
    TINY_DATA,
    TINY_TRAINER,
    TINY_UNET,
    check_ok,
    compose_model,
    quiet_trainer,
    run_entry,
    shapes_data,
)
from genlab.data.tokenizer import BPETokenizer
from genlab.diffusion.guidance import classifier_guidance
from genlab.utils.instantiate import instantiate

NOISY_CLIP = [
    "experiment=clip_noisy_shapes",
    *TINY_DATA,
    *CLIP_TINY,
    "model.image_encoder.channels=[16,32]",
]
CAPTIONS = ["a red circle", "a large blue square at the top left"]


def tiny_noisy_clip(*overrides: str):
    return instantiate(compose_model([*NOISY_CLIP, *overrides]))


@pytest.fixture(scope="module")
def noisy_clip(tmp_path_factory) -> Path:
    """A tiny noise-aware CLIP trained a few steps by its recipe through train.py."""
    folder = tmp_path_factory.mktemp("noisy_clip")
    result = run_entry(
        "train.py",
        *NOISY_CLIP,
        *TINY_TRAINER,
        "trainer.max_steps=3",
        "data.batch_size=16",
        f"hydra.run.dir={folder / 'run'}",
        tmp_path=folder,
    )
    check_ok(result)
    return folder / "run" / "checkpoints" / "last.ckpt"


def test_guidance_gradient_equals_finite_differences() -> None:
    """∇_{x_t} f(x_t, t)·g(c) of a tiny float64 noise-aware CLIP against central differences."""
    torch.manual_seed(0)
    clip = tiny_noisy_clip().double()
    clip.tokenizer = BPETokenizer.train(CAPTIONS * 4, vocab_size=64)
    grad_fn = clip.guidance_grad(CAPTIONS)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    t = torch.tensor([100, 700])
    grad = grad_fn(x, t)
    assert grad.shape == x.shape and grad.dtype == torch.float64
    text = clip.encode_texts(CAPTIONS).double()

    def similarity(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (clip.embed_images(images, t) * text).sum(1)

    h = 1e-6
    for index in [(0, 0, 3, 4), (0, 2, 15, 0), (1, 1, 8, 8), (1, 0, 0, 15)]:
        step = torch.zeros_like(x)
        step[index] = h
        numeric = (similarity(x + step) - similarity(x - step))[index[0]] / (2 * h)
        assert float(grad[index]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-9), index


def test_noise_aware_clip_trains_on_noised_images_and_is_seeded_in_evaluation(tmp_path) -> None:
    clip = tiny_noisy_clip()
    seen: list[torch.Tensor] = []
    clip.image_encoder.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(clip, datamodule=shapes_data(16))
    training_t = torch.cat(seen[:2])  # before validation
    assert training_t.unique().numel() > 4 and training_t.max() < 1000  # uniform t per image
    data = shapes_data(16)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    gens = lambda: [torch.Generator().manual_seed(int(i)) for i in batch["index"]]  # noqa: E731
    first, second = clip.noised(batch["image"], gens()), clip.noised(batch["image"], gens())
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert "val/loss" in trainer.validate(clip, datamodule=data, verbose=False)[0]
    with pytest.raises(ValueError, match="reads the model time t"):
        instantiate(compose_model(["experiment=clip_shapes", *CLIP_TINY, "model.noise_aware=true"]))


def test_generate_with_clip_guidance_shifts_eps_and_refuses_what_does_not_fit(
    noisy_clip,
) -> None:
    clip = genlab.load(noisy_clip)
    model = instantiate(
        compose_model(["model=ddpm", *TINY_DATA, *TINY_UNET, *TINY_BPE, "model.ema_decay=null"])
    ).eval()
    model.tokenizer = BPETokenizer.train(CAPTIONS * 4, vocab_size=64)
    assert "clip_guidance" in model.capabilities
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kw = {"n": 2, "steps": 3, "guidance_scale": 1.0, "thresholding": "none"}
    plain = model.generate(CAPTIONS, generator=g(), **kw)
    zero = model.generate(CAPTIONS, generator=g(), clip=clip, clip_guidance_scale=0.0, **kw)
    torch.testing.assert_close(zero, plain, atol=2e-4, rtol=0)  # x̂0 recomputed from ε̂
    guided = model.generate(CAPTIONS, generator=g(), clip=clip, clip_guidance_scale=500.0, **kw)
    assert not torch.allclose(guided, plain, atol=1e-3)
    # one step by hand: ε̂ − s √(1 − ᾱ) ∇ f(x_t)·g(c) for the rows' captions
    captions = [c for c in CAPTIONS for _ in range(2)]
    denoiser = model.sampling_denoiser(
        {"caption": captions}, guidance_scale=1.0, thresholding="none"
    )
    x, t = torch.randn(4, 3, 16, 16), torch.full((4,), 500.0)
    shifted = classifier_guidance(denoiser, clip.guidance_grad(captions), 7.0)(x, t)
    base, grad = denoiser(x, t), clip.guidance_grad(captions)(x, t)
    alpha_bar = float(model.schedule.alpha_bar(torch.tensor(500.0)))
    torch.testing.assert_close(shifted.eps, base.eps - 7.0 * (1 - alpha_bar) ** 0.5 * grad)

    with pytest.raises(ValueError, match="pass clip_guidance_scale"):
        model.generate(CAPTIONS, clip=clip)
    with pytest.raises(ValueError, match="needs a noise-aware CLIP: pass clip="):
        model.generate(CAPTIONS, clip_guidance_scale=3.0)
    plain_clip = instantiate(compose_model(["experiment=clip_shapes", *TINY_DATA, *CLIP_TINY]))
    with pytest.raises(ValueError, match="noise-aware CLIP"):
        model.generate(CAPTIONS, clip=plain_clip, clip_guidance_scale=3.0)
    clip.schedule = type(clip.schedule)("linear", 1000)
    with pytest.raises(ValueError, match="another noise schedule.*name: noise-aware CLIP 'linear'"):
        model.generate(CAPTIONS, clip=clip, clip_guidance_scale=3.0)


def test_sample_py_with_clip_guidance(trained_run, noisy_clip, tmp_path) -> None:
    out = tmp_path / "guided.png"
    result = run_entry(
        "sample.py",
        f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        'prompt="a red circle"',
        "n=2",
        "steps=3",
        "guidance_scale=1",
        f"clip_ckpt={noisy_clip}",
        "clip_guidance_scale=50",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert out.is_file()
    result = run_entry(
        "sample.py",
        f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        'prompt="a red circle"',
        "clip_guidance_scale=50",
        f"hydra.run.dir={tmp_path / 'run2'}",
        tmp_path=tmp_path,
    )
    assert result.returncode != 0 and "clip_guidance_scale needs clip_ckpt" in result.stderr
