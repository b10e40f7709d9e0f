"""CLIP: encoders and embeddings, the symmetric InfoNCE loss and the split retrieval metrics
against hand values, a short fit that learns, bad input, the checkpoint round trip, and the
shapes recipe through the real entry point."""

from __future__ import annotations

import logging
import math

import lightning as L
import pytest
import torch

import genlab
from conftest import CLIP_RECIPE, check_ok, quiet_trainer, run_entry
from genlab.data.datamodule import GenDataModule
from genlab.data.shapes import ShapesDataModule
from genlab.models.evaluators.clip import (
    CLIP,
    SplitEmbeddings,
    caption_ids,
    contrastive_loss,
    retrieval_metrics,
)
from genlab.nn.image_encoder import ImageEncoder
from genlab.utils.checkpoint import ModelConfigInCheckpoint
from genlab.utils.instantiate import instantiate

MODEL = {
    "_target_": "genlab.models.evaluators.clip.CLIP",
    "image_encoder": {
        "_target_": "genlab.nn.image_encoder.ImageEncoder",
        "channels": [16, 32],
        "heads": 2,
    },
    "text_encoder": {
        "_target_": "genlab.nn.text_encoder.TransformerTextEncoder",
        "vocab_size": 128,
        "context_length": 24,
        "width": 32,
        "layers": 1,
        "heads": 2,
    },
    "embed_dim": 32,
    "optimizer": {
        "_target_": "torch.optim.AdamW",
        "_partial_": True,
        "lr": 5e-3,
        "betas": [0.9, 0.98],
        "weight_decay": 0.2,
    },
    "image_size": 16,
    "tokenizer_vocab_size": 128,
}


def tiny_model(**kw) -> CLIP:
    return instantiate({**MODEL, **kw})


def tiny_data(**kw) -> ShapesDataModule:
    args = dict(resolution=16, batch_size=64, train_size=2048, val_size=128, test_size=64)
    return ShapesDataModule(**{**args, "max_objects": 1, **kw})


def trainer(tmp_path, **kw) -> L.Trainer:
    return quiet_trainer(tmp_path, **kw)


def val_items(data: ShapesDataModule) -> tuple[torch.Tensor, list[str]]:
    data.setup("validate")
    items = [data.data_val[i] for i in range(len(data.data_val))]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny CLIP fitted for 200 steps of 64 one-object 16 px scenes (9 s), and its trainer."""
    torch.manual_seed(0)
    model, data = tiny_model(), tiny_data()
    trainer_ = trainer(
        tmp_path_factory.mktemp("clip"),
        max_steps=200,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[ModelConfigInCheckpoint(MODEL)],
    )
    trainer_.fit(model, data)
    return model, data, trainer_


@pytest.mark.parametrize("pool", ["attention", "mean"])
def test_image_encoder_shapes(pool):
    encoder = ImageEncoder(channels=[16, 32, 64], attention_levels=[2], heads=2, pool=pool)
    assert encoder.out_dim == 64
    assert encoder(torch.randn(3, 3, 16, 16)).shape == (3, 64)
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 64)  # any resolution
    gray = ImageEncoder(in_channels=1, channels=[8], groups=4, heads=2, coord_channels=False)
    assert gray(torch.randn(2, 1, 8, 8)).shape == (2, 8)
    with pytest.raises(ValueError, match="pool='max'"):
        ImageEncoder(pool="max")


def test_embeddings_are_unit_norm_in_float32_and_keep_the_mode():
    model = tiny_model().train()
    model.tokenizer = genlab.data.tokenizer.BPETokenizer.train(
        ["a large red circle at the top left", "a small blue square"] * 10, vocab_size=128
    )
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    texts = ["a red circle", "a blue square", "a large red square at the top left"]
    image_emb, text_emb = model.encode_images(images), model.encode_texts(texts)
    assert image_emb.shape == text_emb.shape == (3, 32) and image_emb.dtype == torch.float32
    torch.testing.assert_close(image_emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(text_emb.norm(dim=1), torch.ones(3))
    assert model.training  # the previous mode is restored
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller's precision does not matter
        torch.testing.assert_close(
            model.encode_images(images.bfloat16()), image_emb, atol=1e-2, rtol=0
        )
        torch.testing.assert_close(model.encode_texts(texts), text_emb, atol=0, rtol=0)
    similarity = model.similarity(images, texts)
    torch.testing.assert_close(similarity, (image_emb * text_emb).sum(1))


def test_contrastive_loss_by_hand():
    """Fig. 3 of Radford et al. on a 2 × 2 matrix, then soft targets for a repeated caption."""
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    eye = torch.eye(2, dtype=torch.bool)

    def nll(x, others):  # -log softmax of x among (x, *others)
        return -math.log(math.exp(x) / (math.exp(x) + sum(math.exp(o) for o in others)))

    pair0 = (nll(2, [0]) + nll(2, [1])) / 2  # row 0 (image 0 → texts), column 0 (text 0 → images)
    pair1 = (nll(3, [1]) + nll(3, [0])) / 2
    torch.testing.assert_close(contrastive_loss(logits, eye), torch.tensor([pair0, pair1]))
    fig3 = (
        torch.nn.functional.cross_entropy(logits, torch.arange(2))
        + torch.nn.functional.cross_entropy(logits.T, torch.arange(2))
    ) / 2
    torch.testing.assert_close(contrastive_loss(logits, eye).mean(), fig3)

    # items 0 and 2 share a caption: each is a positive of the other, with weight 1/2
    logits = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.5, 0.0], [0.0, 1.0, 3.0]])
    same = caption_ids(["a", "b", "a"])
    positives = same[:, None] == same[None, :]
    log_p = logits.log_softmax(dim=1)  # rows: image → texts
    log_q = logits.log_softmax(dim=0)  # columns: text → images
    by_hand = [
        (-(log_p[0, 0] + log_p[0, 2]) / 2 - (log_q[0, 0] + log_q[2, 0]) / 2) / 2,
        (-log_p[1, 1] - log_q[1, 1]) / 2,
        (-(log_p[2, 0] + log_p[2, 2]) / 2 - (log_q[0, 2] + log_q[2, 2]) / 2) / 2,
    ]
    torch.testing.assert_close(contrastive_loss(logits, positives), torch.stack(by_hand))


def hand_built_split() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Six pairs over the basis e0..e5, items 0 and 2 captioned alike (see the test)."""
    e = torch.eye(6)
    texts = torch.stack([e[0], e[1], e[0], e[3], e[4], e[5]])  # the two "a" texts are one
    images = torch.stack(
        [
            e[0],
            0.8 * e[0] + 0.6 * e[1],
            0.6 * e[0] + 0.8 * e[3],
            e[3],
            0.6 * e[4] + 0.8 * e[5],
            -e[5],
        ]
    )
    return images, texts, ["a", "b", "a", "c", "d", "e"]


def test_retrieval_metrics_by_hand():
    """Image → text top-1: image 0 finds an "a" text (either copy is right), image 3 finds "c";
    images 1, 2, 4 rank their caption 2nd or 3rd (top-5 hits), image 5 ranks it last.
    Text → image top-1: every text finds its image but text 5 (image 4 is closer); text 2 finds
    image 0, which shares its caption "a". CLIP score: 100 · mean(1, .6, .6, 1, .6, max(-1, 0))."""
    images, texts, captions = hand_built_split()
    got = retrieval_metrics(images, texts, caption_ids(captions), logit_scale=10.0)
    expected = {"i2t_top1": 2 / 6, "i2t_top5": 5 / 6, "t2i_top1": 5 / 6, "t2i_top5": 5 / 6}
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value), name
    assert got["clip_score"].item() == pytest.approx(100 * 3.8 / 6)
    same = caption_ids(captions)[:, None] == caption_ids(captions)[None, :]
    loss = contrastive_loss(10.0 * images @ texts.T, same).mean()
    assert got["loss"].item() == pytest.approx(loss.item())


def test_split_metrics_do_not_depend_on_batching_order_or_repeats():
    """One update, or shuffled batches with an item repeated (as a distributed sampler pads),
    give the very same numbers: states are sorted by index and de-duplicated."""
    torch.manual_seed(0)
    n, captions = 40, [f"caption {i % 13}" for i in range(40)]
    image_emb = torch.nn.functional.normalize(torch.randn(n, 8), dim=1)
    text_emb = torch.nn.functional.normalize(image_emb + 0.8 * torch.randn(n, 8), dim=1)
    ids, index = caption_ids(captions), torch.arange(n)
    whole = SplitEmbeddings()
    whole.update(image_emb, text_emb, ids, index, 20.0)
    expected = whole.compute()
    batched = SplitEmbeddings()
    order = torch.cat([torch.randperm(n), torch.tensor([3, 17])])  # two repeats
    for part in order.split(7):
        batched.update(image_emb[part], text_emb[part], ids[part], index[part], 20.0)
    got = batched.compute()
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert 0.0 < expected["i2t_top1"] < 1.0  # a non-trivial case


def test_fit_matches_images_to_their_captions(fitted):
    model, data, _ = fitted
    metrics = trainer(None).validate(model, data, verbose=False)[0]
    # chance: top-1 about 1/128 (plus duplicates), top-5 about 5/128; measured with seeds 0-2:
    # top-1 0.44-0.63, top-5 0.94-0.98, matched cosine 0.95 against mismatched -0.04-0.08
    assert metrics["val/i2t_top1"] > 0.3 and metrics["val/t2i_top1"] > 0.3
    assert metrics["val/i2t_top5"] > 0.8
    images, captions = val_items(data)
    matched = model.similarity(images, captions)
    mismatched = model.similarity(images, captions[1:] + captions[:1])
    differ = caption_ids(captions) != caption_ids(captions[1:] + captions[:1])
    assert matched.mean() > mismatched[differ].mean() + 0.5
    assert metrics["val/clip_score"] == pytest.approx(
        100 * matched.clamp(min=0).mean().item(), abs=1e-3
    )
    assert model.logit_scale().item() > 1 / 0.07  # the temperature was learned downwards


def test_bad_input_is_rejected(fitted):
    model = fitted[0]
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.encode_images(images * 127.5 + 127.5)
    with pytest.raises(ValueError, match="16x16"):
        model.encode_images(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="3 channels"):
        model.encode_images(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="NaN"):
        model.encode_images(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="text 1 is empty"):
        model.encode_texts(["a red circle", "   "])
    with pytest.raises(ValueError, match="empty list"):
        model.encode_texts([])
    with pytest.raises(ValueError, match="text 0 is a int"):
        model.encode_texts([3])
    with pytest.raises(ValueError, match="list of str"):
        model.encode_texts("a red circle")
    with pytest.raises(ValueError, match="one text per image"):
        model.similarity(images, ["a red circle"])


def test_long_caption_is_truncated_with_a_warning(fitted, tmp_path, caplog):
    model, _, trainer_ = fitted
    trainer_.save_checkpoint(tmp_path / "model.ckpt")
    fresh = genlab.load(tmp_path / "model.ckpt")  # a tokenizer that has not warned yet
    long = " and ".join(["a large red circle at the top left"] * 10)
    with caplog.at_level(logging.WARNING, logger="genlab.data.tokenizer"):
        emb = fresh.encode_texts([long, "a red circle", long])
    assert "truncated to context_length=24" in caplog.text
    assert emb.shape == (3, 32) and torch.isfinite(emb).all()
    torch.testing.assert_close(emb[0], emb[2])


def test_checkpoint_round_trip_gives_identical_embeddings(fitted, tmp_path):
    model, data, trainer_ = fitted
    trainer_.save_checkpoint(tmp_path / "model.ckpt")
    loaded = genlab.load(tmp_path / "model.ckpt")
    assert isinstance(loaded, CLIP) and loaded.tokenizer.to_json() == model.tokenizer.to_json()
    images, captions = val_items(data)
    assert torch.equal(loaded.encode_images(images[:8]), model.encode_images(images[:8]))
    assert torch.equal(loaded.encode_texts(captions[:8]), model.encode_texts(captions[:8]))
    assert loaded.logit_scale() == model.logit_scale()


class Uncaptioned(GenDataModule):
    """A datamodule with no captions (``train_captions()`` is empty)."""

    def setup(self, stage=None):
        pass


def test_setup_needs_captions_and_the_data_shape(tmp_path):
    with pytest.raises(ValueError, match="model=clip needs captions.*data=shapes"):
        trainer(tmp_path, max_steps=1).fit(tiny_model(), Uncaptioned(resolution=16))
    with pytest.raises(ValueError, match="model.image_size=16.*of 32 px"):
        trainer(tmp_path, max_steps=1).fit(tiny_model(), tiny_data(resolution=32))
    with pytest.raises(ValueError, match="tokenizer_vocab_size=256 exceeds"):
        tiny_model(tokenizer_vocab_size=256)


def test_clip_shapes_recipe_through_the_entry_point(tmp_path):
    run_dir = tmp_path / "run"
    result = run_entry(
        "train.py",
        *CLIP_RECIPE,  # the tiny recipe the metrics tests build CLIP with
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    loaded = genlab.load(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(loaded, CLIP) and loaded.encode_texts(["a red circle"]).shape == (1, 32)
    logged = (run_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for name in ("train/loss", "train/logit_scale", "val/i2t_top1", "test/t2i_top1"):
        assert name in logged.split(","), name
