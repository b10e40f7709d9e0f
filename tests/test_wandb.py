"""W&B as users know it (issue 24 item 4), on an offline run of a tiny job through train.py:
the best checkpoint as a model artifact (log_model), a table of prompt → sample → oracle verdict
per evaluation, the metric report and the gallery attached as an artifact, and the jobs of a
multirun grouped. The offline run's transaction log (``run-<id>.wandb``) is read record by
record; the artifacts' files are staged under ``WANDB_DATA_DIR``."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conftest import CONF, TINY, check_ok, run_entry

BLOCK = 32768  # the W&B transaction log: LevelDB-style log blocks after a 7-byte header


def wandb_records(run: Path) -> Iterator:
    """The protobuf records of an offline W&B run folder's ``run-<id>.wandb``."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run.glob("run-*.wandb")
    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left - 7
            continue
        pending += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def artifacts(run: Path) -> dict[str, list]:
    """The artifact records of an offline run, by type."""
    found: dict[str, list] = {}
    for record in wandb_records(run):
        if record.WhichOneof("record_type") == "artifact":
            found.setdefault(record.artifact.type, []).append(record.artifact)
    return found


def staged(artifact) -> dict[str, Path]:
    """An artifact's files: name in the artifact -> the staged local copy."""
    return {entry.path: Path(entry.local_path) for entry in artifact.manifest.contents}


def test_offline_wandb_run_holds_checkpoint_table_report_and_sweep_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # artifact staging
    sweep_dir = tmp_path / "multirun"
    result = run_entry(
        "train.py",
        "-m",  # a multirun of one job: its W&B run is grouped by the sweep
        *TINY,
        "logger=wandb",
        "logger.wandb.offline=true",
        "logger.wandb.log_model=true",  # Lightning refuses it with offline: W&B's offline mode
        "tags=[wandb_test]",
        f"hydra.sweep.dir={sweep_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    job = sweep_dir / "0"
    (run,) = (job / "wandb").glob("offline-run-*")
    assert run.name.endswith((job / "wandb_id.txt").read_text().strip())
    (info,) = [r.run for r in wandb_records(run) if r.WhichOneof("record_type") == "run"]
    assert info.run_group == "train/multirun" and info.display_name == "multirun/0"

    found = artifacts(run)
    (model,) = found["model"]  # the best checkpoint by val/loss, not last.ckpt
    assert json.loads(model.metadata)["original_filename"] == "epoch_000-step_000004.ckpt"
    assert set(model.aliases) >= {"best", "latest"}
    ckpt = torch.load(staged(model)["model.ckpt"], map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4

    (evaluation,) = found["evaluation"]  # the final test's report and the run's gallery
    files = staged(evaluation)
    assert set(files) == {"test_step000004.json", "gallery.html"}
    report = json.loads(files["test_step000004.json"].read_text())
    assert report[0]["name"] == "generated" and "caption_exact" in report[0]["metrics"]

    (table,) = found["run_table"]
    files = staged(table)
    (table_json,) = [name for name in files if name.endswith(".table.json")]
    content = json.loads(files[table_json].read_text())
    assert content["columns"] == ["index", "prompt", "sample", "oracle verdict"]
    prompts = [row[1] for row in content["data"]]
    assert len(prompts) == 8  # every one of the 8 images of the test's metrics (table_size 16)
    assert all(row[3][0] in "✓✗" for row in content["data"])  # the tiny oracle's verdicts
    pngs = [name for name in files if name.endswith(".png")]
    assert len(pngs) == 8 and all(files[name].is_file() for name in pngs)
    assert list((run / "files" / "media" / "table" / "test").glob("samples_*.table.json"))


COCO_RECIPES = sorted(p.stem for p in (CONF / "experiment").glob("*_coco*.yaml"))


@pytest.mark.parametrize("recipe", COCO_RECIPES)
def test_gpu_recipes_log_to_tensorboard_and_offline_wandb(recipe: str) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train.yaml", overrides=[f"experiment={recipe}"])
    loggers = {name: node._target_.rsplit(".", 1)[-1] for name, node in cfg.logger.items()}
    assert loggers == {"tensorboard": "TensorBoardLogger", "wandb": "WandbLogger"}
    assert cfg.logger.wandb.offline is True and cfg.logger.wandb.log_model is True
