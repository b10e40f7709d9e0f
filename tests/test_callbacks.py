"""SampleGrid, FinalValidation and StepTimer inside a real Trainer, on a one-parameter
LightningModule whose ``generate`` records how it was called (the callbacks are what is tested,
not the model)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from genlab.callbacks.final_validation import FinalValidation
from genlab.callbacks.sample_grid import SampleGrid
from genlab.callbacks.step_timer import StepTimer
from genlab.diffusion.samplers import Sampler
from genlab.models.contract import SamplingOptions

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a cyan cross"]


class RecordingGenerator(L.LightningModule):
    """Fits one scalar; ``generate`` draws images from the generator and records its inputs."""

    capabilities = frozenset({"generate"})  # the model contract
    sampling_keys = frozenset({"sampler", "steps", "guidance_scale"})

    def sampling_options(self, **given) -> SamplingOptions:
        return SamplingOptions(given.get("sampler"), guidance_scale=given.get("guidance_scale"))

    def __init__(self, condition: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.condition, self.num_classes, self.uses_ema = condition, 3, False
        self.calls: list[dict] = []

    def training_step(self, batch, batch_idx):
        loss = ((batch[0].mean() - self.weight) ** 2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", ((batch[0].mean() - self.weight) ** 2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def generate(self, prompts=None, *, n=None, labels=None, generator=None, **sampling):
        self.calls.append({"prompts": prompts, "n": n, "labels": labels, **sampling})
        count = len(prompts or labels or []) or n
        return torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1


class TinyData(L.LightningDataModule):
    """Four training items in batches of two (two steps per epoch), with prompts and classes."""

    class_names = ["zero", "one", "two"]

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(2, 2)), batch_size=2)

    def sample_prompts(self, n: int) -> list[str]:
        return PROMPTS[:n]


def fit(tmp_path: Path, condition: str, max_steps: int, final_validation: bool = True):
    """Fit for ``max_steps`` with a SampleGrid (and FinalValidation); return model and callback."""
    sampler = Sampler(name="ddpm", steps=7)
    grid = SampleGrid(output_dir=str(tmp_path), num_samples=4, sampler=sampler, guidance_scale=2.0)
    callbacks = [grid, FinalValidation()] if final_validation else [grid]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    model = RecordingGenerator(condition)
    trainer.fit(model, datamodule=TinyData())
    return model, trainer


def test_grids_every_epoch_after_the_last_step_and_at_the_end(tmp_path: Path) -> None:
    model, _ = fit(tmp_path, "text", max_steps=3)
    samples = tmp_path / "samples"
    # epoch ends at steps 2 (and 4, not reached); the step budget ends mid-epoch at 3
    assert sorted(p.name for p in samples.glob("*.png")) == [
        "final.png",
        "step_000002.png",
        "step_000003.png",
    ]
    assert len(model.calls) == 2  # final.png reuses the grid of step 3: same weights
    assert (samples / "final.png").read_bytes() == (samples / "step_000003.png").read_bytes()
    # a fixed seed: the grids differ only through the weights, which this generate ignores
    assert (samples / "step_000002.png").read_bytes() == (samples / "final.png").read_bytes()
    assert model.calls[0] == {
        "prompts": PROMPTS,
        "n": None,
        "labels": None,
        "sampler": Sampler(name="ddpm", steps=7),
        "guidance_scale": 2.0,
    }
    assert (samples / "prompts.txt").read_text().splitlines() == PROMPTS
    assert model.training  # generation ran in eval mode and restored train mode


def test_models_that_do_not_generate_get_no_grid(tmp_path: Path) -> None:
    class Classifier(L.LightningModule):  # e.g. the noisy classifier: trains, never generates
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            return ((batch[0].mean() - self.weight) ** 2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    grid = SampleGrid(output_dir=str(tmp_path), num_samples=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[grid],
    )
    trainer.fit(Classifier(), datamodule=TinyData())
    assert not (tmp_path / "samples").exists()


def test_without_final_validation_the_last_steps_get_no_grid(tmp_path: Path) -> None:
    fit(tmp_path, "text", max_steps=3, final_validation=False)
    assert not (tmp_path / "samples" / "step_000003.png").exists()


@pytest.mark.parametrize(
    ("condition", "expected", "text"),
    [
        ("label", {"labels": [0, 1, 2, 0], "n": None}, ["zero", "one", "two", "zero"]),
        ("none", {"labels": None, "n": 4}, None),
    ],
)
def test_label_and_unconditional_models(tmp_path: Path, condition, expected, text) -> None:
    model, _ = fit(tmp_path, condition, max_steps=2)
    assert {k: model.calls[0][k] for k in expected} == expected
    assert model.calls[0]["prompts"] is None
    prompts_file = tmp_path / "samples" / "prompts.txt"
    assert (prompts_file.read_text().splitlines() if prompts_file.exists() else None) == text


def test_bad_arguments_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"callbacks.sample_grid: num_samples=0"):
        SampleGrid(num_samples=0)


@pytest.mark.parametrize(("max_steps", "warmup", "timed"), [(5, 2, 3), (5, 0, 5), (2, 2, 0)])
def test_step_timer_times_the_steps_after_the_warm_up(
    tmp_path: Path, max_steps: int, warmup: int, timed: int
) -> None:
    path = tmp_path / "times.json"
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=[StepTimer(warmup_steps=warmup, path=str(path))],
    )
    trainer.fit(RecordingGenerator("text"), datamodule=TinyData())
    record = json.loads(path.read_text())
    assert record["warmup_steps"] == warmup and record["timed_steps"] == timed
    if timed:
        assert record["seconds"] > 0
        assert record["seconds_per_step"] == pytest.approx(record["seconds"] / timed)
        # one optimizer step per batch here; batches of 2 items, one process
        assert record["timed_batches"] == timed and record["images"] == 2 * timed
        assert record["images_per_second"] == pytest.approx(2 * timed / record["seconds"])
    else:
        assert record["seconds_per_step"] is None and record["images_per_second"] is None
