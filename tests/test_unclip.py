"""unCLIP (DALL·E 2): the prior's Transformer masks and null condition, the prior's embeddings
(CLIP's shape and unit norm, best-of-k by z_t), the decoder's embedding conditioning and its
dropout, variations and slerp interpolation, the pair, and the three configs trained and used
through train.py, sample.py and eval.py on a tiny CLIP (all offline)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    CLIP_RECIPE,
    EVALUATORS,
    ORACLE_OVERRIDES,
    TINY_BPE,
    TINY_DATA,
    TINY_PRIOR,
    TINY_TRAINER,
    TINY_UNET,
    check_ok,
    compose_model,
    quiet_trainer,
    run_entry,
    shapes_data,
)
from genlab.diffusion.samplers import Sampler
from genlab.models.diffusion.sampling import slerp
from genlab.models.diffusion.unclip import UnCLIP
from genlab.nn.unclip import PriorTransformer
from genlab.utils.instantiate import instantiate

CLIP_KEY = "model.conditioners.image_embed.clip_ckpt"  # the decoder's CLIP
TINY_DECODER = [*TINY_UNET, *TINY_BPE]
TINY_RUN = [  # the recipes draw no sample grid and measure no metrics of their own
    *TINY_DATA,
    "data.max_objects=1",
    *TINY_TRAINER,
    "trainer.max_steps=3",
    "sampler.steps=2",
]


@pytest.fixture(scope="session")
def clip_ckpt() -> Path:
    """The tests' tiny CLIP (16 px, 32-d embeddings), built by its recipe on first use."""
    from genlab.metrics.evaluators import ensure_evaluator

    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return ensure_evaluator(EVALUATORS / "clip_shapes.ckpt", CLIP_RECIPE, name="clip_shapes")
    finally:
        if env is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env


def tiny(kind: str, clip: Path, *overrides: str):
    extra = TINY_PRIOR if kind == "unclip_prior" else TINY_DECODER
    key = "model.clip_ckpt" if kind == "unclip_prior" else CLIP_KEY
    config = compose_model(
        [f"model={kind}", f"{key}={clip}", "data.resolution=16", *extra, *overrides]
    )
    return instantiate(config)


@pytest.fixture(scope="module")
def prior(clip_ckpt, tmp_path_factory):
    model = tiny("unclip_prior", clip_ckpt)
    trainer = quiet_trainer(tmp_path_factory.mktemp("prior"), max_steps=3, limit_val_batches=0)
    trainer.fit(model, datamodule=shapes_data(16))
    return model.eval()


@pytest.fixture(scope="module")
def decoder(clip_ckpt, tmp_path_factory):
    model = tiny("unclip_decoder", clip_ckpt)
    trainer = quiet_trainer(tmp_path_factory.mktemp("decoder"), max_steps=3, limit_val_batches=0)
    trainer.fit(model, datamodule=shapes_data(16))
    return model.eval()


# ----------------------------------------------------------------------------------------------
# the prior
def prior_inputs(b=3, length=6, width=8, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, length, dtype=torch.bool)
    for i in range(b):
        mask[i, : 2 + i] = True  # 2, 3, 4 real tokens
    return {
        "x_t": torch.randn(b, d, generator=g),
        "t": torch.tensor([10, 500, 990]),
        "text_tokens": torch.randn(b, length, width, generator=g),
        "text_mask": mask,
        "text_embed": torch.randn(b, d, generator=g),
    }


def test_prior_transformer_ignores_padding_and_the_null_condition_ignores_the_text() -> None:
    torch.manual_seed(0)
    net = PriorTransformer(embed_dim=4, text_width=8, context_length=6, width=16, layers=2, heads=2)
    inputs = prior_inputs()
    out = net(**inputs)
    assert out.shape == (3, 4) and torch.isfinite(out).all()

    padded = dict(inputs, text_tokens=inputs["text_tokens"].clone())
    padded["text_tokens"][~inputs["text_mask"]] = 1e3  # only padding positions change
    torch.testing.assert_close(net(**padded), out)

    drop = torch.tensor([True, False, True])
    dropped = net(**inputs, drop=drop)
    other = prior_inputs(seed=1)  # another text (tokens and embedding), the same x_t and t
    other |= {"x_t": inputs["x_t"], "t": inputs["t"]}
    dropped_other = net(**other, drop=drop)
    torch.testing.assert_close(dropped[drop], dropped_other[drop])  # no text seen
    assert torch.isfinite(dropped).all()
    torch.testing.assert_close(dropped[~drop], out[~drop])
    assert not torch.allclose(dropped_other[~drop], out[~drop])  # the kept row reads its text
    with pytest.raises(ValueError, match="context_length=6"):
        net(**prior_inputs(length=7))


def test_prior_embeddings_have_clips_shape_and_norm_and_are_reproducible(prior) -> None:
    prompts = ["a red circle", "a large blue square at the top left"]
    g = torch.Generator().manual_seed(3)
    z = prior.sample_embeddings(prompts, n=3, steps=2, generator=g)
    real = prior.clip.encode_images(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert z.shape == (6, real.shape[1]) == (6, prior.embed_dim)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(6))  # CLIP's convention
    torch.testing.assert_close(real.norm(dim=-1), torch.ones(2))
    again = prior.sample_embeddings(
        prompts, n=3, steps=2, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(again, z)
    guided = prior.sample_embeddings(prompts, n=3, steps=2, guidance_scale=3.0, generator=g)
    assert guided.shape == z.shape
    with pytest.raises(ValueError, match="empty"):
        prior.sample_embeddings(["a red circle", " "])
    with pytest.raises(ValueError, match="prompts"):
        prior.sample_embeddings([])


def test_prior_keeps_the_candidate_closest_to_the_text_embedding(prior) -> None:
    captions = ["a red circle", "a small green triangle at the bottom"]
    x_T = torch.randn(2, 4, prior.embed_dim, generator=torch.Generator().manual_seed(0))
    spec = Sampler(name="ddim", steps=3)
    best = prior.draw(captions, x_T, spec=spec, scale=1.0)
    each = torch.stack(
        [prior.draw(captions, x_T[:, j : j + 1], spec=spec, scale=1.0) for j in range(4)], dim=1
    )  # (2, 4, d): every candidate alone (DDIM with eta = 0: deterministic given x_T)
    z_t = prior.text_features(captions)["text_embed"]
    chosen = (each * z_t[:, None]).sum(-1).argmax(1)
    torch.testing.assert_close(best, each[torch.arange(2), chosen])


def test_prior_validation_reports_loss_and_cosines(clip_ckpt, tmp_path) -> None:
    model = tiny("unclip_prior", clip_ckpt, "sampler.steps=2")
    trainer = quiet_trainer(tmp_path)
    metrics = trainer.validate(model, datamodule=shapes_data(16), verbose=False)[0]
    assert {"val/loss", "val/embed_cosine", "val/text_cosine"} <= set(metrics)
    assert -1.0 <= metrics["val/embed_cosine"] <= 1.0 and -1.0 <= metrics["val/text_cosine"] <= 1
    again = quiet_trainer(tmp_path).validate(
        model, datamodule=shapes_data(16, batch_size=5), verbose=False
    )[0]  # seeded by item: batching does not change it
    for key in ("val/loss", "val/embed_cosine"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-4)


# ----------------------------------------------------------------------------------------------
# the decoder
def test_decoder_reads_the_embedding_as_tokens_and_drops_it_at_its_rate(decoder) -> None:
    z = torch.nn.functional.normalize(torch.randn(4, decoder.image_embedder().embed_dim), dim=-1)
    weights = decoder.eval_weights()
    keep = torch.zeros(4, dtype=torch.bool)
    inputs = decoder.network_inputs(
        weights, {"caption": ["a red circle"] * 4, "image_embed": z, "embed_drop": keep}
    )
    text_length = weights["text"].encoder.context_length
    assert inputs["context"].shape[1] == text_length + 4  # the caption's tokens, then 4 more
    assert inputs["context_mask"][:, text_length:].all()
    other = decoder.network_inputs(
        weights, {"caption": ["a red circle"] * 4, "image_embed": -z, "embed_drop": keep}
    )
    assert not torch.allclose(other["cond"], inputs["cond"])
    drop = torch.ones(4, dtype=torch.bool)
    a = decoder.network_inputs(weights, {"caption": [""] * 4, "image_embed": z, "embed_drop": drop})
    b = decoder.network_inputs(
        weights, {"caption": [""] * 4, "image_embed": -z, "embed_drop": drop}
    )
    torch.testing.assert_close(a["context"], b["context"])  # the null embedding: z unseen
    torch.testing.assert_close(a["cond"], b["cond"])

    data = shapes_data(16, batch_size=16, train_size=16)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    decoder.train()
    torch.manual_seed(0)
    drops = torch.stack(
        [decoder.batch_conditions(batch, keep.repeat(4))["embed_drop"] for _ in range(50)]
    )
    assert drops.float().mean() == pytest.approx(decoder.image_embedder().drop_prob, abs=0.04)
    expected = decoder.image_embedder().clip.encode_images(batch["image"])
    torch.testing.assert_close(
        decoder.batch_conditions(batch, keep.repeat(4))["image_embed"], expected
    )
    decoder.eval()
    assert not decoder.batch_conditions(batch, keep.repeat(4))["embed_drop"].any()


def test_decoder_generates_from_embeddings_with_or_without_captions(decoder) -> None:
    z = torch.nn.functional.normalize(torch.randn(2, decoder.image_embedder().embed_dim), dim=-1)
    g = torch.Generator().manual_seed(0)
    images = decoder.generate(None, image_embeds=z, n=3, steps=2, generator=g)
    assert images.shape == (6, 3, 16, 16) and images.abs().max() <= 1
    captioned = decoder.generate(["a red circle", "a blue square"], image_embeds=z, steps=2)
    assert captioned.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="image_embeds"):
        decoder.generate(["a red circle"])
    with pytest.raises(ValueError, match="one prompt per image embedding"):
        decoder.generate(["a red circle"], image_embeds=z)
    with pytest.raises(ValueError, match=r"must be \(E, "):
        decoder.generate(None, image_embeds=torch.randn(2, decoder.image_embedder().embed_dim + 1))


def test_slerp_keeps_unit_norm_and_equal_angle_steps() -> None:
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    path = slerp(a, b, torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(5))
    angles = torch.arccos((path[1:] * path[:-1]).sum(-1).clamp(-1, 1))
    torch.testing.assert_close(angles, torch.full((4,), math.pi / 8))
    torch.testing.assert_close(slerp(a, a, torch.tensor([0.3])), a[None])  # parallel ends


def test_variations_decode_the_images_embedding_and_interpolation_shares_its_noise(decoder):
    seen: list[torch.Tensor] = []
    hook = decoder.eval_weights()["image_embed"].projection.register_forward_hook(
        lambda module, args, out: seen.append(args[0].detach().clone())
    )
    try:
        images = torch.rand(2, 3, 16, 16) * 2 - 1
        g = torch.Generator().manual_seed(0)
        variations = decoder.variations(images, n=3, steps=2, generator=g, guidance_scale=1.0)
        assert variations.shape == (6, 3, 16, 16)
        assert not torch.allclose(variations[0], variations[1])  # different seeds
        expected = (
            decoder.image_embedder().clip.encode_images(images)
            * decoder.image_embedder().embed_scale
        )
        torch.testing.assert_close(seen[0], expected.repeat_interleave(3, dim=0))

        seen.clear()
        path = decoder.interpolate(images, n=4, steps=2, generator=g, guidance_scale=1.0)
        assert path.shape == (4, 3, 16, 16)
        torch.testing.assert_close(seen[0][0], expected[0])
        torch.testing.assert_close(seen[0][-1], expected[1])
        same = decoder.interpolate(images[:1].repeat(2, 1, 1, 1), n=3, steps=2, generator=g)
        torch.testing.assert_close(same[0], same[2])  # one shared x_T (DDIM: deterministic)
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="exactly two images"):
        decoder.interpolate(images.repeat(2, 1, 1, 1))


# ----------------------------------------------------------------------------------------------
# through the entry points
def write_png(path: Path, color: tuple[int, int, int]) -> Path:
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[4:12, 4:12] = color
    Image.fromarray(pixels).save(path)
    return path


def test_unclip_trains_samples_and_evaluates_through_the_entry_points(clip_ckpt, tmp_path):
    runs = {}
    for kind, extra in (("prior", TINY_PRIOR), ("decoder", TINY_DECODER)):
        run_dir = tmp_path / kind
        result = run_entry(
            "train.py",
            f"experiment=unclip_{kind}_shapes",
            f"{'model.clip_ckpt' if kind == 'prior' else CLIP_KEY}={clip_ckpt}",
            *TINY_RUN,
            *extra,
            f"hydra.run.dir={run_dir}",
            tmp_path=tmp_path,
        )
        check_ok(result)
        runs[kind] = run_dir / "checkpoints" / "last.ckpt"
        assert runs[kind].is_file()
    metrics = (tmp_path / "prior" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "val/embed_cosine" in metrics and "test/text_cosine" in metrics

    pair = [
        "model=unclip",
        f"model.prior_ckpt={runs['prior']}",
        f"model.decoder_ckpt={runs['decoder']}",
        "model.prior_options={steps: 2}",
        "model.decoder_options={steps: 2}",
    ]
    out = tmp_path / "pair.png"
    result = run_entry(
        "sample.py",
        *pair,
        'prompt=["a red circle","a blue square"]',
        "n=2",
        f"out={out}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert Image.open(out).size[0] > 32

    a, b = write_png(tmp_path / "a.png", (255, 0, 0)), write_png(tmp_path / "b.png", (0, 0, 255))
    for option, name in ((f"variations_of={a}", "var.png"), (f"interpolate=[{a},{b}]", "int.png")):
        result = run_entry(
            "sample.py",
            f"ckpt_path={runs['decoder']}",
            option,
            "n=3",
            "steps=2",
            f"out={tmp_path / name}",
            tmp_path=tmp_path,
        )
        check_ok(result)
        assert (tmp_path / name).is_file()
    result = run_entry(
        "sample.py", f"ckpt_path={runs['prior']}", f"variations_of={a}", tmp_path=tmp_path
    )
    assert result.returncode != 0 and "cannot do it" in result.stderr

    report = tmp_path / "eval" / "metrics.json"
    result = run_entry(
        "eval.py",
        *pair,
        "data=shapes",
        "data.resolution=16",
        "data.val_size=16",
        "data.test_size=16",
        "eval.num_samples=8",
        "eval.guidance_scales=[1,2]",  # a sweep of the decoder's scale
        *ORACLE_OVERRIDES,
        f"hydra.run.dir={tmp_path / 'eval'}",
        tmp_path=tmp_path,
        timeout=400,
    )
    check_ok(result)
    results = json.loads(report.read_text())
    text = json.dumps(results)
    assert "fid" in text and "caption" in text and '"unclip"' in text
    generated = [r["protocol"] for r in results["results"] if r["name"] == "generated"]
    assert [p["guidance_scale"] for p in generated] == [1.0, 2.0]
    assert [p["stages"][1]["guidance_scale"] for p in generated] == [1.0, 2.0]  # the decoder


def perturbed_copy(clip: Path, path: Path, delta: float) -> Path:
    """Another CLIP file: ``clip``'s checkpoint with every float weight shifted by ``delta``."""
    state = torch.load(clip, map_location="cpu", weights_only=False)
    state["state_dict"] = {
        k: v + delta if v.is_floating_point() else v for k, v in state["state_dict"].items()
    }
    torch.save(state, path)
    return path


def test_the_pair_needs_one_clip_and_a_changed_clip_is_refused(clip_ckpt, tmp_path) -> None:
    from genlab.utils.checkpoint import ModelConfigInCheckpoint, load

    config = compose_model(
        ["model=unclip_prior", f"model.clip_ckpt={clip_ckpt}", "data.resolution=16", *TINY_PRIOR]
    )
    prior = instantiate(config)
    trainer = quiet_trainer(
        tmp_path, max_steps=1, limit_val_batches=0, callbacks=[ModelConfigInCheckpoint(config)]
    )
    trainer.fit(prior, datamodule=shapes_data(16))
    other = perturbed_copy(clip_ckpt, tmp_path / "other_clip.ckpt", 0.01)
    run_dir = tmp_path / "decoder"
    result = run_entry(
        "train.py",
        "experiment=unclip_decoder_shapes",
        f"{CLIP_KEY}={other}",
        *TINY_RUN,
        "trainer.max_steps=1",
        *TINY_DECODER,
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    decoder_ckpt = run_dir / "checkpoints" / "last.ckpt"
    prior_ckpt = tmp_path / "prior.ckpt"
    trainer.save_checkpoint(prior_ckpt)
    assert load(decoder_ckpt).image_embedder().clip_version != load(prior_ckpt).clip_version
    with pytest.raises(ValueError, match="must share one"):
        UnCLIP(prior_ckpt=str(prior_ckpt), decoder_ckpt=str(decoder_ckpt))
    perturbed_copy(clip_ckpt, other, 0.02)  # the decoder's CLIP file changes after training
    with pytest.raises(ValueError, match="has changed since this model was trained"):
        load(decoder_ckpt)


@pytest.mark.slow
def test_variations_stay_closer_to_their_image_than_to_another(tmp_path) -> None:
    """The recipes' CLIP and decoder, shortened (about 8 minutes on 2 cores): decoded from an
    image's CLIP embedding, variations stay nearer that image in CLIP space than another one."""
    from genlab.metrics.evaluators import ensure_evaluator
    from genlab.utils.checkpoint import load

    clip = ensure_evaluator(
        tmp_path / "clip.ckpt",
        ["experiment=clip_shapes", "trainer.max_steps=300", "callbacks.rich_progress_bar=null"],
        name="clip_shapes",
    )
    run_dir = tmp_path / "decoder"
    result = run_entry(
        "train.py",
        "experiment=unclip_decoder_shapes",
        f"{CLIP_KEY}={clip}",
        "trainer.max_steps=400",
        "callbacks.rich_progress_bar=null",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
        timeout=1200,
    )
    check_ok(result)
    decoder = load(run_dir / "checkpoints" / "last.ckpt")
    data = shapes_data(32, test_size=16)
    data.setup("test")
    sources = torch.stack([data.data_test[i]["image"] for i in range(16)])
    g = torch.Generator().manual_seed(0)
    variations = decoder.variations(sources, n=2, steps=20, generator=g)
    z_var = decoder.image_embedder().clip.encode_images(variations).view(16, 2, -1)
    z_src = decoder.image_embedder().clip.encode_images(sources)
    own = (z_var * z_src[:, None]).sum(-1)
    other = (z_var * z_src.roll(1, dims=0)[:, None]).sum(-1)
    assert (own > other).float().mean() >= 0.9
    assert own.mean() > other.mean() + 0.3
