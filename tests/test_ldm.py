"""Latent diffusion on a frozen first stage made by the test: the entry point, the frozen first
stage, the scale factor, checkpoints that refer to their first stage, and the text encoders."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import genlab
from conftest import (
    CONF,
    TINY_BPE,
    TINY_DATA,
    TINY_RUN,
    TINY_TRAINER,
    TINY_UNET,
    check_ok,
    compose_model,
    make_first_stage,
    quiet_trainer,
    run_entry,
    shapes_data,
)
from genlab.data import latent_cache as ldm_module
from genlab.data.arrays import labelled_splits
from genlab.data.datamodule import LabelledArraysDataModule
from genlab.data.latent_cache import cache_source
from genlab.data.shapes import ShapesDataModule, ShapesDataset
from genlab.data.tokenizer import BPETokenizer
from genlab.models.diffusion.model import DiffusionModel as LDM
from genlab.models.diffusion.spaces import FIRST_STAGE_KEY
from genlab.utils.checkpoint import ModelConfigInCheckpoint
from genlab.utils.instantiate import instantiate

SIZE = 16
LDM_TINY = [*TINY_DATA, "data.train_size=32", *TINY_UNET]  # 32 items: the caches' row count


def data() -> ShapesDataModule:
    return shapes_data(SIZE)


@pytest.fixture(scope="module")
def first_stages(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("first_stages")
    return {kind: make_first_stage(kind, folder / f"{kind}.ckpt") for kind in ("vae", "vqgan")}


def tiny_ldm(first_stage: Path, *overrides: str) -> LDM:
    config = compose_model(
        [
            "model=ldm",
            f"model.space.first_stage_ckpt={first_stage}",
            *LDM_TINY,
            *TINY_BPE,
            *overrides,
        ]
    )
    return instantiate(config)


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["bpe_transformer", "minilm"])
def test_ldm_trains_through_train_py(first_stages, encoder: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    text = TINY_BPE if encoder == "bpe_transformer" else []
    result = run_entry(
        "train.py",
        "experiment=ldm_shapes",  # the recipe, shrunk
        f"model/text_encoder={encoder}",
        f"model.space.first_stage_ckpt={first_stages['vae']}",
        f"model.space.cache_dir={tmp_path / 'cache'}",  # the recipe caches latents
        *LDM_TINY,
        *text,
        *TINY_RUN,
        "callbacks.generative_metrics=null",
        "sampler.steps=2",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert "scale_factor = 1 / std" in result.stdout + result.stderr
    assert len(list((tmp_path / "cache").glob("*/manifest.json"))) == 1
    (ckpt,) = (run_dir / "checkpoints").glob("epoch_*.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    assert saved[FIRST_STAGE_KEY]["path"] == str(first_stages["vae"])
    assert not any(k.startswith("first_stage.") for k in saved["state_dict"])
    assert not any("network" in k for k in saved["state_dict"])  # the frozen text encoder
    model = genlab.load(ckpt)
    assert (
        float(model.space.scale_factor) == float(saved["state_dict"]["space.scale_factor"]) != 1.0
    )
    images = model.generate(["a red circle"], n=2, steps=2, generator=torch.Generator())
    assert images.shape == (2, 3, SIZE, SIZE) and images.abs().max() <= 1
    assert (run_dir / "samples" / "final.png").is_file()


@pytest.mark.parametrize("kind", ["vae", "vqgan"])
def test_first_stage_is_frozen_and_out_of_the_optimizer(first_stages, kind, tmp_path) -> None:
    model = tiny_ldm(first_stages[kind])
    before = {k: v.clone() for k, v in model.space.first_stage.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(model, datamodule=data())
    after = model.space.first_stage.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # EMA codebook buffers too
    assert not model.space.first_stage.training
    assert all(p.grad is None and not p.requires_grad for p in model.space.first_stage.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in model.space.first_stage.parameters()}
    assert not any(k.startswith("first_stage") for k in model.state_dict())


@pytest.mark.parametrize("kind", ["vae", "vqgan"])
def test_scale_factor_makes_latents_unit_std(first_stages, kind) -> None:
    model = tiny_ldm(first_stages[kind])
    loader = data()
    loader.setup("fit")
    batches = iter(loader.train_dataloader())
    first = model.space.encode(next(batches)["image"], training=model.training)
    assert bool(model.space.scale_set)
    assert torch.allclose(first.std(), torch.tensor(1.0), atol=1e-4)
    second = model.space.encode(next(batches)["image"], training=model.training)
    assert 0.7 < float(second.std()) < 1.4  # another batch: about 1
    given = tiny_ldm(first_stages[kind], "model.space.scale_factor=0.5").eval()  # posterior mean
    images = next(batches)["image"]
    assert torch.equal(
        given.space.encode(images, training=given.training),
        given.space.latents(images, training=False) * 0.5,
    )
    assert float(given.space.scale_factor) == 0.5 and bool(given.space.scale_set)


def test_generate_decodes_latents_with_the_first_stage(first_stages) -> None:
    model = tiny_ldm(first_stages["vqgan"], "model.condition=none").eval()
    images = model.generate(n=3, steps=2, guidance_scale=1.0, generator=torch.Generator())
    assert images.shape == (3, 3, SIZE, SIZE)
    z = torch.randn(1, 4, SIZE // 4, SIZE // 4)
    expected = model.space.first_stage.decode(z / model.space.scale_factor).clamp(-1, 1)
    assert torch.allclose(model.space.decode(z), expected)


@pytest.mark.parametrize("kind", ["vae", "vqgan"])
def test_latent_inpainting_and_sdedit(first_stages, kind) -> None:
    """Inpainting in latents keeps the known pixels (the decoded paste) and re-imposes the known
    latent cells; SDEdit at strength 0 is the first stage's reconstruction, at strength 1 the draw
    from noise with the same seed (issue 22, item 3)."""
    model = tiny_ldm(first_stages[kind]).eval()
    model.tokenizer = BPETokenizer.train(data().train_captions(), vocab_size=64)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    known = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., :, : SIZE // 2 + 2] = 1  # 10 columns: two whole latent columns and half of a third
    assert model.capabilities >= {"inpaint", "img2img", "negative_prompt"}
    out = model.generate(["a red circle"], n=2, steps=3, known=known, mask=mask, generator=g())
    assert out.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(
        out[..., : SIZE // 2 + 2], known[..., : SIZE // 2 + 2].expand(2, -1, -1, -1)
    )
    assert not torch.allclose(
        out[..., SIZE // 2 + 2 :], known[..., SIZE // 2 + 2 :].expand(2, -1, -1, -1)
    )
    cells = model.space.latent_mask(mask)
    assert cells.shape == (1, 1, SIZE // 4, SIZE // 4)
    assert cells[..., :2].eq(1).all() and cells[..., 2:].eq(0).all()  # the partial cell is unknown

    plain = model.generate(["a red circle"], n=2, steps=4, generator=g())
    full = model.generate(
        ["a red circle"], n=2, steps=4, init_image=known, strength=1.0, generator=g()
    )
    assert torch.equal(full, plain)
    none = model.generate(
        ["a red circle"], n=2, steps=4, init_image=known, strength=0.0, generator=g()
    )
    reconstruction = model.space.decode(model.space.encode(known, training=False))
    expected = reconstruction.clamp(-1, 1).expand(2, -1, -1, -1)
    torch.testing.assert_close(none, expected, atol=2e-4, rtol=0)  # decoded 2 vs 1 at a time
    half = model.generate(
        ["a red circle"], n=2, steps=4, init_image=known, strength=0.5, generator=g()
    )
    assert not torch.allclose(half, plain) and not torch.allclose(half, none)


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
    config = compose_model(
        ["model=ldm", f"model.space.first_stage_ckpt={copy}", *LDM_TINY, *TINY_BPE]
    )
    model = instantiate(config)
    trainer = quiet_trainer(
        tmp_path, max_steps=1, limit_val_batches=0, callbacks=[ModelConfigInCheckpoint(config)]
    )
    trainer.fit(model, datamodule=data())
    trainer.save_checkpoint(tmp_path / "ldm.ckpt")
    assert (
        genlab.load(tmp_path / "ldm.ckpt").space.first_stage_version
        == model.space.first_stage_version
    )
    make_first_stage("vae", Path(copy), steps=1)  # retrained: other weights, same path
    with pytest.raises(ValueError, match="has changed since this LDM was trained"):
        genlab.load(tmp_path / "ldm.ckpt")
    Path(copy).unlink()
    with pytest.raises(FileNotFoundError, match="first_stage_ckpt"):
        genlab.load(tmp_path / "ldm.ckpt")


# ----------------------------------------------------------------------------------------------
# latent caching (model.space.cache_latents)


def cached_ldm(first_stage: Path, cache: Path, *overrides: str) -> LDM:
    return tiny_ldm(
        first_stage, "model.space.cache_latents=true", f"model.space.cache_dir={cache}", *overrides
    )


def fit_briefly(model: LDM, tmp_path: Path, datamodule=None, steps: int = 1) -> L.Trainer:
    trainer = quiet_trainer(tmp_path, max_steps=steps, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule or data())
    return trainer


def test_latent_cache_is_built_once_reused_and_rebuilt_for_a_new_first_stage(
    first_stages, tmp_path, caplog, monkeypatch
) -> None:
    caplog.set_level(logging.INFO, logger="genlab.data.latent_cache")
    vae, cache = Path(shutil.copy(first_stages["vae"], tmp_path / "vae.ckpt")), tmp_path / "cache"
    fit_briefly(cached_ldm(vae, cache), tmp_path, steps=2)
    (built,) = (m.parent for m in cache.glob("*/manifest.json"))
    assert "latent cache: built" in caplog.text and not list(cache.glob("*/.*.tmp-*"))
    stamp = (built / "manifest.json").stat().st_mtime_ns

    caplog.clear()
    monkeypatch.setattr(ldm_module, "build_store", None)  # building again would fail
    model = cached_ldm(vae, cache)
    fit_briefly(model, tmp_path, steps=2)
    assert f"latent cache: reusing {built}" in caplog.text
    assert "latent cache: built" not in caplog.text
    assert [m.parent for m in cache.glob("*/manifest.json")] == [built]
    assert (built / "manifest.json").stat().st_mtime_ns == stamp
    assert model.space.cache.shape == (32, 1, 8, SIZE // 4, SIZE // 4)  # (N, O, 2C, h, w)
    assert model.space.cache.rows([0, 1]).dtype == torch.float16
    monkeypatch.undo()

    make_first_stage("vae", vae, steps=1)  # retrained: other weights, same path
    caplog.clear()
    fit_briefly(cached_ldm(vae, cache), tmp_path)
    assert "latent cache: built" in caplog.text and len(list(cache.glob("*/manifest.json"))) == 2
    assert (built / "manifest.json").stat().st_mtime_ns == stamp  # the old cache is left alone


@pytest.mark.parametrize("kind", ["vae", "vqgan"])
def test_training_from_the_cache_gives_the_encoders_x0(first_stages, kind, tmp_path) -> None:
    model = cached_ldm(first_stages[kind], tmp_path / "cache")
    fit_briefly(model, tmp_path)
    model.train()
    batch = data().split("train")
    index = torch.tensor([3, 0, 17, 31, 8])
    images = torch.stack([batch[int(i)]["image"] for i in index])
    encoded = model.space.first_stage.encode(images)
    if kind == "vae":  # the posterior's moments are stored, the sample is drawn at each step
        rows = model.space.cache.rows(index)[:, 0].float()
        assert torch.allclose(rows[:, :4], encoded.mean, rtol=1e-3, atol=1e-3)
        assert torch.allclose(rows[:, 4:], encoded.logvar, rtol=1e-3, atol=1e-3)
    torch.manual_seed(5)
    from_cache = model.space.training_x0({"image": None, "index": index}, training=True)
    torch.manual_seed(5)
    on_the_fly = model.space.encode(
        images, training=model.training
    )  # the same noise: the same z up to fp16
    assert torch.allclose(from_cache, on_the_fly, rtol=1e-3, atol=2e-3)
    if kind == "vae":
        assert not torch.equal(
            from_cache, model.space.training_x0({"index": index}, training=True)
        )  # fresh z
    else:
        assert torch.equal(from_cache, model.space.training_x0({"index": index}, training=True))


class FlippingShapes(LabelledArraysDataModule):
    """Shapes held in memory and flipped at random in training, as cifar10 is."""

    name = "flipping_shapes"

    def __init__(self, random_flip: bool = True) -> None:
        super().__init__(batch_size=8, resolution=SIZE)
        self.random_flip = random_flip
        source = ShapesDataset("train", size=48, resolution=SIZE)
        self.images = torch.stack([source[i]["image"] for i in range(48)])
        self.captions = [source[i]["caption"] for i in range(48)]

    def build_splits(self) -> dict:
        pixels = ((self.images + 1) * 127.5).round().to(torch.uint8)
        labels = (torch.arange(48), torch.arange(16))
        train, test = (pixels, labels[0]), (pixels[:16], labels[1])
        return labelled_splits(train, test, val_size=16, class_captions=self.captions, flip=True)


def test_random_flips_are_drawn_on_both_cached_orientations(first_stages, tmp_path) -> None:
    datamodule = FlippingShapes()
    model = cached_ldm(first_stages["vqgan"], tmp_path / "cache")
    fit_briefly(model, tmp_path, datamodule)
    unflipped = datamodule.unflipped_train_split()
    images = torch.stack([unflipped[i]["image"] for i in range(32)])
    assert torch.allclose(images, datamodule.images[:32], atol=1e-6)  # really unflipped
    cache = model.space.cache.rows(range(32)).float()  # (32, 2, 4, h, w): images, mirror images
    for o, view in enumerate([images, images.flip(-1)]):
        assert torch.allclose(
            cache[:, o], model.space.first_stage.encode(view), rtol=1e-3, atol=1e-3
        )

    index = torch.arange(32).repeat(8)
    drawn = model.space.cache.latents(index, device=model.device)  # (256, 4, h, w)
    flipped = (drawn - cache[index, 1]).flatten(1).abs().amax(1) == 0
    assert torch.equal(drawn[~flipped], cache[index[~flipped], 0])
    assert 0.35 < flipped.float().mean() < 0.65  # p = 1/2 per item and step


def test_random_crops_and_undeclared_augmentation_are_refused(first_stages, tmp_path) -> None:
    crops = SimpleNamespace(crop="random")
    with pytest.raises(ValueError, match="data.crop='random'.*data.crop=center"):
        cache_source(crops)
    torch.manual_seed(0)
    undeclared = FlippingShapes(random_flip=False)  # flips, but does not say so
    model = cached_ldm(first_stages["vqgan"], tmp_path / "cache")
    with pytest.raises(ValueError, match="two different images"):
        fit_briefly(model, tmp_path, undeclared)
    with pytest.raises(ValueError, match="model.space.cache_dir"):
        tiny_ldm(
            first_stages["vqgan"], "model.space.cache_latents=true", "model.space.cache_dir=null"
        )


def test_ddp_ranks_build_one_cache_in_item_order(first_stages, tmp_path) -> None:
    """Two gloo processes encode two chunks of 8 items each (1 KiB chunks: 8 rows of 128 bytes);
    rank 0 writes the manifest of one store, which equals, row by row, the cache that one process
    builds."""
    recipe = [
        "experiment=ldm_shapes",
        f"model.space.first_stage_ckpt={first_stages['vqgan']}",
        "model.space.cache_latents=true",
        f"model.space.cache_chunk_mb={1 / 1024}",
        *LDM_TINY,
        *TINY_BPE,
    ]
    result = run_entry(
        "train.py",
        *recipe,
        f"model.space.cache_dir={tmp_path / 'ddp'}",
        "trainer=ddp_cpu",
        *TINY_TRAINER,
        "trainer.max_steps=2",
        "test=false",
        "callbacks.sample_grid=null",
        "callbacks.generative_metrics=null",
        f"hydra.run.dir={tmp_path / 'run'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    (ddp,) = (tmp_path / "ddp").glob("*/manifest.json")
    stamp = ddp.stat().st_mtime_ns
    assert len(list(ddp.parent.glob("latents-*.npy"))) == 4  # 4 chunks of 8 rows, 2 per rank

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train.yaml", overrides=recipe)
    caches = {}
    for name in ("ddp", "single"):
        model = instantiate(OmegaConf.to_container(cfg.model, resolve=True))
        model.space.cache_dir = str(tmp_path / name)
        datamodule = instantiate(OmegaConf.to_container(cfg.data, resolve=True))
        trainer = quiet_trainer(
            tmp_path, max_steps=1, limit_val_batches=0, precision=cfg.trainer.precision
        )
        trainer.fit(model, datamodule=datamodule)
        caches[name] = model.space.cache.rows(range(32)).float()
    single = list((tmp_path / "single").glob("*/manifest.json"))
    assert ddp.stat().st_mtime_ns == stamp and len(single) == 1
    ddp_rows, rows = caches["ddp"], caches["single"]
    assert ddp_rows.shape == rows.shape == (32, 1, 4, SIZE // 4, SIZE // 4)
    assert (ddp_rows - rows).abs().max() < 1e-2 < (rows[1:] - rows[:-1]).abs().mean()


def test_ldm_trains_on_a_coco_folder_through_train_py(first_stages, tmp_path) -> None:
    """`python src/train.py model=ldm data=coco` on a folder in the official COCO layout."""
    from test_data_files import write_coco_part

    root = tmp_path / "data" / "coco"
    write_coco_part(root, "train", {k: [(k, f"a photo of thing {k}")] for k in range(1, 9)})
    write_coco_part(root, "val", {k: [(k, f"a val photo {k}")] for k in range(20, 24)})
    result = run_entry(
        "train.py",
        "model=ldm",
        "data=coco",
        f"paths.data_dir={tmp_path / 'data'}",
        f"model.space.first_stage_ckpt={first_stages['vae']}",
        f"data.resolution={SIZE}",  # COCO has its own splits
        "data.batch_size=4",
        "data.val_size=2",
        *TINY_UNET,
        *TINY_BPE,
        *TINY_TRAINER,
        "trainer.max_steps=2",
        "callbacks.sample_grid.num_samples=2",
        "callbacks.generative_metrics=null",
        "sampler.steps=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    rows = (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/loss" in rows and "test/loss" in rows
    model = genlab.load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    images = model.generate(["a photo of thing 3"], steps=2, generator=torch.Generator())
    assert images.shape == (1, 3, SIZE, SIZE)


def test_class_labels_remain_an_option(first_stages, tmp_path) -> None:
    model = tiny_ldm(
        first_stages["vae"],
        "model.condition=label",
        "model.num_classes=3",
        "model.text_encoder=null",
        "model.tokenizer_vocab_size=0",
        "model.net.context_dim=null",
        "model.net.cond_dim=null",
        "model.net.num_classes=3",
    )
    data = ThreeClassShapes()
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    images = model.eval().generate(labels=[0, 2], steps=2, generator=torch.Generator())
    assert images.shape == (2, 3, SIZE, SIZE)


class ThreeClassShapes(LabelledArraysDataModule):
    """Shapes images in memory with class labels i mod 3 (a labelled dataset like cifar10)."""

    name = "three_class_shapes"

    def __init__(self) -> None:
        super().__init__(batch_size=8, resolution=SIZE)
        source = ShapesDataset("train", size=48, resolution=SIZE)
        self.images = torch.stack([source[i]["image"] for i in range(48)])

    def build_splits(self) -> dict:
        pixels = ((self.images + 1) * 127.5).round().to(torch.uint8)
        train, test = (pixels, torch.arange(48) % 3), (pixels[:16], torch.arange(16) % 3)
        return labelled_splits(train, test, val_size=8, class_captions=["a", "b", "c"])
