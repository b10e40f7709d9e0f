"""DALL-E: the Transformer's masks (by construction and by gradients), KV-cached decoding equal to
uncached decoding, token sampling filters, CLIP reranking, the frozen first stage, and training,
evaluation and sampling through the entry points on a tiny dVAE made by the test."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import genlab
from conftest import (
    CLIP_TINY,
    TINY_DALLE,
    TINY_DATA,
    TINY_RUN,
    check_ok,
    compose_model,
    make_first_stage,
    quiet_trainer,
    run_entry,
    shapes_data,
)
from genlab.data.tokenizer import BPETokenizer
from genlab.models.autoregressive.dalle import DALLE, sample_logits
from genlab.nn.transformer import DalleTransformer, attention_mask
from genlab.utils.checkpoint import ModelConfigInCheckpoint
from genlab.utils.instantiate import instantiate

SIZE = 16  # 4 x 4 image tokens with the tiny dVAE (f = 4)
DALLE_TINY = [f"data.resolution={SIZE}", "data.max_objects=1", *TINY_DALLE]
ENTRY_TINY = ["experiment=dalle_shapes", *TINY_DATA, *TINY_RUN, *DALLE_TINY]


@pytest.fixture(scope="module")
def dvae(tmp_path_factory) -> Path:
    return make_first_stage("dvae", tmp_path_factory.mktemp("dvae") / "dvae.ckpt")


def tiny_dalle(tokenizer_ckpt: Path, *overrides: str) -> DALLE:
    config = compose_model(
        ["model=dalle", f"model.tokenizer_ckpt={tokenizer_ckpt}", *DALLE_TINY, *overrides]
    )
    return instantiate(config)


@pytest.fixture(scope="module")
def trained(dvae, tmp_path_factory) -> DALLE:
    """A tiny DALL-E trained for a few steps (tokenizer fitted), in eval mode."""
    model = tiny_dalle(dvae)
    trainer = quiet_trainer(tmp_path_factory.mktemp("dalle"), max_steps=3, limit_val_batches=0)
    trainer.fit(model, datamodule=shapes_data(SIZE, max_objects=1))
    return model.eval()


# ----------------------------------------------------------------------------------------------
# the Transformer's masks


def test_attention_masks_have_the_documented_patterns() -> None:
    text, grid = 2, 4  # positions 0-1 text, 2-17 the 4 x 4 grid
    masks = {p: attention_mask(text, grid, p, conv_kernel=3) for p in ("full", "row", "column")}
    masks["conv"] = attention_mask(text, grid, "conv", conv_kernel=3)
    for mask in masks.values():
        assert mask.shape == (18, 18)
        assert mask[:text, :text].tolist() == [[True, False], [True, True]]  # causal text
        assert not mask[:text, text:].any()  # text never sees the image
        assert mask[text:, :text].all()  # the image sees every text token
        assert mask.diagonal().all()  # every position sees itself
        assert not mask.triu(1).any()  # nothing sees the future

    def keys(pattern: str, r: int, c: int) -> set[tuple[int, int]]:
        row = masks[pattern][text + r * grid + c, text:]
        return {(int(i) // grid, int(i) % grid) for i in row.nonzero().flatten()}

    assert keys("full", 2, 1) == {(r, c) for r in range(2) for c in range(4)} | {(2, 0), (2, 1)}
    # row: the last w = 4 positions in raster order
    assert keys("row", 2, 1) == {(1, 2), (1, 3), (2, 0), (2, 1)}
    assert keys("row", 0, 0) == {(0, 0)}
    assert keys("column", 2, 1) == {(0, 1), (1, 1), (2, 1)}
    # conv, 3 x 3 window: the earlier ones of rows 1-2, columns 0-2
    assert keys("conv", 2, 1) == {(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)}
    with pytest.raises(ValueError, match="pattern"):
        attention_mask(text, grid, "diagonal")


@pytest.mark.parametrize("pattern", ["full", "row", "column", "conv"])
def test_gradients_flow_only_where_the_mask_allows(pattern: str) -> None:
    """With one layer, the logits at position i depend on the input at j exactly where the
    mask allows (i attends to j): the causal and sparse masks, checked through autograd."""
    torch.manual_seed(0)
    net = DalleTransformer(
        vocab_size=64,
        text_length=3,
        grid=3,
        width=16,
        layers=1,
        heads=2,
        image_attention=[pattern],
        conv_kernel=3,
    ).double()
    ids = torch.arange(11)[None]  # distinct tokens: one embedding row per position
    inputs = {}
    net.token_embed.register_forward_hook(lambda m, a, out: inputs.setdefault("x", out))
    logits = net(ids)
    mask = attention_mask(3, 3, pattern, conv_kernel=3)
    for i in range(11):
        (grad,) = torch.autograd.grad(logits[0, i].sum(), inputs["x"], retain_graph=True)
        depends = grad[0].abs().sum(-1) > 0  # (T,)
        assert depends.tolist() == mask[i, :11].tolist(), f"position {i}"


# ----------------------------------------------------------------------------------------------
# sampling


def test_cached_logits_equal_full_passes() -> None:
    torch.manual_seed(0)
    net = DalleTransformer(
        vocab_size=50,
        text_length=4,
        grid=3,
        width=32,
        layers=3,
        heads=4,
        image_attention=["row", "column", "conv"],
        conv_kernel=3,
    ).eval()
    ids = torch.randint(0, 50, (2, 12))
    full = net(ids)  # (2, 12, 50)
    cache = net.new_cache()
    parts = [net(ids[:, :4], cache)] + [net(ids[:, i : i + 1], cache) for i in range(4, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="positions exceed"):
        net(ids[:, :2], cache)  # 14 > 13 positions


@pytest.mark.parametrize(
    "options",
    [
        {"guidance_scale": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
        {"guidance_scale": 3.0, "temperature": 0.8, "top_k": 10, "top_p": 0.9},
    ],
)
def test_cached_sampler_draws_the_same_tokens_as_uncached(trained, options) -> None:
    prompts = ["a red circle at the top left", "a small blue square in the center"] * 3
    opts = trained.resolve_options(options)
    tokens = {
        cached: trained.sample_tokens(prompts, torch.Generator().manual_seed(7), opts, cached)
        for cached in (True, False)
    }
    assert tokens[True].shape == (6, trained.grid**2)
    assert torch.equal(tokens[True], tokens[False])
    assert tokens[True].min() >= 0 and tokens[True].max() < trained.num_codes
    again = trained.sample_tokens(prompts, torch.Generator().manual_seed(7), opts, True)
    assert torch.equal(again, tokens[True])  # the generator decides everything
    other = trained.sample_tokens(prompts, torch.Generator().manual_seed(8), opts, True)
    assert not torch.equal(other, tokens[True])


def test_sample_logits_filters_and_matches_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    assert sample_logits(logits[:3], gen, temperature=0).tolist() == [0, 0, 0]
    assert set(sample_logits(logits, gen, top_k=1).tolist()) == {0}
    assert set(sample_logits(logits, gen, top_k=2).tolist()) == {0, 1}
    probs = logits[0].softmax(0)  # 0.644, 0.237, 0.087, 0.032, ...
    # top_p = 0.7: {0} has mass 0.644 < 0.7, so token 1 joins; token 2 is left out
    assert set(sample_logits(logits, gen, top_p=0.7).tolist()) == {0, 1}
    assert set(sample_logits(logits, gen, top_p=0.5).tolist()) == {0}  # the top token stays
    counts = torch.bincount(sample_logits(logits, gen), minlength=5).double() / len(logits)
    assert (counts - probs).abs().max() < 0.015  # 3 sigma of a 20000-draw frequency
    hot = torch.bincount(sample_logits(logits, gen, temperature=2.0), minlength=5) / len(logits)
    torch.testing.assert_close(
        hot.double(), (logits[0] / 2).softmax(0).double(), atol=0.015, rtol=0
    )


def clip_for_reranking(tmp_path: Path):
    """An untrained tiny CLIP at the test's size with a tokenizer: a fixed scoring function."""
    config = compose_model(["model=clip", f"data.resolution={SIZE}", *CLIP_TINY])
    torch.manual_seed(3)
    clip = instantiate(config)
    clip.tokenizer = BPETokenizer.train(shapes_data(SIZE).train_captions(), vocab_size=128)
    path = tmp_path / "clip.ckpt"
    torch.save(
        {
            "genlab_model_config": config,
            "state_dict": clip.state_dict(),
            "genlab_tokenizer": clip.tokenizer.to_json(),
        },
        path,
    )
    return path


def test_reranking_keeps_the_highest_scoring_candidates(trained, tmp_path) -> None:
    clip_path = str(clip_for_reranking(tmp_path))
    try:
        prompts = ["a red circle", "a small green triangle at the bottom"]
        every = trained.generate(
            prompts, n_candidates=6, keep=6, generator=torch.Generator().manual_seed(1)
        )
        best = trained.generate(  # loads the CLIP given here (eval.generate_options can)
            prompts,
            n_candidates=6,
            keep=2,
            clip_ckpt=clip_path,
            generator=torch.Generator().manual_seed(1),
        )
        assert every.shape == (12, 3, SIZE, SIZE) and best.shape == (4, 3, SIZE, SIZE)
        scores = trained.clip.similarity(every, [p for p in prompts for _ in range(6)]).view(2, 6)
        order = scores.argsort(dim=1, descending=True)[:, :2]
        expected = every[(order + 6 * torch.arange(2)[:, None]).flatten()]
        torch.testing.assert_close(best, expected)
        kept_scores = trained.clip.similarity(best, [p for p in prompts for _ in range(2)])
        assert (kept_scores.view(2, 2) >= scores.median(dim=1, keepdim=True).values).all()
    finally:
        object.__setattr__(trained, "clip", None)
        trained.frozen_parts.pop("clip", None)


def test_generate_shapes_defaults_and_bad_requests(trained) -> None:
    images = trained.generate(["a red circle"], n=3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, SIZE, SIZE) and images.min() >= -1 and images.max() <= 1
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        trained.generate(["a red circle", "  "])
    with pytest.raises(ValueError, match="empty list"):
        trained.generate([])
    with pytest.raises(ValueError, match="list of str"):
        trained.generate("a red circle")
    with pytest.raises(ValueError, match="clip_ckpt"):
        trained.generate(["a red circle"], n_candidates=4, keep=1)
    with pytest.raises(ValueError, match="top_p"):
        trained.generate(["a red circle"], top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        trained.generate(["a red circle"], temperature=-1)
    with pytest.raises(ValueError, match="n=2 and keep=3"):
        trained.generate(["a red circle"], n=2, keep=3)


# ----------------------------------------------------------------------------------------------
# the stream and the loss


def test_text_tokens_use_per_position_pads_and_the_loss_weights(trained) -> None:
    ids = trained.text_tokens(["a red circle", ""])
    ids_bpe, mask = trained.tokenizer.encode(["a red circle", ""], context_length=32)
    assert ids.shape == (2, 32)
    for row in range(2):
        real = mask[row]
        assert torch.equal(ids[row][real], ids_bpe[row][real])
        pad_positions = torch.arange(32)[~real]
        assert torch.equal(ids[row][~real], trained.text_vocab + pad_positions)
    assert int(mask[1].sum()) == 2  # the empty caption: [BOS] [EOS], then pads
    data = shapes_data(SIZE, max_objects=1)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    keep = torch.tensor([True, False] * 4)
    parts = trained.losses(trained.net, batch["image"], list(batch["caption"]), keep)
    values = trained.total_loss(parts)
    text = parts["text"][keep].mean()
    torch.testing.assert_close(values["text_loss"], text)
    torch.testing.assert_close(values["loss"], text / 8 + 7 / 8 * parts["image"].mean())
    torch.testing.assert_close(values["image_bpt"], parts["image"].mean() / math.log(2))
    # an untrained image head is near uniform over the K codes: about log2(K) bits per token
    fresh = tiny_dalle(Path(trained.frozen_parts["first_stage"]["path"]))
    fresh.tokenizer = trained.tokenizer
    bpt = fresh.total_loss(fresh.losses(fresh.net, batch["image"], list(batch["caption"]), keep))
    assert abs(float(bpt["image_bpt"]) - math.log2(fresh.num_codes)) < 0.2


def test_first_stage_is_frozen_out_of_the_optimizer_and_the_checkpoint(dvae, tmp_path) -> None:
    model = tiny_dalle(dvae)
    before = {k: v.clone() for k, v in model.first_stage.state_dict().items()}
    config = compose_model(["model=dalle", f"model.tokenizer_ckpt={dvae}", *DALLE_TINY])
    trainer = quiet_trainer(
        tmp_path, max_steps=3, limit_val_batches=0, callbacks=[ModelConfigInCheckpoint(config)]
    )
    net_before = [p.detach().clone() for p in model.net.parameters()]
    trainer.fit(model, datamodule=shapes_data(SIZE, max_objects=1))
    after = model.first_stage.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.first_stage.parameters())
    assert not model.first_stage.training
    assert any(not torch.equal(a, b) for a, b in zip(net_before, model.net.parameters()))
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in model.first_stage.parameters()}
    assert not any(k.startswith("first_stage") for k in model.state_dict())
    trainer.save_checkpoint(tmp_path / "dalle.ckpt")
    loaded = genlab.load(tmp_path / "dalle.ckpt")
    assert loaded.tokenizer.to_json() == model.tokenizer.to_json()
    gen = [torch.Generator().manual_seed(5) for _ in range(2)]
    torch.testing.assert_close(
        loaded.generate(["a red circle"], generator=gen[0]),
        model.eval().generate(["a red circle"], generator=gen[1]),
    )


def test_wrong_or_changed_tokenizer_checkpoints_are_named(dvae, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer_ckpt"):
        tiny_dalle(tmp_path / "missing.ckpt")
    vae = make_first_stage("vae", tmp_path / "vae.ckpt", steps=1)
    with pytest.raises(ValueError, match="tokenizer_ckpt.*encode_indices"):
        tiny_dalle(vae)
    with pytest.raises(ValueError, match="image_size=32 but the first stage"):
        tiny_dalle(dvae, "model.image_size=32")
    # a checkpoint trained on one dVAE refuses to load on a retrained file at the same path
    copy = tmp_path / "dvae_copy.ckpt"
    copy.write_bytes(dvae.read_bytes())
    model = tiny_dalle(copy)
    config = compose_model(["model=dalle", f"model.tokenizer_ckpt={copy}", *DALLE_TINY])
    trainer = quiet_trainer(
        tmp_path, max_steps=1, limit_val_batches=0, callbacks=[ModelConfigInCheckpoint(config)]
    )
    trainer.fit(model, datamodule=shapes_data(SIZE, max_objects=1))
    trainer.save_checkpoint(tmp_path / "dalle.ckpt")
    make_first_stage("dvae", copy, steps=1)
    with pytest.raises(ValueError, match="has changed since this DALL-E was trained"):
        genlab.load(tmp_path / "dalle.ckpt")


# ----------------------------------------------------------------------------------------------
# the entry points


def test_dalle_trains_evaluates_and_samples_through_the_entry_points(dvae, tmp_path) -> None:
    run = tmp_path / "run"
    result = run_entry(
        "train.py",
        *ENTRY_TINY,
        f"model.tokenizer_ckpt={dvae}",
        f"hydra.run.dir={run}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    rows = list(csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open()))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/text_bpt", "train/image_bpt", "val/text_loss", "val/image_loss"} <= logged
    assert {"test/loss", "test/image_bpt", "test/caption_exact", "test/fid"} <= logged
    (report,) = json.loads(next((run / "metrics").glob("test_step*.json")).read_text())
    protocol = report["protocol"]
    assert protocol["sampler"] == "autoregressive (KV cache)"
    assert (protocol["top_p"], protocol["guidance_scale"]) == (0.9, 2.0)
    assert (run / "samples" / "final.png").is_file()

    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "samples.png"
    result = run_entry(
        "sample.py",
        f"ckpt_path={ckpt}",
        'prompt="a red circle"',
        "n=2",
        "top_k=5",
        "temperature=0.7",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'sample'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert out.is_file()
    result = run_entry(
        "sample.py",
        f"ckpt_path={ckpt}",
        'prompt="a red circle"',
        "n_candidates=4",
        "n=1",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'sample2'}",
        tmp_path=tmp_path,
    )
    assert result.returncode != 0 and "clip_ckpt" in result.stderr


def test_dalle_trains_under_ddp(dvae, tmp_path) -> None:
    """Two gloo processes: one tokenizer (rank 0's), the frozen dVAE outside DDP's parameters,
    per-rank caption dropout; the run ends with one checkpoint that loads and samples."""
    run = tmp_path / "run"
    result = run_entry(
        "train.py",
        *ENTRY_TINY,
        f"model.tokenizer_ckpt={dvae}",
        "trainer=ddp_cpu",
        "trainer.max_steps=2",
        "callbacks.generative_metrics=null",
        "callbacks.sample_grid=null",
        f"hydra.run.dir={run}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    model = genlab.load(run / "checkpoints" / "last.ckpt")
    assert model.generate(["a red circle"], generator=torch.Generator()).shape == (1, 3, SIZE, SIZE)
