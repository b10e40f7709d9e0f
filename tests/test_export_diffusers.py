"""Export to diffusers (issue 24, item 3): ``src/export.py format=diffusers`` writes a folder that
diffusers' own ``AutoencoderKL`` / ``VQModel`` load and that gives genlab's outputs, and that
``genlab.load`` still reads; nets that do not map are refused with the reason.

Tolerances (max abs difference of latents and reconstructions, random nets with every weight
perturbed): with ``norm_eps=1e-6`` (diffusers' GroupNorm eps) 0.0 for the VAE without attention,
about 3e-6 with attention (the attention kernels round differently) and 4e-6 for the VQ-GAN (its
straight-through estimator); the tests allow 1e-5. With genlab's default eps 1e-5: about 3e-5
(VAE) and 3e-4 (VQ-GAN); the test allows 1e-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import genlab
from conftest import (
    FIRST_STAGE,
    TINY_ENCODER,
    TINY_TRAINER,
    TINY_VQ,
    check_ok,
    compose_model,
    run_entry,
)
from genlab.utils.checkpoint import MODEL_CONFIG_KEY
from genlab.utils.diffusers_export import (
    NotExportable,
    approximations,
    export_diffusers,
    mismatches,
)
from genlab.utils.instantiate import instantiate

EXPORTABLE = ["++model.encoder.downsample_padding=asymmetric", "++model.encoder.norm_eps=1e-6"]
SIZE = 16


def images(n: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def random_checkpoint(kind: str, path: Path, *overrides: str) -> Path:
    """A genlab first stage with every weight random (none of the zero-initialised residual
    branches left at zero, so every layer's mapping shows), saved as a checkpoint."""
    config = compose_model(
        [f"model={kind}", f"data.resolution={SIZE}", *TINY_ENCODER, *FIRST_STAGE[kind], *overrides]
    )
    model = instantiate(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    torch.save({MODEL_CONFIG_KEY: config, "state_dict": model.state_dict()}, path)
    return path


@torch.no_grad()
def outputs_differ(ckpt: Path, folder: Path) -> float:
    """Max abs difference of genlab's latents and reconstructions and diffusers' (loaded by
    diffusers from the folder), on other images than the export's own check."""
    from diffusers import AutoencoderKL, VQModel

    config = json.loads((folder / "config.json").read_text())
    model = genlab.load(ckpt)
    x = images()
    if config["_class_name"] == "AutoencoderKL":
        theirs = AutoencoderKL.from_pretrained(folder).eval()
        ours, latents = model.encode(x).mean, theirs.encode(x).latent_dist.mean
    else:
        theirs = VQModel.from_pretrained(folder).eval()
        ours, latents = model.encode(x), theirs.encode(x).latents
    decoded = theirs.decode(ours).sample
    return max(
        float((ours - latents).abs().max()), float((model.decode(ours) - decoded).abs().max())
    )


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("vae", []),
        ("vae", ["model.encoder.attention_levels=[1]", "model.encoder.mid_attention=true"]),
        ("vqgan", []),
    ],
    ids=["vae", "vae-attention", "vqgan"],
)
def test_export_gives_diffusers_the_same_outputs(kind, overrides, tmp_path) -> None:
    ckpt = random_checkpoint(kind, tmp_path / "model.ckpt", *EXPORTABLE, *overrides)
    out, measured = export_diffusers(ckpt, tmp_path / "export", scaling_factor=0.3)
    diff = outputs_differ(ckpt, out)
    tolerance = 1e-5
    assert diff <= tolerance and measured <= tolerance, (diff, measured)
    config = json.loads((out / "config.json").read_text())
    assert config["scaling_factor"] == 0.3 and config["latent_channels"] == 4
    card = (out / "README.md").read_text()
    assert "## diffusers" in card and "from_pretrained" in card
    original, back = genlab.load(ckpt), genlab.load(out)  # the genlab export is there too
    assert all(torch.equal(back.state_dict()[k], v) for k, v in original.state_dict().items())


def test_default_eps_exports_with_a_small_stated_difference(tmp_path, caplog) -> None:
    ckpt = random_checkpoint("vae", tmp_path / "model.ckpt", EXPORTABLE[0])
    out, measured = export_diffusers(ckpt, tmp_path / "export")
    assert "GroupNorm eps 1e-05 in genlab, 1e-06 in diffusers" in caplog.text
    assert 0 < outputs_differ(ckpt, out) < 1e-3
    assert f"{measured:.2e}" in (out / "README.md").read_text()


def test_nets_that_do_not_map_are_refused_with_the_reason(tmp_path) -> None:
    default = compose_model(["model=vae", *TINY_ENCODER])  # genlab's default padding
    (reason,) = mismatches(default)
    assert "downsample_padding: symmetric" in reason and "Downsample2D" in reason
    ckpt = random_checkpoint("vae", tmp_path / "model.ckpt")
    with pytest.raises(NotExportable, match="pad one pixel on every side"):
        export_diffusers(ckpt, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    heads = compose_model(["model=vae", *TINY_ENCODER, *EXPORTABLE, "model.encoder.heads=2"])
    assert any("one head" in m for m in mismatches(heads))
    cosine = compose_model(
        ["model=vqgan", *TINY_ENCODER, *TINY_VQ, *EXPORTABLE, "model.quantizer.l2_normalize=true"]
    )
    assert any("l2-normalised" in m for m in mismatches(cosine))
    assert "format=safetensors" in mismatches(compose_model(["model=ddpm"]))[0]


@pytest.mark.slow  # three entry-point runs: about 50 s on one thread
def test_export_py_format_diffusers_through_the_entry_points(tmp_path) -> None:
    run_dir = tmp_path / "run"
    trained = run_entry(
        "train.py",
        "model=vae",
        f"data.resolution={SIZE}",
        "data.batch_size=8",
        "data.train_size=32",
        "data.val_size=8",
        "data.test_size=8",
        *TINY_ENCODER,
        *FIRST_STAGE["vae"],
        *EXPORTABLE,
        *TINY_TRAINER,
        "callbacks.generative_metrics=null",
        "callbacks.sample_grid.num_samples=2",
        "test=false",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(trained)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = tmp_path / "sd-style-vae"
    exported = run_entry(
        "export.py",
        f"ckpt_path={ckpt}",
        "format=diffusers",
        "scaling_factor=0.5",
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'export_run'}",
        tmp_path=tmp_path,
    )
    check_ok(exported)
    assert {"config.json", "diffusion_pytorch_model.safetensors", "model.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    assert outputs_differ(ckpt, out) <= 1e-5

    refused = run_entry(  # a net with genlab's default padding: the reason, no traceback
        "export.py",
        f"ckpt_path={random_checkpoint('vae', tmp_path / 'plain.ckpt')}",
        "format=diffusers",
        f"out={tmp_path / 'no'}",
        f"hydra.run.dir={tmp_path / 'export_run2'}",
        tmp_path=tmp_path,
    )
    assert refused.returncode != 0
    assert "cannot be exported as a diffusers model" in refused.stderr
    assert "downsample_padding=asymmetric" in refused.stderr
    assert len(refused.stderr.splitlines()) < 20 and not (tmp_path / "no").exists()


def test_the_coco_recipes_export_exactly() -> None:
    """vae_coco and vqgan_coco use taming's layout (asymmetric padding, eps 1e-6)."""
    for recipe in ("vae_coco", "vqgan_coco"):
        config = compose_model([f"experiment={recipe}"])
        assert mismatches(config) == [] and approximations(config) == [], recipe


def test_asymmetric_downsample_is_diffusers_downsample2d() -> None:
    from diffusers.models.downsampling import Downsample2D

    from genlab.nn.autoencoder import AsymmetricDownsample

    ours = AsymmetricDownsample(4)
    theirs = Downsample2D(4, use_conv=True, padding=0)
    theirs.conv.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(ours(x), theirs(x)) and ours(x).shape == (2, 4, 4, 4)
    assert set(ours.state_dict()) == {"weight", "bias"}  # nn.Conv2d's names: checkpoints load


def test_an_ldm_reads_a_diffusers_export_as_genlab_unless_told(tmp_path) -> None:
    from genlab.models.diffusion.spaces import LatentSpace
    from genlab.nn.diffusers_vae import DiffusersFirstStage

    ckpt = random_checkpoint("vae", tmp_path / "model.ckpt", *EXPORTABLE)
    out, _ = export_diffusers(ckpt, tmp_path / "export", scaling_factor=0.3)
    assert type(LatentSpace(first_stage_ckpt=str(out)).first_stage).__name__ == "VAE"
    space = LatentSpace(first_stage_ckpt=str(out), first_stage_format="diffusers")
    assert isinstance(space.first_stage, DiffusersFirstStage)
    assert float(space.scale_factor) == pytest.approx(0.3)
