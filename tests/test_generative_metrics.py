"""The generative-metrics machinery: sharding without duplicates, the Inception extractor on local
weights (and the clear fallback without them), evaluator find-or-build, the reference cache, and
the callback through ``src/eval.py``: report with protocols, a guidance sweep (table and plot), a
leaderboard, and rejected bad images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import CLIP_OVERRIDES, ORACLE_OVERRIDES, TINY, check_ok, run_entry
from genlab.data.shapes import ShapesDataModule
from genlab.evaluation.generation import chunk_seed, chunks_of
from genlab.evaluation.references import reference_features
from genlab.metrics.evaluators import ensure_evaluator
from genlab.metrics.extractors import (
    INCEPTION_WEIGHTS_FILE,
    InceptionV3,
    find_inception_weights,
)
from genlab.utils.io import file_version


@pytest.mark.parametrize("n,world,size", [(7, 2, 2), (8, 2, 4), (5, 3, 1), (3, 2, 64), (100, 4, 7)])
def test_chunks_cover_every_item_once(n: int, world: int, size: int) -> None:
    items = [i for rank in range(world) for chunk in chunks_of(rank, world, n, size) for i in chunk]
    assert sorted(items) == list(range(n))  # no duplicates, no padding, nothing missing
    chunk_starts = [c.start for rank in range(world) for c in chunks_of(rank, world, n, size)]
    assert all(s % size == 0 for s in chunk_starts)  # chunk c always holds the same items


def test_chunk_seeds_differ_and_are_stable() -> None:
    seeds = {chunk_seed(0, c) for c in range(1000)}
    assert len(seeds) == 1000
    assert chunk_seed(0, 3) == chunk_seed(0, 3) != chunk_seed(1, 3)
    assert all(0 <= s < 2**63 for s in seeds)


# ---------------------------------------------------------------------------------------------
# Inception
@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights file in torch-fidelity's format with random values: the real architecture and
    loading path, without the (unavailable) trained weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("inception")
    empty = folder / "empty.pth"
    torch.save({}, empty)
    load = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None  # random init
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(empty))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = load
    path = folder / INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


def test_inception_weights_are_looked_up_not_downloaded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert find_inception_weights(None) is None
    assert find_inception_weights(str(tmp_path / "missing.pth")) is None
    cached = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_inception_weights(None) == cached  # torch-fidelity's cache
    configured = tmp_path / "mine.pth"
    configured.write_bytes(b"y")
    assert find_inception_weights(str(configured)) == configured  # the configured path first


def test_inception_extractor_on_local_weights(inception_weights: Path) -> None:
    extractor = InceptionV3(inception_weights, batch_size=3)
    assert extractor.describe() == {
        "extractor": "inception-v3-compat",
        "extractor_version": file_version(inception_weights),
    }
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    features = extractor.features(images)
    assert features.shape == (4, 2048) and torch.isfinite(features).all()
    probs = extractor.class_probs(images)
    assert probs.shape == (4, 1008)
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    # batch-size independent: the same features one image at a time
    torch.testing.assert_close(extractor.features(images[:1]), features[:1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        extractor.features(images * 255)


# ---------------------------------------------------------------------------------------------
# evaluators and reference statistics
def test_missing_evaluator_without_recipe_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="experiment=shapes_oracle"):
        ensure_evaluator(tmp_path / "oracle.ckpt", None, name="shapes_oracle")


def test_failed_evaluator_build_leaves_no_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "oracle.ckpt"
    with pytest.raises(RuntimeError, match="model=no_such_model"):
        ensure_evaluator(path, ["model=no_such_model"], name="shapes_oracle")
    assert not path.exists()
    assert not path.with_name("oracle.ckpt.lock").exists()


def test_evaluator_is_built_once_by_its_recipe(oracle_checkpoint: Path) -> None:
    """The session's oracle was built by ensure_evaluator from a tiny recipe (conftest)."""
    info = json.loads(oracle_checkpoint.with_name(oracle_checkpoint.name + ".json").read_text())
    assert info["command"].startswith("python src/train.py experiment=shapes_oracle")
    mtime = oracle_checkpoint.stat().st_mtime
    assert (
        ensure_evaluator(oracle_checkpoint, ["model=no_such_model"], name="x") == oracle_checkpoint
    )
    assert oracle_checkpoint.stat().st_mtime == mtime  # found, not rebuilt


def test_reference_features_are_cached_by_data_and_extractor(tmp_path: Path) -> None:
    calls = []

    def extract(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return images.mean(dim=(2, 3))  # (B, 3)

    data = ShapesDataModule(resolution=16, val_size=10)
    data.setup()
    options = dict(split="val", num_images=10, extract=extract, cache_dir=tmp_path, batch_size=4)
    first, info = reference_features(data, extractor={"extractor": "mean", "v": "1"}, **options)
    assert first.shape == (10, 3) and sum(calls) == 10
    again, info2 = reference_features(data, extractor={"extractor": "mean", "v": "1"}, **options)
    assert sum(calls) == 10 and torch.equal(first, again) and info == info2  # cache hit
    assert [p.name for p in tmp_path.iterdir()] == [f"{info['key']}.pt"]  # no partial files
    expected = torch.stack([data.data_val[i]["image"].mean(dim=(1, 2)) for i in range(10)])
    torch.testing.assert_close(first, expected)  # item order
    _, other = reference_features(data, extractor={"extractor": "mean", "v": "2"}, **options)
    assert other["key"] != info["key"]  # a new extractor version: new statistics
    data2 = ShapesDataModule(resolution=16, val_size=10, jitter=0.2)
    data2.setup()
    _, moved = reference_features(data2, extractor={"extractor": "mean", "v": "1"}, **options)
    assert moved["key"] != info["key"]  # another dataset config: new statistics


# ---------------------------------------------------------------------------------------------
# through eval.py
def eval_run(ckpt: Path, tmp_path: Path, name: str, *overrides: str):
    run_dir = tmp_path / name
    result = run_entry(
        "eval.py",
        f"ckpt_path={ckpt}",
        *ORACLE_OVERRIDES,
        "eval.num_samples=12",
        "callbacks.generative_metrics.batch_size=5",
        "trainer.precision=32",
        f"hydra.run.dir={run_dir}",
        *overrides,
        tmp_path=tmp_path,
    )
    return result, run_dir


def test_eval_reports_every_metric_with_its_protocol(
    trained_run: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached Inception weights
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    result, run_dir = eval_run(ckpt, tmp_path, "eval", "eval.real_split=test")
    check_ok(result)
    assert "Inception-v3 weights not found" in result.stdout + result.stderr  # said, not silent
    report = json.loads((run_dir / "metrics.json").read_text())
    metrics = report["metrics"]
    for name in ("fid", "kid", "kid_std", "is", "precision", "recall", "caption_exact"):
        assert f"test/{name}" in metrics, sorted(metrics)
    assert "test/loss" in metrics  # the model's own test metrics too
    generated, real = report["results"]
    protocol = generated["protocol"]
    assert protocol["num_samples"] == 12 and protocol["extractor"] == "shapes_oracle"
    assert protocol["extractor_version"] == protocol["oracle_version"]
    assert protocol["sampler"].startswith("ddim-2") and protocol["steps"] == 2
    assert protocol["guidance_scale"] == 3.0 and protocol["seed"] == 0
    assert protocol["kid_subset_size"] == 6  # the size in effect: half the sample count
    assert protocol["weights"] in ("EMA", "raw")
    assert real["name"] == "real_test" and real["protocol"]["num_samples"] == 12
    # prompt i is val item i's caption, so the generated set is paired with the val reference;
    # independent test images are not
    assert protocol["paired"] is True and real["protocol"]["paired"] is False
    assert 0 <= generated["metrics"]["caption_exact"] <= 1
    # a fresh run with the same protocol reproduces every number (the reference is cached)
    result2, run_dir2 = eval_run(ckpt, tmp_path, "eval2", "eval.real_split=test")
    check_ok(result2)
    again = json.loads((run_dir2 / "metrics.json").read_text())["results"]
    assert again[0]["metrics"] == generated["metrics"] and again[1]["metrics"] == real["metrics"]


def test_guidance_sweep_and_leaderboard(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    result, run_dir = eval_run(
        ckpt, tmp_path, "sweep", "eval.guidance_scales=[1,3]", *CLIP_OVERRIDES
    )
    check_ok(result)
    report = json.loads((run_dir / "metrics.json").read_text())
    assert [r["protocol"]["guidance_scale"] for r in report["results"]] == [1, 3]
    assert {"test/w1/fid", "test/w3/fid", "test/w1/clip_score"} <= set(report["metrics"])
    clip = report["results"][0]["metrics"]
    assert clip["clip_score_w2.5"] == pytest.approx(clip["clip_score"] / 40)  # 2.5 vs 100 x cos
    assert report["results"][0]["protocol"]["clip_version"]
    table = (run_dir / "sweep.md").read_text()
    assert "| guidance_scale |" in table and table.count("\n| ") == 3  # header + 2 rows
    assert "clip_score" in table
    assert (run_dir / "sweep.csv").read_text().count("\n") == 3
    assert (run_dir / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # leaderboard: the sweep's report and a checkpoint evaluated now, under one protocol
    compare = f"+compare=[{run_dir},{ckpt}]"
    result, board_dir = eval_run(ckpt, tmp_path, "board", compare, "eval.guidance_scale=3")
    check_ok(result)
    rows = (board_dir / "leaderboard.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3  # header, two sweep rows, one new evaluation
    assert rows[0].startswith("run,method,result,FID ↓")
    protocols = {row.rsplit(",", 1)[1] for row in rows[1:]}
    assert protocols == {"P1"}  # same extractor, version, sample count and reference


def test_images_outside_the_data_range_are_rejected() -> None:
    from genlab.callbacks.generative_metrics import GenerativeMetrics

    callback = GenerativeMetrics(num_samples=4, batch_size=2, metrics=["fid"])

    class Trainer:  # just what measure() reads
        global_rank, world_size = 0, 1

        class strategy:  # noqa: N801
            root_device = torch.device("cpu")

    class Extractor:
        def features(self, images):
            return images.flatten(1)

    tools = {"extractor": Extractor()}
    reference = torch.randn(8, 3 * 4 * 4)
    with pytest.raises(ValueError, match=r"generated images must be in \[-1, 1\]"):
        callback.measure(
            Trainer, tools, reference, {}, lambda items: torch.full((len(items), 3, 4, 4), 3.0)
        )
    with pytest.raises(ValueError, match="shaped"):
        callback.measure(Trainer, tools, reference, {}, lambda items: torch.zeros(len(items), 4, 4))
    values = callback.measure(
        Trainer,
        tools,
        reference,
        {},
        lambda items: torch.zeros(len(items), 3, 4, 4).uniform_(-1, 1),
    )
    assert values["num_samples"] == 4 and values["fid"] > 0
    assert values["paired"] is False  # not asked for

    def draw(items):
        return torch.zeros(len(items), 3, 4, 4).uniform_(-1, 1)

    # pairing holds, and is recorded, only with as many reference items as images (here 8 vs 4)
    assert callback.measure(Trainer, tools, reference, {}, draw, paired=True)["paired"] is False
    assert callback.measure(Trainer, tools, reference[:4], {}, draw, paired=True)["paired"] is True


def test_bad_metrics_options_name_the_key() -> None:
    from genlab.callbacks.generative_metrics import GenerativeMetrics

    with pytest.raises(ValueError, match="generative_metrics.metrics"):
        GenerativeMetrics(metrics=["fid", "fidd"])
    with pytest.raises(ValueError, match="generative_metrics.features"):
        GenerativeMetrics(features="vgg")
    with pytest.raises(ValueError, match="generative_metrics.num_samples"):
        GenerativeMetrics(num_samples=1)


def test_label_model_metrics_every_epoch_with_inception(inception_weights: Path, tmp_path: Path):
    """`callbacks=metrics` during fit on a 1-channel label-conditional model, with Inception
    features (grayscale repeated to RGB): labels i mod 10, val and test results with protocols."""
    run_dir = tmp_path / "run"
    shapes_only = ("model.text_encoder", "data.train_size", "data.val_size", "data.test_size")
    overrides = [o for o in TINY if not o.startswith(shapes_only)]
    result = run_entry(
        "train.py",
        *overrides,
        "model=ddpm_label",
        "data=digits",
        "callbacks=metrics",
        "trainer.max_steps=2",
        f"callbacks.generative_metrics.inception_weights={inception_weights}",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
        timeout=400,
    )
    check_ok(result)
    assert "Inception-v3 weights not found" not in result.stdout + result.stderr
    files = sorted(p.name for p in (run_dir / "metrics").iterdir())
    assert files[0].startswith("test_step") and files[-1].startswith("val_step")
    (val,) = json.loads((run_dir / "metrics" / files[-1]).read_text())
    assert val["protocol"]["extractor"] == "inception-v3-compat"
    assert val["protocol"]["extractor_version"] == file_version(inception_weights)
    assert set(val["metrics"]) == {"fid", "kid", "kid_std", "is", "is_std", "precision", "recall"}
    header = (run_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "val/fid" in header and "test/fid" in header


def test_nothing_is_drawn_when_no_metric_can_read_the_images() -> None:
    """Without an extractor, oracle or CLIP (e.g. COCO without Inception weights) the metrics
    generate nothing: minutes of sampling for no number (issue 24, item 7)."""
    from genlab.evaluation.measure import measure

    drawn, notes = [], []

    def source(items: range) -> torch.Tensor:
        drawn.append(items)
        return torch.zeros(len(items), 3, 8, 8)

    values = measure(
        source,
        8,
        wanted={"fid", "kid", "pr", "is", "caption", "clip"},
        settings={"kid_subsets": 10, "kid_subset_size": 4, "pr_k": 3, "is_splits": 2},
        tools={},
        reference=None,
        conditions={"prompts": ["a red circle"] * 8},
        batch_size=4,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        note=lambda key, message: notes.append(message),
        what="generated images (w = 3)",
    )
    assert values == {"num_samples": 0, "paired": False}
    assert drawn == []
    assert notes == ["no metric can read the generated images (w = 3): none drawn"]
