"""The GAN and Glow recipes through the real entry point: ``train.py experiment=<recipe>``, shrunk,
trains, checkpoints, tests with generative metrics and draws the final grid; then each model's own
checks on its run (logged metrics, protocol, the checkpoint loaded back)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import genlab
from conftest import TINY_DATA, TINY_GAN, TINY_GLOW, TINY_RUN, check_ok, run_entry
from genlab.models.flows.glow import Glow, to_flow_space


def logged_names(run_dir: Path) -> set[str]:
    """The CSV logger's metric names with at least one value."""
    rows = list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))
    return {k for row in rows for k, v in row.items() if v}


def check_gan(run_dir: Path, generated: dict) -> None:
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    assert {"fid", "caption_exact"} <= set(generated["metrics"])
    assert generated["protocol"]["weights"] == "EMA"
    assert generated["protocol"]["sampler"] == "generator (one pass)"
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as f:
        columns = set(next(csv.reader(f)))
    assert {"train/d_real", "train/d_fake", "val/loss", "test/loss"} <= columns
    model = genlab.load(last)
    prompts = ["a large red circle at the top left", "a small blue square in the center"]
    images = model.generate(prompts, n=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 16, 16)


def check_glow(run_dir: Path, generated: dict) -> None:
    logged = logged_names(run_dir)
    assert {"train/bpd", "train/loss", "val/bpd", "val/loss", "test/bpd", "test/fid"} <= logged
    assert generated["protocol"]["temperature"] == 0.7
    assert generated["protocol"]["sampler"] == "flow inverse"
    model = genlab.load(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(model, Glow) and model.flow.initialized
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.flow(to_flow_space(torch.rand(4, 3, 16, 16) * 2 - 1, torch.rand(4, 3, 16, 16)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no re-init
    model.eval()
    images = model.generate(n=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1


RECIPES = {  # experiment: (its tiny networks, its own checks)
    "gan_shapes": (TINY_GAN, check_gan),
    "glow_shapes": (TINY_GLOW, check_glow),
}


@pytest.mark.parametrize("experiment", list(RECIPES))
def test_recipe_trains_checkpoints_and_evaluates_through_train_py(
    experiment: str, tmp_path: Path
) -> None:
    nets, check = RECIPES[experiment]
    run_dir = tmp_path / "run"
    result = run_entry(
        "train.py",
        f"experiment={experiment}",
        *TINY_DATA,
        "data.train_size=32",  # 4 steps are one whole epoch
        *TINY_RUN,
        *nets,
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    (report,) = (run_dir / "metrics").glob("test_step*.json")
    (generated,) = [r for r in json.loads(report.read_text()) if r["name"] == "generated"]
    assert (run_dir / "samples" / "final.png").is_file()
    check(run_dir, generated)
