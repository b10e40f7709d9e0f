"""The DDPM LightningModule: loss at initialisation, generation contract, evaluation
reproducibility, a short fit that learns, and a self-describing checkpoint round trip."""

import functools

import lightning as L
import pytest
import torch

import genlab
from genlab.data.shapes import ShapesDataModule
from genlab.models.ddpm import DDPM
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
    "_target_": "genlab.models.ddpm.DDPM",
    "net": NET,
    "text_encoder": TEXT,
    "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 2e-3},
    "image_size": 16,
    "tokenizer_vocab_size": 128,
    "sample_steps": 5,
}


def tiny_data(**kw) -> ShapesDataModule:
    args = dict(resolution=16, batch_size=16, train_size=256, val_size=32, test_size=32)
    return ShapesDataModule(**{**args, **kw})


def tiny_model(**kw) -> DDPM:
    return genlab.utils.instantiate.instantiate({**MODEL, **kw})


def trainer(tmp_path, **kw) -> L.Trainer:
    args = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return L.Trainer(**{**args, **kw})


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
    with pytest.raises(ValueError, match="sampler"):
        model.generate(prompts, sampler="euler")


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
