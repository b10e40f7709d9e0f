"""Where an LDM's first stage comes from (issue 24, items 1 and 2), through the entry points:

* ``python src/train.py model=ldm data=coco`` with no first stage builds one once with
  ``model.space.first_stage_recipe`` (a tiny one here) into ``first_stage_dir``, reuses it on the
  next run, and makes ``data.resolution`` follow it (or refuses a contradicting command line);
* a diffusers ``AutoencoderKL`` / ``VQModel`` folder, made here with diffusers' own classes and
  ``save_pretrained``, is a frozen first stage: trained on and sampled through ``train.py`` and
  ``sample.py``, its latents are diffusers' ``latent_dist.mean · scaling_factor``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import genlab
from conftest import TINY_BPE, TINY_TRAINER, TINY_UNET, check_ok, run_entry
from genlab.models.diffusion.spaces import FIRST_STAGE_KEY, LatentSpace
from test_data_files import write_coco_part

TINY_VAE_RECIPE = [  # experiment=vae_coco shrunk to 2 CPU steps at 16 px (f = 2)
    "experiment=vae_coco",
    "data.resolution=16",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.val_size=2",
    "data.test_size=2",
    "trainer.accelerator=cpu",
    "trainer.precision=32",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "model.encoder.channels=[8,16]",
    "model.encoder.groups=8",
    "model.discriminator=null",
    "model.perceptual=null",
    "model.disc_weight=0",
    "callbacks.generative_metrics=null",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "logger=csv",
    "test=false",
]
TINY_LDM = [  # the LDM's own network and run, shrunk
    *TINY_UNET,
    *TINY_BPE,
    *TINY_TRAINER,
    "++trainer.max_steps=2",
    "callbacks.generative_metrics=null",
    "callbacks.sample_grid.num_samples=2",
    "sampler.steps=2",
    "test=false",
]


def hydra_list(overrides: list[str]) -> str:
    """A list of overrides as one Hydra list value, each element quoted."""
    return "[" + ",".join(f"'{o}'" for o in overrides) + "]"


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    """A data_dir holding a tiny COCO: 8 train and 4 val images, one caption each."""
    root = tmp_path / "data"
    write_coco_part(
        root / "coco", "train", {k: [(100 + k, f"train image {k}")] for k in range(1, 9)}
    )
    write_coco_part(root / "coco", "val", {k: [(200 + k, f"val image {k}")] for k in range(11, 15)})
    return root


def ldm_coco(data: Path, run_dir: Path, *overrides: str, tmp_path: Path):
    return run_entry(
        "train.py",
        "model=ldm",
        "data=coco",  # data.resolution defaults to 64: the first stage's 16 px wins
        f"paths.data_dir={data}",
        f"model.space.first_stage_recipe={hydra_list(TINY_VAE_RECIPE)}",
        "data.batch_size=2",
        "data.val_size=2",
        "data.test_size=2",
        *TINY_LDM,
        f"hydra.run.dir={run_dir}",
        *overrides,
        tmp_path=tmp_path,
        timeout=400,
    )


@pytest.mark.slow
def test_ldm_coco_builds_its_first_stage_once_and_data_follows(coco_dir, tmp_path) -> None:
    first = ldm_coco(coco_dir, tmp_path / "run1", tmp_path=tmp_path)
    check_ok(first)
    log = first.stdout + first.stderr
    (built,) = (coco_dir / "first_stages").glob("*.ckpt")
    assert built.name.startswith("vae_coco_coco_16px_")
    (line,) = [
        row for row in log.splitlines() if "building it once with `python src/train.py" in row
    ]
    assert f"paths.data_dir={coco_dir}" in line and "experiment=vae_coco" in line  # the command run
    assert "data.resolution: 64 -> 16 px" in log
    assert (built.parent / (built.name + ".json")).is_file()
    assert not list(built.parent.glob("*.lock"))
    (ckpt,) = (tmp_path / "run1" / "checkpoints").glob("epoch_*.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    assert saved[FIRST_STAGE_KEY]["path"] == str(built)
    assert saved["genlab_data_config"]["resolution"] == 16
    assert saved["genlab_model_config"]["space"]["first_stage_ckpt"] == str(built)
    mtime = built.stat().st_mtime

    second = ldm_coco(coco_dir, tmp_path / "run2", tmp_path=tmp_path)  # found, not rebuilt
    check_ok(second)
    assert "building it once" not in second.stdout + second.stderr
    assert f"using {built}" in second.stdout + second.stderr
    assert built.stat().st_mtime == mtime

    clash = ldm_coco(coco_dir, tmp_path / "run3", "data.resolution=32", tmp_path=tmp_path)
    assert clash.returncode != 0
    assert "data.resolution=32 but the first stage" in clash.stderr
    assert "trained at 16 px" in clash.stderr


def test_a_build_in_progress_is_waited_for_not_repeated(tmp_path, monkeypatch) -> None:
    """A second process finds the lock of the first one's build and waits for its file."""
    from genlab.metrics import evaluators
    from genlab.utils import first_stages

    path = tmp_path / "vae.ckpt"
    lock = path.with_name(path.name + ".lock")
    assert evaluators.take_lock(lock)  # "another process" is building
    monkeypatch.setattr(first_stages, "recipe_description", lambda recipe, data_dir: {})
    monkeypatch.setattr(first_stages, "first_stage_file", lambda recipe, folder, d: path)

    def finish() -> None:
        time.sleep(0.5)
        path.write_bytes(b"built")
        lock.unlink()

    threading.Thread(target=finish).start()
    found = first_stages.ensure_first_stage(["experiment=x"], tmp_path, data_dir=str(tmp_path))
    assert found == path and path.read_bytes() == b"built"


def test_null_first_stage_without_recipe_names_the_ways_out() -> None:
    with pytest.raises(ValueError, match="first_stage_ckpt is null"):
        LatentSpace(first_stage_ckpt=None)


# ------------------------------------------------------------------------------ diffusers
def tiny_diffusers(kind: str, folder: Path, *, shift: float | None = None, seed: int = 0) -> Path:
    """A random diffusers autoencoder at f = 2 with 4 latent channels, saved with
    ``save_pretrained``."""
    from diffusers import AutoencoderKL, VQModel

    torch.manual_seed(seed)
    common = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
    )
    if kind == "kl":
        model = AutoencoderKL(**common, shift_factor=shift)
    else:
        model = VQModel(**common, num_vq_embeddings=32, vq_embed_dim=4)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("shift", [None, 0.25])
def test_diffusers_latents_are_the_scaled_posterior_mean(tmp_path, shift) -> None:
    from diffusers import AutoencoderKL

    folder = tiny_diffusers("kl", tmp_path / "vae", shift=shift)
    space = LatentSpace(first_stage_ckpt=str(folder))  # detected by its config.json
    reference = AutoencoderKL.from_pretrained(folder).eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean = reference.encode(images).latent_dist.mean
        expected = (mean - (shift or 0.0)) * reference.config.scaling_factor
        decoded = reference.decode(mean).sample.clamp(-1, 1)
    assert float(space.scale_factor) == 0.5 and bool(space.scale_set)
    assert torch.equal(space.encode(images, training=False), expected)
    assert torch.allclose(space.decode(expected), decoded, atol=1e-6)
    assert space.downsample_factor == 2 and space.first_stage.latent_channels == 4
    assert not any(p.requires_grad for p in space.first_stage.parameters())


def test_diffusers_vq_model_quantizes_on_decode(tmp_path) -> None:
    from diffusers import VQModel

    folder = tiny_diffusers("vq", tmp_path / "vq")
    space = LatentSpace(first_stage_ckpt=str(folder), first_stage_format="diffusers")
    reference = VQModel.from_pretrained(folder).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = reference.encode(images).latents
        decoded = reference.decode(latents).sample.clamp(-1, 1)
    x0 = space.encode(images, training=False)
    assert torch.equal(x0, latents * 0.5)
    assert torch.allclose(space.decode(x0), decoded, atol=1e-6)


def test_a_folder_that_is_not_diffusers_is_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ValueError, match="not a diffusers autoencoder folder"):
        LatentSpace(first_stage_ckpt=str(tmp_path), first_stage_format="diffusers")


@pytest.mark.slow  # three entry-point runs: about 50 s on one thread
def test_ldm_on_a_diffusers_vae_trains_and_samples_through_the_entry_points(tmp_path) -> None:
    folder = tiny_diffusers("kl", tmp_path / "sd-vae")
    run_dir = tmp_path / "run"
    result = run_entry(
        "train.py",
        "model=ldm",
        f"model.space.first_stage_ckpt={folder}",
        "model.channels=4",
        "model.space.cache_latents=true",  # the latent cache holds diffusers' posterior moments
        f"model.space.cache_dir={tmp_path / 'cache'}",
        "data.resolution=16",
        "data.batch_size=4",
        "data.train_size=16",
        "data.val_size=4",
        "data.test_size=4",
        *TINY_LDM,
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert "scale_factor = 0.5 (the first stage's scaling_factor)" in result.stdout + result.stderr
    assert len(list((tmp_path / "cache").glob("*/manifest.json"))) == 1
    (ckpt,) = (run_dir / "checkpoints").glob("epoch_*.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    assert saved[FIRST_STAGE_KEY]["path"] == str(folder)
    assert not any(k.startswith("space.frozen") for k in saved["state_dict"])
    model = genlab.load(ckpt)
    assert float(model.space.scale_factor) == 0.5
    assert model.image_size == 8  # 16 px images, f = 2

    sampled = run_entry(
        "sample.py",
        f"ckpt_path={ckpt}",
        "n=2",
        "steps=2",
        "prompt='a red circle'",
        f"out={tmp_path / 'samples.png'}",
        tmp_path=tmp_path,
    )
    check_ok(sampled)
    assert (tmp_path / "samples.png").is_file()

    from diffusers import AutoencoderKL

    reference = AutoencoderKL.from_pretrained(folder).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = reference.encode(images).latent_dist.mean * reference.config.scaling_factor
    assert torch.equal(model.space.encode(images, training=False), expected)

    tiny_diffusers("kl", folder, seed=1)  # other weights in the same folder: refused on load
    with pytest.raises(ValueError, match="has changed since this LDM was trained"):
        genlab.load(ckpt)


def test_data_resolution_follows_the_first_stage(tmp_path) -> None:
    """In-process (no command line): the data takes a genlab first stage's resolution; a
    diffusers one takes any multiple of its f and refuses the rest."""
    from omegaconf import OmegaConf

    from genlab.utils.checkpoint import MODEL_CONFIG_KEY
    from genlab.utils.first_stages import match_resolution
    from genlab.utils.validation import ConfigError

    ckpt = tmp_path / "vae.ckpt"
    config = {"image_size": 16, "decoder": {"channels": [8, 16, 16]}}
    torch.save({MODEL_CONFIG_KEY: config, "state_dict": {}}, ckpt)
    cfg = OmegaConf.create({"data": {"resolution": 64}})
    match_resolution(cfg, str(ckpt), "genlab")
    assert cfg.data.resolution == 16

    folder = tiny_diffusers("kl", tmp_path / "vae")
    cfg = OmegaConf.create({"data": {"resolution": 64}})
    match_resolution(cfg, str(folder), "auto")
    assert cfg.data.resolution == 64  # convolutional: kept
    cfg.data.resolution = 15
    with pytest.raises(ConfigError, match="not a multiple of the first stage's downsampling"):
        match_resolution(cfg, str(folder), "auto")
