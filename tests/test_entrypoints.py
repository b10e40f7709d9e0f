"""The entry points as a user runs them (real subprocesses, from another working directory):
train.py leaves its artifacts, sample.py and eval.py work from its checkpoint, and resuming
continues the step count and the W&B run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import genlab
from conftest import ORACLE_OVERRIDES, TINY, check_ok, run_entry

SIDE = 16 + 2  # a 16 px image and its 2 px padding in a grid


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's CSV metrics."""
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as file:
        return list(csv.DictReader(file))


def wandb_run_dirs(run_dir: Path) -> list[Path]:
    """The offline W&B runs written in a run folder."""
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_default_job_leaves_checkpoints_samples_metrics_and_config(trained_run: Path) -> None:
    checkpoints = trained_run / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    assert [p.name for p in checkpoints.glob("epoch_*.ckpt")] == ["epoch_000-step_000004.ckpt"]
    samples = trained_run / "samples"
    prompts = (samples / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 4 and all(p.strip() for p in prompts)
    for name in ("step_000004.png", "final.png"):  # validated after the last (mid-epoch) step
        assert Image.open(samples / name).size == (2 * SIDE + 2, 2 * SIDE + 2)
    rows = metrics_rows(trained_run)
    for metric in ("train/loss", "val/loss", "test/loss"):
        assert any(row.get(metric) for row in rows), f"{metric} missing from metrics.csv"
    assert (trained_run / ".hydra" / "config.yaml").is_file()
    assert "model" in (trained_run / "config_tree.log").read_text()
    assert (trained_run / "train.log").is_file()


def test_sample_grids_reach_tensorboard_and_wandb(trained_run: Path) -> None:
    tags = set()
    for version in (trained_run / "tensorboard").iterdir():
        events = EventAccumulator(str(version), size_guidance={"images": 0}).Reload()
        tags |= set(events.Tags()["images"])
    assert {"samples", "samples/final"} <= tags
    run_id = (trained_run / "wandb_id.txt").read_text().strip()
    (wandb_run,) = wandb_run_dirs(trained_run)
    assert wandb_run.name.endswith(run_id)
    assert len(list((wandb_run / "files" / "media" / "images").rglob("*.png"))) == 2


def test_checkpoint_rebuilds_the_model_alone(trained_run: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert ckpt["genlab_data_config"]["_target_"] == "genlab.data.shapes.ShapesDataModule"
    model = genlab.load(trained_run / "checkpoints" / "last.ckpt")
    images = model.generate(["a red circle"], n=2, steps=2, generator=torch.Generator())
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1


def test_sample_from_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "grid.png"
    result = run_entry(
        "sample.py",
        f"ckpt_path={ckpt}",
        "prompt=a red circle at the top left",
        "n=3",
        "steps=2",
        "cell=null",
        "negative_prompt=a blue square",  # guidance away from it instead of the empty caption
        f"out={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert f"samples written to {out}" in result.stdout
    assert Image.open(out).size == (3 * SIDE + 2, SIDE + 2)  # one row of n=3
    assert out.with_suffix(".txt").read_text() == "a red circle at the top left\n"


def test_sample_prompts_file_one_row_per_prompt(trained_run: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square\n\na small green triangle at the bottom\n")
    result = run_entry(
        "sample.py",
        f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        f"prompts_file={prompts}",
        "n=2",
        "steps=2",
        "sampler=ddpm",
        "cell=null",
        f"hydra.run.dir={tmp_path / 'run'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    out = tmp_path / "run" / "samples.png"
    assert Image.open(out).size == (2 * SIDE + 2, 2 * SIDE + 2)
    assert out.with_suffix(".txt").read_text().splitlines() == [
        "a blue square",
        "a small green triangle at the bottom",
    ]


def test_eval_writes_metrics_json(trained_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "eval"
    ckpt = next((trained_run / "checkpoints").glob("epoch_*.ckpt"))
    result = run_entry(
        "eval.py",
        f"ckpt_path={ckpt}",
        f"hydra.run.dir={run_dir}",
        "eval.num_samples=8",
        *ORACLE_OVERRIDES,  # the tests' tiny oracle, not a build of the default one
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert f"metrics written to {run_dir / 'metrics.json'}" in result.stdout
    report = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(report["metrics"]["test/loss"])
    assert report["ckpt_path"] == str(ckpt)
    assert report["data_cfg"]["test_size"] == 16  # the data config stored in the checkpoint


def test_resume_continues_steps_and_wandb_run(trained_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "resumed"
    result = run_entry(
        "train.py",
        *TINY,
        "trainer.max_steps=6",
        "test=false",
        "logger=many_loggers",
        f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6
    steps = {int(row["step"]) for row in metrics_rows(run_dir) if row.get("train/loss")}
    assert min(steps) >= 4, f"training restarted from step 0: logged steps {sorted(steps)}"
    assert (run_dir / "samples" / "step_000006.png").is_file()
    first_id = (trained_run / "wandb_id.txt").read_text()
    assert (run_dir / "wandb_id.txt").read_text() == first_id
    assert wandb_run_dirs(run_dir)[0].name.endswith(first_id.strip())


def test_label_conditional_ddpm_trains_on_digits_and_samples(tmp_path: Path) -> None:
    """The label alternative to text conditioning: model=ddpm_label data=digits, 1 channel."""
    run_dir = tmp_path / "run"
    shapes_only = ("model.text_encoder", "data.train_size", "data.val_size", "data.test_size")
    overrides = [o for o in TINY if not o.startswith(shapes_only)]
    result = run_entry(
        "train.py",
        *overrides,
        "model=ddpm_label",
        "data=digits",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    model = genlab.load(run_dir / "checkpoints" / "last.ckpt")
    assert model.condition == "label" and model.channels == 1
    images = model.generate(labels=[3, 7], steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 16, 16)
    grid_text = (run_dir / "samples" / "prompts.txt").read_text().splitlines()
    assert grid_text[:2] == ["zero", "one"]  # the class names of the labels drawn


def test_sample_inpaints_with_any_sampler_config(trained_run: Path, tmp_path: Path) -> None:
    """`sampler=heun` picks conf/sampler/heun.yaml; the mask's white half is kept exactly."""
    res, half = SIDE - 2, (SIDE - 2) // 2
    rng = np.random.default_rng(0)
    known = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
    mask = np.zeros((res, res), dtype=np.uint8)
    mask[:, :half] = 255
    Image.fromarray(known).save(tmp_path / "known.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = run_entry(
        "sample.py",
        f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        'prompt="a red circle"',
        "n=1",
        "sampler=heun",
        "steps=3",
        "thresholding=dynamic",
        "cell=null",
        f"inpaint_image={tmp_path / 'known.png'}",
        f"inpaint_mask={tmp_path / 'mask.png'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    grid = np.asarray(Image.open(tmp_path / "run" / "samples.png").convert("RGB"))
    drawn = grid.astype(int)  # a grid of one image is that image, unpadded
    assert np.abs(drawn[:, :half] - known[:, :half]).max() <= 1
    assert np.abs(drawn[:, half:] - known[:, half:]).mean() > 10
    # SDEdit through the entry point: strength 0 gives the input image back
    result = run_entry(
        "sample.py",
        f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        'prompt="a red circle"',
        "n=1",
        "cell=null",
        f"init_image={tmp_path / 'known.png'}",
        "strength=0",
        f"hydra.run.dir={tmp_path / 'edit'}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    edited = np.asarray(Image.open(tmp_path / "edit" / "samples.png").convert("RGB"))
    assert np.abs(edited.astype(int) - known).max() <= 1
