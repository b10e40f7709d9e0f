"""Latent diffusion on a frozen first stage made by the test: the entry point, the frozen first
stage, the scale factor, checkpoints that refer to their first stage, and the text encoders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import genlab
from conftest import CONF, check_ok, quiet_trainer, run_entry
from genlab.data.shapes import ShapesDataModule
from genlab.models.ldm import FIRST_STAGE_KEY, LDM
from genlab.utils.checkpoint import ModelConfigInCheckpoint
from genlab.utils.instantiate import instantiate

SIZE = 16
FIRST_STAGE = {
    "vae": ["model.discriminator=null", "model.perceptual=null", "model.disc_weight=0"],
    "vqgan": [
        "model.discriminator=null",
        "model.perceptual=null",
        "model.disc_weight=0",
        "model.encoder.latent_channels=4",
        "model.quantizer.code_dim=4",
        "model.quantizer.num_codes=32",
        "model.quantizer.kmeans_init=false",
    ],
    "dvae": ["model.quantizer.num_codes=32", "model.quantizer.code_dim=4"],
}
LDM_TINY = [
    f"data.resolution={SIZE}",
    "data.batch_size=8",
    "data.train_size=32",
    "data.val_size=16",
    "data.test_size=16",
    "model.net.channels=[16,32]",
    "model.net.attention_levels=[1]",
    "model.net.heads=2",
    "model.net.groups=8",
]
BPE_TINY = [
    "model.text_encoder.width=32",
    "model.text_encoder.layers=1",
    "model.text_encoder.heads=2",
    "model.text_encoder.vocab_size=128",
]


def compose_model(overrides: list[str]) -> dict:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides)
    return OmegaConf.to_container(cfg.model, resolve=True)


def data() -> ShapesDataModule:
    return ShapesDataModule(resolution=SIZE, batch_size=8, train_size=32, val_size=16, test_size=16)


def make_first_stage(kind: str, path: Path, steps: int = 2) -> Path:
    """A tiny first stage (f = 4, 4 latent channels), trained a few steps, saved to ``path``."""
    config = compose_model(
        [
            f"model={kind}",
            f"data.resolution={SIZE}",
            "model.encoder.channels=[8,16,16]",
            "model.encoder.groups=8",
            "model.encoder.mid_attention=false",
            *FIRST_STAGE[kind],
        ]
    )
    module = instantiate(config)
    trainer = quiet_trainer(
        path.parent,
        max_steps=steps,
        limit_val_batches=0,
        callbacks=[ModelConfigInCheckpoint(config)],
    )
    trainer.fit(module, datamodule=data())
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def first_stages(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("first_stages")
    return {kind: make_first_stage(kind, folder / f"{kind}.ckpt") for kind in ("vae", "vqgan")}


def tiny_ldm(first_stage: Path, *overrides: str) -> LDM:
    config = compose_model(
        ["model=ldm", f"model.first_stage_ckpt={first_stage}", *LDM_TINY, *BPE_TINY, *overrides]
    )
    return instantiate(config)


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["bpe_transformer", "minilm"])
def test_ldm_trains_through_train_py(first_stages, encoder: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    text = BPE_TINY if encoder == "bpe_transformer" else []
    result = run_entry(
        "train.py",
        "experiment=ldm_shapes",  # the recipe, shrunk
        f"model/text_encoder={encoder}",
        f"model.first_stage_ckpt={first_stages['vae']}",
        "trainer.max_steps=4",
        *LDM_TINY,
        *text,
        "callbacks.sample_grid.num_samples=4",
        "sampler.steps=2",
        "callbacks.generative_metrics=null",
        "callbacks.rich_progress_bar=null",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert "scale_factor = 1 / std" in result.stdout + result.stderr
    (ckpt,) = (run_dir / "checkpoints").glob("epoch_*.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    assert saved[FIRST_STAGE_KEY]["path"] == str(first_stages["vae"])
    assert not any(k.startswith("first_stage.") for k in saved["state_dict"])
    assert not any("network" in k for k in saved["state_dict"])  # the frozen text encoder
    model = genlab.load(ckpt)
    assert float(model.scale_factor) == float(saved["state_dict"]["scale_factor"]) != 1.0
    images = model.generate(["a red circle"], n=2, steps=2, generator=torch.Generator())
    assert images.shape == (2, 3, SIZE, SIZE) and images.abs().max() <= 1
    assert (run_dir / "samples" / "final.png").is_file()


@pytest.mark.parametrize("kind", ["vae", "vqgan"])
def test_first_stage_is_frozen_and_out_of_the_optimizer(first_stages, kind, tmp_path) -> None:
    model = tiny_ldm(first_stages[kind])
    before = {k: v.clone() for k, v in model.first_stage.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(model, datamodule=data())
    after = model.first_stage.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # EMA codebook buffers too
    assert not model.first_stage.training
    assert all(p.grad is None and not p.requires_grad for p in model.first_stage.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in model.first_stage.parameters()}
    assert not any(k.startswith("first_stage") for k in model.state_dict())


@pytest.mark.parametrize("kind", ["vae", "vqgan"])
def test_scale_factor_makes_latents_unit_std(first_stages, kind) -> None:
    model = tiny_ldm(first_stages[kind])
    loader = data()
    loader.setup("fit")
    batches = iter(loader.train_dataloader())
    first = model.to_diffusion_space(next(batches)["image"])
    assert bool(model.scale_set)
    assert torch.allclose(first.std(), torch.tensor(1.0), atol=1e-4)
    second = model.to_diffusion_space(next(batches)["image"])
    assert 0.7 < float(second.std()) < 1.4  # another batch: about 1
    given = tiny_ldm(first_stages[kind], "model.scale_factor=0.5").eval()  # posterior mean
    images = next(batches)["image"]
    assert torch.equal(given.to_diffusion_space(images), given.latents(images) * 0.5)
    assert float(given.scale_factor) == 0.5 and bool(given.scale_set)


def test_generate_decodes_latents_with_the_first_stage(first_stages) -> None:
    model = tiny_ldm(first_stages["vqgan"]).eval()
    model.tokenizer = None
    model.condition = "none"
    images = model.generate(n=3, steps=2, guidance_scale=1.0, generator=torch.Generator())
    assert images.shape == (3, 3, SIZE, SIZE)
    z = torch.randn(1, 4, SIZE // 4, SIZE // 4)
    expected = model.first_stage.decode(z / model.scale_factor).clamp(-1, 1)
    assert torch.allclose(model.to_images(z), expected)
    with pytest.raises(ValueError, match="pixel space"):
        model.generate(n=1, known=torch.zeros(1, 3, SIZE, SIZE), mask=torch.ones(1))


def test_missing_changed_or_wrong_first_stage_is_named(first_stages, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="first_stage_ckpt"):
        tiny_ldm(tmp_path / "absent.ckpt")
    dvae = make_first_stage("dvae", tmp_path / "dvae.ckpt", steps=1)
    with pytest.raises(ValueError, match="dVAE"):
        tiny_ldm(dvae)
    with pytest.raises(ValueError, match="model.channels=3"):
        tiny_ldm(first_stages["vae"], "model.channels=3")

    # an LDM checkpoint, then its first stage replaced by another file
    copy = shutil.copy(first_stages["vae"], tmp_path / "vae.ckpt")
    config = compose_model(["model=ldm", f"model.first_stage_ckpt={copy}", *LDM_TINY, *BPE_TINY])
    model = instantiate(config)
    trainer = quiet_trainer(
        tmp_path, max_steps=1, limit_val_batches=0, callbacks=[ModelConfigInCheckpoint(config)]
    )
    trainer.fit(model, datamodule=data())
    trainer.save_checkpoint(tmp_path / "ldm.ckpt")
    assert genlab.load(tmp_path / "ldm.ckpt").first_stage_version == model.first_stage_version
    make_first_stage("vae", Path(copy), steps=1)  # retrained: other weights, same path
    with pytest.raises(ValueError, match="has changed since this LDM was trained"):
        genlab.load(tmp_path / "ldm.ckpt")
    Path(copy).unlink()
    with pytest.raises(FileNotFoundError, match="first_stage_ckpt"):
        genlab.load(tmp_path / "ldm.ckpt")
