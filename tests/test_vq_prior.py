"""The VQ prior: the gated PixelCNN's causality (by gradients), the Transformer prior's cached and
uncached sampling, samples that are the network's own greedy choices, label conditioning with
guidance, and training through the entry points until it beats the uniform prior in bits per code
(a tiny VQ-GAN made by the test)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

import genlab
from conftest import (
    TINY_DATA,
    TINY_RUN,
    check_ok,
    compose_model,
    make_first_stage,
    quiet_trainer,
    run_entry,
    shapes_data,
)
from genlab.models.autoregressive.codes import draw_token
from genlab.models.autoregressive.vq_prior import VQPrior
from genlab.nn.pixelcnn import GatedPixelCNN
from genlab.utils.instantiate import instantiate

SIZE = 16  # a 4 x 4 code grid with the tiny VQ-GAN (f = 4, 32 codes)
TINY_PIXELCNN = [
    "model/net=pixelcnn",
    "model.net.channels=16",
    "model.net.layers=3",
    "model.net.kernel=3",
    "model.net.hidden=32",
]
TINY_GPT = ["model.net.width=32", "model.net.layers=2", "model.net.heads=2"]


@pytest.fixture(scope="module")
def vqgan(tmp_path_factory) -> Path:
    return make_first_stage("vqgan", tmp_path_factory.mktemp("vqgan") / "vqgan.ckpt")


def tiny_prior(tokenizer: Path, net: list[str], *overrides: str) -> VQPrior:
    config = compose_model(
        [
            "model=vq_prior",
            f"model.tokenizer_ckpt={tokenizer}",
            f"data.resolution={SIZE}",
            *net,
            *overrides,
        ]
    )
    return instantiate(config)


def test_pixelcnn_logits_depend_only_on_earlier_codes() -> None:
    """The gradient of the logits at each position reaches only the code embeddings before it in
    raster order (the first position none), with no blind spot within the receptive field."""
    torch.manual_seed(0)
    grid = 5
    net = GatedPixelCNN(num_codes=7, num_classes=2, grid=grid, channels=8, layers=4, kernel=3)
    net = net.double()
    codes = torch.randint(0, 7, (1, grid, grid))
    x = net.embed(codes).permute(0, 3, 1, 2).detach().requires_grad_(True)
    cond = net.class_embed(torch.tensor([1]))
    v, h = x, x
    for layer in net.layers:
        v, h = layer(v, h, cond)
    logits = net.head(h)  # (1, K, grid, grid)
    order = torch.arange(grid * grid).view(grid, grid)
    for r in range(grid):
        for c in range(grid):
            (grad,) = torch.autograd.grad(logits[0, :, r, c].sum(), x, retain_graph=True)
            reached = grad[0].abs().sum(0) > 0
            assert not reached[order >= r * grid + c].any(), (r, c)
            if r > 0 and c > 0:  # the neighbours above, above-left, above-right and left
                assert reached[r - 1, c] and reached[r - 1, c - 1] and reached[r, c - 1], (r, c)
                assert reached[r - 1, min(c + 1, grid - 1)], (r, c)
    with pytest.raises(ValueError, match="kernel=4"):
        GatedPixelCNN(num_codes=7, kernel=4)


@pytest.mark.parametrize("net", ["pixelcnn", "gpt"])
def test_greedy_samples_are_the_networks_own_choices(vqgan, net) -> None:
    """At temperature 0 every drawn code is the argmax of the logits given the codes before it,
    checked with one full pass over the finished grid (causal: later codes do not change it)."""
    prior = tiny_prior(vqgan, TINY_PIXELCNN if net == "pixelcnn" else TINY_GPT).eval()
    generator = torch.Generator().manual_seed(0)
    images = prior.generate(n=3, temperature=0.0, generator=generator)
    assert images.shape == (3, 3, SIZE, SIZE) and images.abs().max() <= 1
    classes = torch.zeros(3, dtype=torch.long)
    codes = prior.sample_codes(
        classes, None, prior.resolve_options({"temperature": 0.0}), False, True
    )
    logits = prior.logits(prior.net, codes, classes)  # (3, N, K)
    assert torch.equal(logits.argmax(-1), codes.flatten(1))
    assert codes.shape == (3, 4, 4) and codes.max() < prior.num_codes


def test_transformer_prior_cached_and_uncached_draw_the_same_codes(vqgan) -> None:
    prior = tiny_prior(vqgan, TINY_GPT, "model.condition=label", "model.num_classes=3").eval()
    labels = torch.tensor([0, 2, 1])
    opts = prior.resolve_options({"guidance_scale": 2.0, "top_k": 8, "top_p": 0.9})
    draws = [
        prior.sample_codes(labels, torch.Generator().manual_seed(4), opts, True, cache)
        for cache in (True, False)
    ]
    assert torch.equal(draws[0], draws[1])


def test_label_prior_guidance_and_bad_requests(vqgan) -> None:
    prior = tiny_prior(vqgan, TINY_PIXELCNN, "model.condition=label", "model.num_classes=3").eval()
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain = prior.generate(labels=[0, 1, 2, 2], generator=g())
    assert plain.shape == (4, 3, SIZE, SIZE)
    assert torch.equal(
        prior.generate(labels=[0, 1, 2, 2], generator=g(), guidance_scale=1.0), plain
    )
    assert prior.generate(n=5, generator=g()).shape == (5, 3, SIZE, SIZE)  # drawn labels
    # guidance at scale s mixes the class's logits with the null class's
    codes = torch.randint(0, prior.num_codes, (2, 4, 4))
    with torch.no_grad():
        cond = prior.logits(prior.net, codes, torch.tensor([1, 1]))
        null = prior.logits(prior.net, codes, torch.tensor([3, 3]))
    mixed = null[:, 0] + 3.0 * (cond[:, 0] - null[:, 0])
    opts = {"guidance_scale": 3.0, "temperature": 0.0, "top_k": 0, "top_p": 1.0}
    both = torch.cat([cond[:, 0], null[:, 0]])
    assert torch.equal(draw_token(both, None, opts, True), mixed.argmax(-1))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        prior.generate(labels=[3])
    with pytest.raises(ValueError, match="not prompts"):
        prior.generate(["a red circle"], n=1)
    with pytest.raises(ValueError, match="top_p=0"):
        prior.generate(labels=[0], top_p=0.0)
    with pytest.raises(ValueError, match="model=dalle"):
        tiny_prior(vqgan, TINY_GPT, "model.condition=text")
    with pytest.raises(ValueError, match="needs model.num_classes"):
        tiny_prior(vqgan, TINY_GPT, "model.condition=label")
    unconditional = tiny_prior(vqgan, TINY_GPT).eval()
    with pytest.raises(ValueError, match="pass n >= 1"):
        unconditional.generate()
    with pytest.raises(ValueError, match="unconditional; pass n"):
        unconditional.generate(labels=[0])


def test_first_stage_stays_frozen_and_out_of_the_checkpoint(vqgan, tmp_path) -> None:
    prior = tiny_prior(vqgan, TINY_GPT)
    before = {k: v.clone() for k, v in prior.first_stage.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=1)
    trainer.fit(prior, datamodule=shapes_data(SIZE, max_objects=1))
    assert all(torch.equal(before[k], v) for k, v in prior.first_stage.state_dict().items())
    assert not any(k.startswith("first_stage") for k in prior.state_dict())
    with pytest.raises(ValueError, match="image_size=32"):
        tiny_prior(vqgan, TINY_GPT, "data.resolution=32")


@pytest.mark.parametrize("net", [pytest.param("pixelcnn", marks=pytest.mark.slow), "gpt"])
def test_prior_trains_through_train_py_and_beats_the_uniform_prior(vqgan, net, tmp_path) -> None:
    """A few hundred steps on shapes through train.py: test bits per code below log2 K; then
    sample.py (labels of a scene-derived class) and eval.py on the checkpoint."""
    run = tmp_path / "run"
    nets = TINY_PIXELCNN if net == "pixelcnn" else [*TINY_GPT, "model/net=gpt_tiny"]
    result = run_entry(
        "train.py",
        "experiment=vq_prior_shapes_label",
        f"model.tokenizer_ckpt={vqgan}",
        *TINY_DATA,
        "data.train_size=1024",
        "data.batch_size=32",
        *TINY_RUN,
        "trainer.max_steps=200",
        "trainer.log_every_n_steps=20",
        "trainer.precision=32-true",
        f"data.resolution={SIZE}",
        "data.shapes=[circle,square]",
        "data.colors=[red,green,blue]",
        "data.hold_out=false",
        "model.num_classes=6",
        *nets,
        f"hydra.run.dir={run}",
        tmp_path=tmp_path,
        timeout=600,
    )
    check_ok(result)
    rows = list(csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open()))
    tested = {k: float(v) for row in rows for k, v in row.items() if v and k.startswith("test/")}
    assert tested["test/uniform_bpc"] == pytest.approx(math.log2(32))
    assert tested["test/bpc"] < tested["test/uniform_bpc"] - 1.0, tested
    assert "test/fid" in tested  # the generative metrics of the usual callback
    assert (run / "samples" / "final.png").is_file()
    grid_text = (run / "samples" / "prompts.txt").read_text().splitlines()
    assert grid_text[:2] == ["red circle", "green circle"]  # class names of the labels drawn

    ckpt = run / "checkpoints" / "last.ckpt"
    model = genlab.load(ckpt)
    assert model.condition == "label" and model.pixelcnn == (net == "pixelcnn")
    out = tmp_path / "samples.png"
    result = run_entry(
        "sample.py",
        f"ckpt_path={ckpt}",
        "labels=[0,4]",
        "n=1",
        "top_k=8",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'sample'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert out.is_file()
