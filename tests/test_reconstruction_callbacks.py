"""First stages in the evaluation callbacks: rFID, KID, precision/recall, caption accuracy, PSNR
and SSIM of reconstructions (GenerativeMetrics), the grid of validation images above their
reconstructions (SampleGrid), and ``eval.py`` on a first-stage checkpoint, under DDP too.

The model is a genuine deterministic autoencoder that needs no training: the identity, or a blur
(2x2 average pooling, then nearest upsampling), each with one trainable scalar so that a Trainer
can fit it. The identity must score exactly as the real images (the real floor) and perfectly
on PSNR/SSIM; the blur must score worse.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ORACLE_OVERRIDES, ROOT, check_ok, quiet_trainer, run_entry
from genlab.callbacks.generative_metrics import GenerativeMetrics
from genlab.callbacks.sample_grid import SampleGrid
from genlab.data.shapes import ShapesDataModule
from genlab.models.contract import SamplingOptions
from genlab.utils.checkpoint import DATA_CONFIG_KEY, MODEL_CONFIG_KEY
from genlab.utils.validation import ConfigError

DATA = {"resolution": 16, "train_size": 8, "val_size": 16, "test_size": 16, "batch_size": 8}
N, BATCH = 12, 5  # 12 images in chunks of 5: under 2 ranks, rank 0 has 2 chunks, rank 1 one
SIDE = 16 + 2  # a 16 px image and its 2 px padding in a grid


class Autoencoder(L.LightningModule):
    """``reconstruct``: the identity, or a blur that loses detail; deterministic, no training."""

    capabilities = frozenset({"reconstruct"})  # the model contract

    def __init__(self, blur: bool = False) -> None:
        super().__init__()
        self.blur = blur
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        assert not self.training, "reconstruct is called in eval mode"
        if not self.blur:
            return images.clone()
        return F.interpolate(F.avg_pool2d(images, 2), scale_factor=2, mode="nearest")

    def loss(self, batch) -> torch.Tensor:
        return (batch["image"].mean() - self.weight) ** 2

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PriorAutoencoder(Autoencoder):
    """A VAE-like first stage: it also draws unconditional samples (uniform noise here)."""

    condition = "none"
    capabilities = frozenset({"generate", "reconstruct"})
    sampling_keys = frozenset()  # it samples in one pass: no options
    uses_ema = False

    def sampling_options(self, **given) -> SamplingOptions:
        return SamplingOptions(given.get("sampler"), extra=given)

    def generate(self, prompts=None, *, n, generator=None) -> torch.Tensor:
        return torch.rand(n, 3, 16, 16, generator=generator) * 2 - 1


def shapes() -> ShapesDataModule:
    return ShapesDataModule(**DATA)


def metrics_callback(oracle: Path, tmp_path: Path, **options) -> GenerativeMetrics:
    """The callback on the tests' tiny oracle (features and caption parsing), N images."""
    return GenerativeMetrics(
        num_samples=N,
        batch_size=BATCH,
        features="shapes_oracle",
        oracle_checkpoint=str(oracle),
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path),
        kid_subset_size=6,
        **options,
    )


def evaluate_with(model, callback, tmp_path: Path) -> tuple[list[dict], dict[str, float]]:
    """``trainer.test`` with the callback: its results and the logged metrics."""
    trainer = quiet_trainer(tmp_path, callbacks=[callback])
    trainer.test(model, datamodule=shapes(), verbose=False)
    return callback.results, {k: float(v) for k, v in trainer.callback_metrics.items()}


# ---------------------------------------------------------------------------------------------
# GenerativeMetrics
def test_identity_reconstructions_score_as_the_real_images(oracle_checkpoint, tmp_path) -> None:
    """A module that only reconstructs is evaluated (not skipped). Reconstructing items 0..11 of
    the val split exactly gives the real floor of those items: rFID ~ 0, the oracle's own caption
    accuracy on real images, infinite PSNR (kept out of the loggers) and SSIM 1."""
    callback = metrics_callback(oracle_checkpoint, tmp_path, real_split="val")
    results, logged = evaluate_with(Autoencoder(), callback, tmp_path)
    assert [r["name"] for r in results] == ["reconstructed", "real_val"]
    recon, real = results[0]["metrics"], results[1]["metrics"]
    assert recon["psnr"] == math.inf and recon["ssim"] == pytest.approx(1, abs=1e-12)
    assert abs(recon["fid"]) < 1e-5 and recon["precision"] == recon["recall"] == 1
    assert "is" not in recon and "is" in real  # no Inception Score of reconstructions
    for name, value in real.items():  # the same images: every shared number equal
        if name in recon:
            assert recon[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert {"caption_exact", "caption_cell"} <= set(recon)  # parsed against own captions
    protocol = results[0]["protocol"]
    assert protocol["source"] == "reconstructions of val items 0..11"
    assert protocol["num_samples"] == N and protocol["reference"]["split"] == "val"
    assert protocol["extractor"] == "shapes_oracle" and protocol["oracle_version"]
    assert protocol["weights"] == "raw"
    assert not {"sampler", "steps", "guidance_scale", "is_splits"} & set(protocol)
    for name in ("fid", "kid", "precision", "recall", "ssim", "caption_exact"):
        assert logged[f"test/recon/{name}"] == pytest.approx(recon[name]), name
    assert "test/recon/psnr" not in logged  # +inf: in the JSON file only
    assert "test/fid" not in logged and "test/psnr" not in logged  # no generated result
    (saved,) = (tmp_path / "metrics").glob("test_step*.json")
    in_file = json.loads(saved.read_text())
    assert in_file[0]["name"] == "reconstructed" and in_file[0]["protocol"] == protocol
    assert in_file[0]["metrics"]["psnr"] == math.inf


def test_blurred_reconstructions_score_worse(oracle_checkpoint, tmp_path) -> None:
    (identity,), _ = evaluate_with(
        Autoencoder(), metrics_callback(oracle_checkpoint, tmp_path), tmp_path
    )
    (blurred,), logged = evaluate_with(
        Autoencoder(blur=True), metrics_callback(oracle_checkpoint, tmp_path), tmp_path
    )
    blur, exact = blurred["metrics"], identity["metrics"]
    assert 10 < blur["psnr"] < 40 and logged["test/recon/psnr"] == pytest.approx(blur["psnr"])
    assert blur["ssim"] < 0.95
    assert blur["fid"] > exact["fid"] + 1e-3
    data = shapes()
    data.setup()
    originals = torch.stack([data.data_val[i]["image"] for i in range(N)])
    mse = (Autoencoder(blur=True).eval().reconstruct(originals) - originals).double().square()
    expected = (10 * torch.log10(4 / mse.flatten(1).mean(1))).mean()  # PSNR, range 2
    assert blur["psnr"] == pytest.approx(expected.item(), rel=1e-9)


def test_a_vae_gets_prior_samples_and_reconstructions(oracle_checkpoint, tmp_path) -> None:
    results, logged = evaluate_with(
        PriorAutoencoder(), metrics_callback(oracle_checkpoint, tmp_path), tmp_path
    )
    assert [r["name"] for r in results] == ["generated", "reconstructed"]
    generated, recon = results
    assert {"fid", "is"} <= set(generated["metrics"]) and "psnr" not in generated["metrics"]
    assert "caption_exact" not in generated["metrics"]  # unconditional: no prompts
    assert not {"sampler", "steps", "guidance_scale"} & set(generated["protocol"])
    assert generated["protocol"]["seed"] == 0
    assert generated["metrics"]["fid"] > recon["metrics"]["fid"]  # noise vs the images
    assert {"test/fid", "test/is", "test/recon/fid", "test/recon/ssim"} <= set(logged)


def test_sampling_options_are_refused_where_they_cannot_apply(monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"guidance_scales=\[1, 3\]: Autoencoder does not gen"):
        GenerativeMetrics(guidance_scales=[1, 3]).check_sampling(Autoencoder())
    with pytest.raises(ValueError, match=r"steps=10: Autoencoder does not generate"):
        GenerativeMetrics(steps=10).check_sampling(Autoencoder())
    with pytest.raises(ValueError, match="PriorAutoencoder has no guidance_scale"):
        GenerativeMetrics(guidance_scale=2.0).check_sampling(PriorAutoencoder())

    class ForwardingPrior(PriorAutoencoder):  # passes **options on, has no sampler: refused
        def generate(self, prompts=None, *, n, generator=None, **unused):
            return super().generate(prompts, n=n, generator=generator)

    with pytest.raises(ValueError, match="sampler='ddim': ForwardingPrior has no sampler"):
        GenerativeMetrics(sampler="ddim").check_sampling(ForwardingPrior())
    ForwardingPrior.sampling_keys = frozenset({"sampler", "steps"})  # one that declares them
    GenerativeMetrics(sampler="ddim", steps=3).check_sampling(ForwardingPrior())
    GenerativeMetrics().check_sampling(Autoencoder())  # nothing asked: fine
    GenerativeMetrics().check_sampling(PriorAutoencoder())

    from omegaconf import OmegaConf

    monkeypatch.syspath_prepend(str(ROOT / "src"))
    import eval as eval_entry  # src/eval.py, not the builtin

    cfg = OmegaConf.create(
        {
            "sampler": None,
            "eval": {"steps": None, "guidance_scale": None, "guidance_scales": [1, 3]},
        }
    )
    with pytest.raises(ConfigError, match=r"eval.guidance_scales=\[1, 3\]: Autoencoder does not"):
        eval_entry.check_sampling(cfg, Autoencoder())
    eval_entry.check_sampling(cfg, PriorAutoencoder())  # left to the callback's signature check
    cfg.eval.guidance_scales = None
    eval_entry.check_sampling(cfg, Autoencoder())


# ---------------------------------------------------------------------------------------------
# SampleGrid
def tiles(path: Path, rows: int, columns: int) -> np.ndarray:
    """The images of a saved grid, ``(rows, columns, H, W, 3)`` uint8 (2 px padding)."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (rows * SIDE + 2, columns * SIDE + 2, 3)
    return np.stack(
        [
            np.stack(
                [
                    grid[2 + r * SIDE : r * SIDE + SIDE, 2 + c * SIDE : c * SIDE + SIDE]
                    for c in range(columns)
                ]
            )
            for r in range(rows)
        ]
    )


def as_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("model_class", [Autoencoder, PriorAutoencoder])
def test_reconstruction_grid_every_epoch_and_at_the_end(tmp_path, model_class) -> None:
    """3 val images in 2 columns: rows (o0 o1), (r0 r1), (o2 -), (r2 -), each original right
    above its reconstruction; saved at the epoch's end (step 2) and at train end, logged to
    TensorBoard as ``reconstructions``. Only a model that also generates gets sample grids."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    grid = SampleGrid(output_dir=str(tmp_path), num_samples=3)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = quiet_trainer(
        tmp_path,
        max_steps=2,
        max_epochs=-1,
        callbacks=[grid],
        logger=logger,
        num_sanity_val_steps=0,
    )
    data = ShapesDataModule(**{**DATA, "batch_size": 4})
    model = model_class(blur=True)
    trainer.fit(model, datamodule=data)
    samples = tmp_path / "samples"
    names = sorted(p.name for p in samples.glob("*.png"))
    recon_names = ["recon_final.png", "recon_step_000002.png"]
    if model_class is PriorAutoencoder:
        assert names == ["final.png", *recon_names, "step_000002.png"]
    else:
        assert names == recon_names  # and no "does not generate" note below
    assert model.training  # reconstructed in eval mode, train mode restored
    originals = torch.stack([data.data_val[i]["image"] for i in range(3)])
    expected_recon = as_uint8(model.eval().reconstruct(originals))
    expected = as_uint8(originals)
    for name in recon_names:
        drawn = tiles(samples / name, rows=4, columns=2).astype(int)
        for i, (row, column) in enumerate([(0, 0), (0, 1), (2, 0)]):
            assert np.abs(drawn[row, column] - expected[i]).max() <= 1  # the original
            assert np.abs(drawn[row + 1, column] - expected_recon[i]).max() <= 1  # below it
        assert (drawn[2:, 1] == 255).all()  # the short last row is left white
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    assert {"reconstructions", "reconstructions/final"} <= set(events.Tags()["images"])


def test_no_grid_note_for_a_model_that_reconstructs(tmp_path, caplog) -> None:
    grid = SampleGrid(output_dir=str(tmp_path), num_samples=2)
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[grid], num_sanity_val_steps=0)
    with caplog.at_level("INFO"):
        trainer.fit(Autoencoder(), datamodule=ShapesDataModule(**{**DATA, "batch_size": 8}))
    assert "reconstruction grid" in caplog.text  # the callback's notes are captured
    assert "does not generate" not in caplog.text
    assert (tmp_path / "samples" / "recon_final.png").is_file()


# ---------------------------------------------------------------------------------------------
# eval.py, single process and DDP
def test_eval_py_on_a_first_stage_checkpoint_under_ddp(oracle_checkpoint, tmp_path, monkeypatch):
    """``eval.py ckpt_path=<first stage>`` on 2 gloo ranks reports the reconstructed result with
    its protocol, and every number equals the single-process one: 12 items in chunks of 5 (rank 0
    reconstructs chunks 0 and 2, rank 1 chunk 1), reconstruct is deterministic and sees the same
    chunks whatever the number of ranks, the metric states are synced."""
    ckpt = tmp_path / "blur.ckpt"
    model = Autoencoder(blur=True)
    torch.save(
        {
            MODEL_CONFIG_KEY: {"_target_": f"{__name__}.Autoencoder", "blur": True},
            DATA_CONFIG_KEY: {"_target_": "genlab.data.shapes.ShapesDataModule", **DATA},
            "state_dict": model.state_dict(),
        },
        ckpt,
    )
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # finds this file's Autoencoder
    run_dir = tmp_path / "ddp"
    result = run_entry(
        "eval.py",
        f"ckpt_path={ckpt}",
        "trainer=ddp_cpu",
        "trainer.precision=32",
        *ORACLE_OVERRIDES,
        f"callbacks.generative_metrics.cache_dir={tmp_path / 'ddp-cache'}",  # sharded reference
        "callbacks.generative_metrics.features=shapes_oracle",
        f"eval.num_samples={N}",
        f"callbacks.generative_metrics.batch_size={BATCH}",
        "callbacks.generative_metrics.kid_subset_size=6",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert "Starting with 2 processes" in result.stderr + result.stdout
    assert (
        "reconstructed (reconstructions of val items 0..11; shapes_oracle, n=12)" in result.stdout
    )
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["method"] == "Autoencoder"
    (ddp,) = report["results"]
    assert ddp["name"] == "reconstructed" and ddp["protocol"]["num_samples"] == N
    assert ddp["protocol"]["source"] == "reconstructions of val items 0..11"
    assert "sampler" not in ddp["protocol"]
    for name in ("fid", "psnr", "ssim", "caption_exact"):
        assert report["metrics"][f"test/recon/{name}"] == pytest.approx(ddp["metrics"][name])
    assert "test/loss" in report["metrics"]  # the model's own test metrics too
    (single,), _ = evaluate_with(
        Autoencoder(blur=True), metrics_callback(oracle_checkpoint, tmp_path), tmp_path
    )
    assert set(single["metrics"]) == set(ddp["metrics"])
    for name, value in single["metrics"].items():
        assert ddp["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
