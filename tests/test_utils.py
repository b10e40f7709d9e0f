"""genlab.utils: the config validator, rank-aware logging, task wrapper, tags, metric lookup,
W&B run ids and image grids."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Literal

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from PIL import Image

from conftest import CONF
from genlab.utils.images import save_image_grid
from genlab.utils.instantiators import WANDB_ID_FILE, wandb_run_id
from genlab.utils.rank_logging import RankedLogger
from genlab.utils.rich_utils import enforce_tags
from genlab.utils.task import get_metric_value, task_wrapper
from genlab.utils.validation import ConfigError, check_value, validate_config


# ---------------------------------------------------------------------------------------------
# targets for the validator (this module is importable as `test_utils`)
def typed(
    *,
    steps: int = 1,
    lr: float = 1e-3,
    name: str = "x",
    flag: bool = False,
    maybe: int | None = None,
    mode: Literal["a", "b"] = "a",
    sizes: list[int] | None = None,
    pair: tuple[int, str] = (1, "x"),
):
    return locals()


def needs(required: int, *, optional: int = 0):
    return required + optional


def open_ended(count: int = 0, **kwargs):
    return count, kwargs


def unannotated(anything=0):
    return anything


def errors_for(node: dict) -> str:
    """The validator's message for a config holding ``node`` under ``model``, or ''."""
    try:
        validate_config(OmegaConf.create({"model": node}))
    except ConfigError as err:
        return str(err)
    return ""


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("steps", "abc", "expected int"),
        ("steps", 1.5, "expected int"),
        ("steps", True, "expected int"),
        ("lr", "fast", "expected float"),
        ("name", 3, "expected str"),
        ("flag", 1, "expected bool"),
        ("maybe", "x", "expected int or None"),
        ("mode", "c", "expected one of ['a', 'b']"),
        ("sizes", [1, "2"], "expected list[int] or None"),
        ("pair", [1, 2], "expected tuple[int, str]"),
    ],
)
def test_validator_names_key_value_and_type(key: str, value, expected: str) -> None:
    message = errors_for({"_target_": "test_utils.typed", key: value})
    assert f"model.{key}={value!r}: {expected}" in message


def test_validator_accepts_good_values() -> None:
    good = {"steps": 3, "lr": 2, "name": "y", "flag": True, "maybe": None, "mode": "b"}
    good |= {"sizes": [1, 2], "pair": [2, "z"]}
    assert errors_for({"_target_": "test_utils.typed", **good}) == ""


def test_validator_unknown_key_lists_allowed_keys() -> None:
    message = errors_for({"_target_": "test_utils.typed", "stpes": 3})
    assert "model.stpes: unknown key for test_utils.typed" in message
    assert "allowed keys: steps, lr, name, flag, maybe, mode, sizes, pair" in message


def test_validator_missing_required_argument_unless_partial() -> None:
    assert "model.required: missing required argument" in errors_for(
        {"_target_": "test_utils.needs"}
    )
    assert errors_for({"_target_": "test_utils.needs", "_partial_": True}) == ""


def test_validator_skips_kwargs_targets_and_unannotated_params() -> None:
    assert errors_for({"_target_": "test_utils.open_ended", "anything": "goes"}) == ""
    assert "model.count='x'" in errors_for({"_target_": "test_utils.open_ended", "count": "x"})
    assert errors_for({"_target_": "test_utils.unannotated", "anything": "x"}) == ""


def test_validator_checks_nested_targets_and_reports_all_errors() -> None:
    node = {
        "_target_": "test_utils.open_ended",
        "net": {"_target_": "test_utils.typed", "steps": "x", "typo": 1},
        "blocks": [{"_target_": "test_utils.typed", "lr": "y"}],
    }
    message = errors_for(node)
    assert "model.net.steps='x'" in message
    assert "model.net.typo: unknown key" in message
    assert "model.blocks[0].lr='y'" in message


def test_validator_bad_target_and_missing_value() -> None:
    assert "model._target_='test_utils.nope' cannot be imported" in errors_for(
        {"_target_": "test_utils.nope"}
    )
    with pytest.raises(ConfigError, match=r"ckpt_path is mandatory .* pass ckpt_path="):
        validate_config(OmegaConf.create({"ckpt_path": "???"}))


def test_validator_top_level_schema() -> None:
    cfg = OmegaConf.create({"seed": "abc", "tags": ["a"]})
    with pytest.raises(ConfigError, match=r"seed='abc': expected int or None"):
        validate_config(cfg, {"seed": int | None, "tags": list[str]})
    assert check_value("tags", ["a", "b"], list[str]) == []


def test_validator_on_lightning_and_torch_signatures() -> None:
    trainer = {"_target_": "lightning.pytorch.trainer.Trainer", "precision": "bf17"}
    assert "model.precision='bf17': expected one of [" in errors_for(trainer)
    assert errors_for({**trainer, "precision": "bf16-mixed", "devices": 2}) == ""
    adamw = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": "fast"}
    assert "model.lr='fast': expected float or Tensor" in errors_for(adamw)
    assert "model.monitor: missing required argument" in errors_for(
        {"_target_": "lightning.pytorch.callbacks.EarlyStopping"}
    )


# ---------------------------------------------------------------------------------------------
def test_ranked_logger_prefix_and_rank_filters(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    everywhere = RankedLogger("genlab.test", rank_zero_only=False)
    zero_only = RankedLogger("genlab.test", rank_zero_only=True)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    everywhere.info("hello")
    zero_only.info("dropped on rank 1")
    everywhere.info("only on rank 0", rank=0)
    everywhere.info("only on rank 1", rank=1)
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    zero_only.warning("kept on rank 0")
    assert caplog.messages == [
        "[rank: 1] hello",
        "[rank: 1] only on rank 1",
        "[rank: 0] kept on rank 0",
    ]


def test_get_metric_value(caplog) -> None:
    metrics = {"val/loss": torch.tensor(0.25), "train/loss": torch.tensor(0.5)}
    assert get_metric_value(metrics, "val/loss") == 0.25
    assert get_metric_value(metrics, None) is None
    # a metric the run did not log (a step budget shorter than the first validation): a warning
    # naming it and the logged ones, not a crash after training
    with caplog.at_level(logging.WARNING):
        assert get_metric_value(metrics, "val/acc") is None
    assert re.search(r"optimized_metric='val/acc'.*\['train/loss', 'val/loss'\]", caplog.text)


def test_task_wrapper_closes_wandb_and_reraises(tmp_path: Path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})

    @task_wrapper
    def crashing_task(cfg):
        wandb.init(dir=str(tmp_path), project="genlab-test")
        assert wandb.run is not None
        raise RuntimeError("boom in the middle of training")

    with pytest.raises(RuntimeError, match="boom"):
        crashing_task(cfg)
    assert wandb.run is None
    assert list((tmp_path / "wandb").glob("offline-run-*")), "the W&B run was never started"


def test_task_wrapper_returns_the_result(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    assert task_wrapper(lambda cfg: ({"m": 1.0}, {}))(cfg) == ({"m": 1.0}, {})


@pytest.mark.parametrize("mode", [RunMode.RUN, RunMode.MULTIRUN])
def test_enforce_tags(mode: RunMode, tmp_path: Path) -> None:
    GlobalHydra.instance().clear()
    overrides = ["tags=[]", f"paths.output_dir={tmp_path}", f"paths.work_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides, return_hydra_config=True)
    cfg.hydra.mode = mode
    HydraConfig.instance().set_config(cfg)
    try:
        if mode == RunMode.MULTIRUN:
            with pytest.raises(ValueError, match=r"tags is empty: a multirun needs tags"):
                enforce_tags(cfg)
        else:
            enforce_tags(cfg)  # a single run only warns
        cfg.tags = ["sweep"]
        enforce_tags(cfg)
    finally:
        HydraConfig.instance().cfg = None


def test_wandb_run_id_is_stored_and_reused_on_resume(tmp_path: Path) -> None:
    first = tmp_path / "first"
    run_id = wandb_run_id(first, ckpt_path=None)
    assert (first / WANDB_ID_FILE).read_text().strip() == run_id
    ckpt = first / "checkpoints" / "last.ckpt"
    second = tmp_path / "second"
    assert wandb_run_id(second, ckpt_path=str(ckpt)) == run_id
    assert (second / WANDB_ID_FILE).read_text().strip() == run_id
    assert wandb_run_id(tmp_path / "third", ckpt_path=None) != run_id


def test_save_image_grid_layout_and_values(tmp_path: Path) -> None:
    images = torch.full((5, 1, 4, 6), -1.0)
    images[0] = 1.0
    grid = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=3)
    picture = Image.open(tmp_path / "sub" / "grid.png")
    # 3 columns x 2 rows of 4x6 images with 2 px of padding around each
    assert picture.size == (3 * (6 + 2) + 2, 2 * (4 + 2) + 2) and picture.mode == "RGB"
    assert grid.shape == (3, 14, 26) and grid.dtype == torch.uint8
    assert grid[:, 2, 2].tolist() == [255, 255, 255]  # the first image is white (+1)
    assert grid[:, 2, 10].tolist() == [0, 0, 0]  # the second is black (-1)
    with pytest.raises(ValueError, match="expected images shaped"):
        save_image_grid(torch.zeros(2, 4, 8, 8), tmp_path / "bad.png")


def test_view_grid_upscales_by_an_integer_factor_and_writes_captions(tmp_path: Path) -> None:
    """For people: 16 px images at cell=40 become 48 px (factor 3, nearest neighbour: every
    pixel a sharp 3x3 block), each caption in a white strip under its row of images."""
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    plain = save_image_grid(images, tmp_path / "big.png", nrow=3, cell=40)
    assert plain.shape == (3, 2 * (48 + 2) + 2, 3 * (48 + 2) + 2)
    native = save_image_grid(images, tmp_path / "native.png", nrow=3)
    block = plain[:, 2:50, 2:50].reshape(3, 16, 3, 16, 3)  # image 0 as 16x16 blocks of 3x3
    assert (block == native[:, 2:18, None, 2:18, None]).all()
    captions = [f"a large red circle number {i}" for i in range(5)]
    grid = save_image_grid(images, tmp_path / "cap.png", nrow=3, cell=40, captions=captions)
    assert grid.shape[2] == plain.shape[2] and grid.shape[1] > plain.shape[1]
    assert Image.open(tmp_path / "cap.png").size == (grid.shape[2], grid.shape[1])
    strip = grid[:, 52:60, 2:50]  # under image 0: dark text on white
    assert (strip == 255).float().mean() > 0.5 and (strip < 128).any()
    with pytest.raises(ValueError, match="2 captions for 5 images"):
        save_image_grid(images, tmp_path / "x.png", cell=40, captions=["a", "b"])


def test_run_id_names_the_job_not_the_process() -> None:
    """Every process of a job resolves the same run folder (genlab/utils/resolvers.py)."""
    from datetime import datetime

    from genlab.utils.resolvers import process_suffix, run_id

    now = datetime(2026, 12, 6, 15, 4, 5)
    assert run_id({}, now) == "2026-12-06_15-04-05"
    assert run_id({"GENLAB_RUN_ID": "exp1", "SLURM_JOB_ID": "7"}, now) == "exp1"
    assert run_id({"SLURM_JOB_ID": "7"}, now) == "slurm-7"
    assert run_id({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "2"}, now) == "slurm-7.2"
    assert run_id({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "4294967294"}, now) == "slurm-7"  # batch
    array = {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "3"}
    assert run_id(array, now) == "slurm-8_3"
    assert run_id({"TORCHELASTIC_RUN_ID": "none"}, now) == "2026-12-06_15-04-05"
    assert run_id({"TORCHELASTIC_RUN_ID": "abc"}, now) == "torchrun-abc"
    assert process_suffix({}) == ""
    assert process_suffix({"NODE_RANK": "1"}) == "_node1"
    assert process_suffix({"SLURM_NTASKS": "4", "SLURM_PROCID": "3"}) == "_rank3"
    assert process_suffix({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) == ""
