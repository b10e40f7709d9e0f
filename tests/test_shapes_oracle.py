"""The shapes oracle: per-cell labels of scenes, batches and captions agree; the network's
shapes; a short fit parses real validation images far above chance; the evaluator interface
(parse, features, class_probs) checks and resizes its inputs, ignores the caller's autocast and
mode, and survives a checkpoint round trip; the recipe runs through ``src/train.py``."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import genlab
from conftest import check_ok, quiet_trainer, run_entry
from genlab.data.digits import DigitsDataModule
from genlab.data.shapes import (
    COLOR_NAMES,
    SHAPES,
    ShapesDataModule,
    ShapesDataset,
    caption_cells,
    cell_attributes,
    cells_from_attributes,
)
from genlab.models.evaluators.shapes_oracle import ShapesOracle
from genlab.nn.shapes_parser import ShapesParserNet
from genlab.utils.checkpoint import ModelConfigInCheckpoint
from genlab.utils.instantiate import instantiate

NET = {
    "_target_": "genlab.nn.shapes_parser.ShapesParserNet",
    "image_size": 16,
    "channels": [16, 32, 64],
    "feature_dim": 64,
}
MODEL = {
    "_target_": "genlab.models.evaluators.shapes_oracle.ShapesOracle",
    "net": NET,
    "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 3e-3},
    "lr_scheduler": {
        "_target_": "genlab.utils.lr_schedule.warmup_cosine",
        "_partial_": True,
        "warmup_steps": 20,
    },
    "image_size": 16,
}
# one object of 3 shapes x 3 colours at 16 px: easy enough to learn in seconds
DATA = dict(
    resolution=16,
    shapes=["circle", "square", "triangle"],
    colors=["red", "green", "blue"],
    min_objects=1,
    max_objects=1,
    hold_out=False,
    batch_size=32,
    val_size=256,
    test_size=256,
)
FIT_STEPS = 400


def trainer(tmp_path, **kw) -> L.Trainer:
    return quiet_trainer(tmp_path, **{"num_sanity_val_steps": 0, **kw})


def val_batch(data: ShapesDataModule) -> dict:
    return next(iter(DataLoader(data.split("val"), batch_size=len(data.split("val")))))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """An oracle fitted for FIT_STEPS steps (batch 32) on one-object 16 px images (~10 s)."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("shapes_oracle")
    model, data = instantiate(MODEL), ShapesDataModule(train_size=FIT_STEPS * 32, **DATA)
    trainer_ = trainer(tmp, max_steps=FIT_STEPS, precision="bf16-mixed")
    trainer_.callbacks.append(ModelConfigInCheckpoint(MODEL))
    trainer_.fit(model, data)
    return model, data, trainer_


def test_cell_labels_of_scenes_batches_and_captions_agree():
    dataset = ShapesDataset(
        "train", size=32, shapes=SHAPES, colors=COLOR_NAMES, max_objects=5, hold_out=False
    )
    items = [dataset[i] for i in range(len(dataset))]
    batched = cells_from_attributes(torch.stack([item["attributes"] for item in items]))
    assert batched.shape == (32, 9, 3) and batched.dtype == torch.long
    for i, item in enumerate(items):
        scene, _ = dataset.scene(i)
        cells = cell_attributes(scene)
        assert cells.shape == (9, 3) and cells.dtype == np.int64
        np.testing.assert_array_equal(batched[i].numpy(), cells)
        np.testing.assert_array_equal(caption_cells(item["caption"]), cells)
        occupied = cells[:, 0] >= 0
        assert occupied.sum() == item["num_objects"] and (cells[~occupied] == -1).all()
        for obj in scene:
            assert SHAPES[cells[obj.cell, 0]] == obj.shape
            assert COLOR_NAMES[cells[obj.cell, 1]] == obj.color
    with pytest.raises(ValueError, match="two objects 'top left'"):
        caption_cells("a small red circle at the top left and top left: a large blue square")


def test_network_shapes_and_checks():
    for size, channels in ((16, [8, 16, 16]), (32, [8, 16, 16, 16])):
        net = ShapesParserNet(image_size=size, channels=channels, feature_dim=48)
        features, logits = net(torch.randn(5, 3, size, size))
        assert features.shape == (5, 48) and net.feature_dim == 48
        assert {k: tuple(v.shape) for k, v in logits.items()} == {
            "occupancy": (5, 9, 2),
            "shape": (5, 9, 5),
            "color": (5, 9, 9),
            "size": (5, 9, 2),
        }
    with pytest.raises(ValueError, match="net.image_size=18 must be divisible"):
        ShapesParserNet(image_size=18, channels=[8, 16, 16])
    with pytest.raises(ValueError, match="full tables.*color: 6"):
        instantiate({**MODEL, "net": {**NET, "num_colors": 6}})
    with pytest.raises(ValueError, match="model.net.image_size=16 must equal model.image_size=32"):
        instantiate({**MODEL, "image_size": 32})


def test_a_short_fit_parses_real_images(fitted, tmp_path):
    """Chance of an exact parse is 1/9 (cell) x 1/3 x 1/3 x 1/2 < 1%; after FIT_STEPS steps the
    oracle parses most of the 256 validation images exactly (0.81 measured), and the logged
    metrics agree with ``parse``."""
    model, data, _ = fitted
    batch = val_batch(data)
    cells = cells_from_attributes(batch["attributes"])
    parsed = model.parse(batch["image"])
    assert parsed.shape == (256, 9, 3) and parsed.dtype == torch.long
    exact = (parsed == cells).all(dim=2).all(dim=1).float().mean().item()
    assert exact > 0.6, exact
    # in float32, as parse() computes (the fit's bf16 autocast flips a borderline image or two)
    metrics = trainer(tmp_path, precision="32-true").validate(model, data, verbose=False)[0]
    names = {"loss", "exact", "acc_occupancy", "acc_shape", "acc_color", "acc_size"}
    assert set(metrics) == {f"val/{n}" for n in names}
    assert metrics["val/exact"] == pytest.approx(exact, abs=1e-6)
    assert metrics["val/acc_occupancy"] > 0.95 and metrics["val/acc_color"] > 0.9, metrics


def test_class_probs_peak_on_the_object_and_sum_to_one(fitted):
    model, data, _ = fitted
    batch = val_batch(data)
    probs = model.class_probs(batch["image"])
    assert probs.shape == (256, 45) and model.num_classes == 45
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(256))
    shape, color = batch["attributes"][:, 0, 0], batch["attributes"][:, 0, 1]
    right = (probs.argmax(dim=1) == shape * len(COLOR_NAMES) + color).float().mean().item()
    assert right > 0.6, right  # 0.81 measured


class FixedLogits(torch.nn.Module):
    """A stand-in network: a triangle (shape 2) in purple (colour 4) in every cell but a circle
    in cell 7, each cell occupied with the logit given (against 0 for empty)."""

    def __init__(self, occupied_logits: list[float]):
        super().__init__()
        self.occupied_logits = torch.tensor(occupied_logits)

    def forward(self, x: torch.Tensor):
        sure = 30.0
        occupancy = torch.stack([torch.zeros(9), self.occupied_logits], dim=-1)  # (9, 2)
        shape, color = torch.full((9, 5), -sure), torch.full((9, 9), -sure)
        shape[:, 2], color[:, 4], shape[7, 2], shape[7, 0] = sure, sure, -sure, sure
        logits = {"occupancy": occupancy, "shape": shape, "color": color}
        logits["size"] = torch.zeros(9, 2)
        return torch.zeros(len(x), 8), {k: v.expand(len(x), *v.shape) for k, v in logits.items()}


def test_class_probs_definition_on_given_logits():
    """One sure object gives its one-hot class; no object the uniform distribution; two sure
    objects half of each; half an expected object is half its class and half uniform."""
    model = instantiate(MODEL)
    triangle_purple, circle_purple = 2 * 9 + 4, 0 * 9 + 4
    no, yes, half = -30.0, 30.0, 0.0
    cases = {  # occupancy logit per cell; expected {class: probability}; uniform mass
        "one": ([no] * 4 + [yes] + [no] * 4, {triangle_purple: 1.0}, 0.0),
        "none": ([no] * 9, {}, 1.0),
        "two": (
            [no] * 4 + [yes] + [no] * 2 + [yes, no],
            {triangle_purple: 0.5, circle_purple: 0.5},
            0.0,
        ),
        "half": ([no] * 4 + [half] + [no] * 4, {triangle_purple: 0.5}, 0.5),
    }
    for name, (occupied, expected, uniform) in cases.items():
        model.net = FixedLogits(occupied)
        wanted = torch.full((45,), uniform / 45)
        for k, p in expected.items():
            wanted[k] += p
        torch.testing.assert_close(
            model.class_probs(torch.zeros(2, 3, 16, 16))[1], wanted, msg=name
        )


def test_inputs_are_checked_and_resized(fitted, caplog):
    model, data, _ = fitted
    dataset = ShapesDataset("val", size=64, resolution=64, **own_scene_args(data))
    images64 = torch.stack([dataset[i]["image"] for i in range(64)])
    images16 = torch.stack([data.split("val")[i]["image"] for i in range(64)])
    # the same scenes drawn at 64 px and area-averaged to 16 px: nearly the same pixels (they
    # differ by 0.002 on average, at polygon edges) and the same parse (97% measured)
    assert (model.prepare(images64) - images16).abs().mean() < 0.01
    agree = (model.parse(images64) == model.parse(images16)).all(dim=2).all(dim=1).float().mean()
    assert agree > 0.9, agree
    assert model.features(images64).shape == (64, model.feature_dim)
    with caplog.at_level(logging.WARNING):
        model.parse(images16[:, :, :8, :8])
        model.parse(images16[:, :, :12, :12])
    assert sum("upsampling" in r.getMessage() for r in caplog.records) == 1
    for bad, match in [
        ((images16 + 1) * 127.5, r"must be in \[-1, 1\]"),
        (images16[:, :1], "must have 3 channels"),
        (images16.clone().fill_(float("nan")), "NaN"),
        (images16[0], r"shaped \(N, C, H, W\)"),
    ]:
        for method in (model.parse, model.features, model.class_probs):
            with pytest.raises(ValueError, match=match):
                method(bad)


def own_scene_args(data: ShapesDataModule) -> dict:
    """The scene arguments of a datamodule, to draw its scenes at another resolution."""
    keys = ("shapes", "colors", "min_objects", "max_objects", "jitter", "hold_out", "seed")
    return {k: getattr(data.hparams, k) for k in keys}


def test_results_ignore_autocast_and_keep_the_mode(fitted):
    model, data, _ = fitted
    images = val_batch(data)["image"][:64]
    model.train()
    running_mean = model.net.trunk[0][1].running_mean.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = [model.parse(images), model.features(images), model.class_probs(images)]
    assert model.training and torch.equal(model.net.trunk[0][1].running_mean, running_mean)
    model.eval()
    plain = [model.parse(images), model.features(images), model.class_probs(images)]
    assert not model.training
    assert all(t.dtype in (torch.long, torch.float32) for t in under_autocast)
    for a, b in zip(under_autocast, plain):
        assert torch.equal(a, b)
    assert not plain[1].requires_grad


def test_checkpoint_round_trip(fitted, tmp_path):
    model, data, trainer_ = fitted
    path = tmp_path / "oracle.ckpt"
    trainer_.save_checkpoint(path)
    loaded = genlab.load(path)
    assert isinstance(loaded, ShapesOracle) and not loaded.training
    images = val_batch(data)["image"][:64]
    assert torch.equal(loaded.parse(images), model.parse(images))
    assert torch.equal(loaded.features(images), model.features(images))


def test_other_datasets_are_refused(tmp_path):
    with pytest.raises(ValueError, match="trains on the shapes dataset"):
        trainer(tmp_path, max_steps=1).fit(instantiate(MODEL), DigitsDataModule(resolution=16))
    with pytest.raises(ValueError, match="model.image_size=16 must equal data.resolution=32"):
        trainer(tmp_path, max_steps=1).fit(instantiate(MODEL), ShapesDataModule(train_size=8))
    with pytest.raises(ValueError, match="no 'attributes'"):
        instantiate(MODEL).training_step({"image": torch.zeros(2, 3, 16, 16)}, 0)


def test_recipe_trains_through_the_entry_point(tmp_path: Path) -> None:
    """``python src/train.py experiment=shapes_oracle``, shrunk: train, validate, checkpoint,
    test; the checkpoint rebuilds the oracle, which parses 32 px images."""
    run_dir = tmp_path / "run"
    result = run_entry(
        "train.py",
        "experiment=shapes_oracle",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "data.batch_size=8",
        "data.train_size=64",
        "data.val_size=16",
        "data.test_size=16",
        "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    oracle = genlab.load(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(oracle, ShapesOracle) and oracle.image_size == 32
    assert oracle.parse(torch.zeros(2, 3, 32, 32) - 1).shape == (2, 9, 3)
    header = next((run_dir / "csv").rglob("metrics.csv")).read_text().splitlines()[0]
    for name in ("train/loss", "val/exact", "val/acc_color", "test/exact", "test/acc_size"):
        assert name in header.split(","), header
