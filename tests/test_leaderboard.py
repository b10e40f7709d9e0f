"""bench/leaderboard.py: the plan and the skipping of dependents (in-process), and a real run on
tiny models as a subprocess: the files it writes, a failing family recorded while the other
completes, and a rerun that skips what is done."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (
    ORACLE_OVERRIDES,
    ROOT,
    TINY_BPE,
    TINY_DATA,
    TINY_GAN,
    TINY_GLOW,
    TINY_UNET,
)

SCRIPT = ROOT / "bench" / "leaderboard.py"
TRAIN = [*TINY_DATA, "trainer.log_every_n_steps=1", "callbacks.rich_progress_bar=null"]
TRAIN += ["callbacks.model_summary=null", "callbacks.sample_grid.num_samples=4"]
EVAL = ["callbacks.generative_metrics.batch_size=4", *ORACLE_OVERRIDES]


def load_script():
    spec = importlib.util.spec_from_file_location("leaderboard", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for its dataclass
    spec.loader.exec_module(module)
    return module


def options(flag: str, overrides: list[str], model: str | None = None) -> list[str]:
    """``--flag override`` for each override (``--set model:override`` with a model)."""
    return [a for o in overrides for a in (flag, f"{model}:{o}" if model else o)]


def run_leaderboard(out: Path, *args: str) -> subprocess.CompletedProcess:
    """The script on 1 thread with the tiny settings and the tests' oracle."""
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--threads", "1"]
    command += ["--num-samples", "8", *options("--train", TRAIN), *options("--eval", EVAL)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, env=env, timeout=600, cwd=out.parent
    )


def rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["model"]: row for row in csv.DictReader(f)}


def test_only_adds_what_a_family_builds_on() -> None:
    board = load_script()
    names = [m.name for m in board.select_models("ldm_vq,unclip")]
    assert names == ["vqgan64", "ldm_vq", "clip", "unclip_prior", "unclip_decoder", "unclip"]
    assert {m.name for m in board.select_models("autoencoders")} == {
        "vae64",
        "vqgan64",
        "dvae",
        "vqgan",
        "vqvae",
        "ae",
        "dae",
    }
    with pytest.raises(SystemExit, match="not a family"):
        board.select_models("nope")


def test_dependents_of_a_failed_model_are_skipped(tmp_path: Path, monkeypatch) -> None:
    board = load_script()
    args = board.parse_args(["--out", str(tmp_path), "--steps", "1"])
    ran = []

    def run_step(args, model, step):  # vae64 fails to train, vqgan64 to evaluate
        ran.append(f"{model.name}.{step}")
        failed = f"{model.name}.{step}" in ("vae64.train", "vqgan64.eval")
        record = {"status": "failed" if failed else "done", "log": f"{model.name}/{step}.log"}
        board.record_file(args, model, step).parent.mkdir(parents=True, exist_ok=True)
        board.record_file(args, model, step).write_text(json.dumps(record))
        return record

    monkeypatch.setattr(board, "run_step", run_step)
    status = board.run_all(args, board.select_models("ldm,gan"))
    assert status == {
        "gan": "ok",
        "vae64": "failed: train (vae64/train.log)",
        "vqgan64": "failed: eval (vqgan64/eval.log)",  # its checkpoint is still there
        "ldm_vae": "skipped: needs vae64",
        "ldm_vq": "ok",
    }
    assert "vae64.eval" not in ran and not any(r.startswith("ldm_vae") for r in ran)
    assert "ldm_vq.sweep" in ran and "gan.samples" in ran and "gan.sweep" not in ran


def test_a_rerun_with_other_settings_is_refused(tmp_path: Path) -> None:
    board = load_script()
    board.check_settings(board.parse_args(["--out", str(tmp_path), "--steps", "1"]))
    board.check_settings(
        board.parse_args(["--out", str(tmp_path), "--steps", "1", "--only", "gan"])
    )
    with pytest.raises(SystemExit, match="other settings"):
        board.check_settings(board.parse_args(["--out", str(tmp_path), "--steps", "2"]))


def test_an_images_budget_divides_by_the_recipes_batch(tmp_path: Path) -> None:
    board = load_script()
    args = board.parse_args(
        ["--out", str(tmp_path), "--images", "1000", "--train", "data.batch_size=8"]
    )
    assert board.budget_steps(board.BY_NAME["gan"], args) == (125, None)
    args = board.parse_args(["--out", str(tmp_path), "--images", "1000"])
    assert board.budget_steps(board.BY_NAME["clip"], args) == (8, None)  # batch 128: 7.8 steps


def test_dry_run_prints_every_command_and_runs_nothing(tmp_path: Path, capsys) -> None:
    board = load_script()
    board.main(["--dry-run", "--out", str(tmp_path / "out"), "--eval", "seed=3"])
    printed = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    for model in board.MODELS:
        assert f"\n{model.name} (" in printed
    vae = tmp_path / "out" / "vae64" / "train" / "checkpoints" / "last.ckpt"
    assert f"experiment=ldm_shapes model.space.first_stage_ckpt={vae}" in printed
    assert "model=imagen_cascade 'model.stages=[" in printed
    assert "eval.guidance_scales=[1,3,5]" in printed  # the guided families' sweeps
    assert "+callbacks.step_timer=" in printed  # the calibration runs of --minutes (default)
    # the floor, then the extra overrides: the reference redrawn for the paired models
    assert "eval.real_split=test seed=3" in printed  # unconditional Glow
    assert "eval.real_split=redrawn seed=3" in printed  # text models and autoencoders


def test_a_failing_family_is_recorded_and_the_others_complete_and_are_kept(
    tmp_path: Path, oracle_checkpoint: Path
) -> None:
    out = tmp_path / "board"
    args = [
        "--only",
        "gan,glow",
        "--steps",
        "2",
        *options("--set", TINY_GAN, "gan"),
        *options("--set", [*TINY_GLOW, "model.flow.no_such_key=1"], "glow"),  # fails
    ]
    first = run_leaderboard(out, *args)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    assert "total wall time" in first.stdout

    for name in ("leaderboard.md", "samples.png", "prompts.txt", "autoencoders.csv"):
        assert (out / name).is_file(), name
    board = rows(out / "leaderboard.csv")
    gan, glow = board["gan"], board["glow"]
    assert gan["status"] == "ok" and gan["train steps"] == "2" and gan["resolution"] == "16"
    assert float(gan["fid"]) > 0 and float(gan["fid_floor"]) >= 0  # the number and its floor
    assert gan["caption_exact"] and gan["caption_exact_floor"] and gan["kid_std"]
    assert "temperature" in gan["sampling"]
    assert glow["status"] == f"failed: train ({out / 'glow' / 'train.log'})"
    assert "no_such_key" in (out / "glow" / "train.log").read_text()
    assert json.loads((out / "glow" / "train.json").read_text())["status"] == "failed"
    training = rows(out / "training.csv")
    assert training["gan"]["images seen"] == "16"  # 2 steps of batch 8
    assert training["glow"]["status"].startswith("failed: train")
    markdown = (out / "leaderboard.md").read_text()
    assert "2 optimizer steps per trained model" in markdown and "wall time" in markdown
    assert "glow: failed: train" in markdown

    done = {p.name: p.read_text() for p in (out / "gan").glob("*.json")}
    assert sorted(done) == ["eval.json", "samples.json", "train.json"]
    second = run_leaderboard(out, *args)
    assert second.returncode == 1
    assert second.stdout.count("done before, skipped") == 3  # gan's train, eval and samples
    assert {p.name: p.read_text() for p in (out / "gan").glob("*.json")} == done
    assert "glow (Glow" in second.stdout and "train: failed" in second.stdout  # retried
    assert rows(out / "leaderboard.csv")["gan"]["fid"] == gan["fid"]


@pytest.mark.slow
def test_calibrated_budget_guidance_sweep_and_curve(tmp_path: Path, oracle_checkpoint) -> None:
    """The --minutes budget (a calibration run sets max_steps) on the tiny DDPM, with its guidance
    sweep and the guidance plot (about 1.5 minutes)."""
    out = tmp_path / "board"
    ddpm = [*TINY_UNET, *TINY_BPE, "sampler.steps=2"]
    result = run_leaderboard(
        out,
        "--only",
        "ddpm",
        "--minutes",
        "0.05",
        "--calibration-steps",
        "3",
        "--guidance-scales",
        "1,3",
        *options("--set", ddpm, "ddpm"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    calibration = json.loads((out / "ddpm" / "calibrate.json").read_text())
    train = json.loads((out / "ddpm" / "train.json").read_text())
    assert calibration["timed_steps"] == 3
    assert train["max_steps"] == max(1, round(3 / calibration["seconds_per_step"]))
    curve = list(csv.DictReader((out / "guidance.csv").read_text().splitlines()))
    assert sorted(float(r["guidance_scale"]) for r in curve) == [1.0, 3.0]  # 3: the model's own
    assert (out / "guidance.png").is_file()
