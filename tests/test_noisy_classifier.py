"""The noisy classifier for classifier guidance: network shapes, the guidance gradient against
finite differences, a short fit on digits that classifies low-noise images, batching-independent
evaluation, the schedule check, a checkpoint round trip and a run through ``src/train.py``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import genlab
from conftest import CONF, TINY, check_ok, quiet_trainer, run_entry
from genlab.data.digits import DigitsDataModule
from genlab.data.shapes import ShapesDataModule
from genlab.diffusion.schedules import Schedule
from genlab.models.diffusion.noisy_classifier import NoisyClassifier
from genlab.nn.classifier import NoisyClassifierNet
from genlab.utils.checkpoint import ModelConfigInCheckpoint
from genlab.utils.instantiate import instantiate
from genlab.utils.validation import ConfigError, validate_config

NET = {
    "_target_": "genlab.nn.classifier.NoisyClassifierNet",
    "in_channels": 1,
    "num_classes": 10,
    "channels": [16, 32],
    "heads": 2,
}
MODEL = {
    "_target_": "genlab.models.diffusion.noisy_classifier.NoisyClassifier",
    "net": NET,
    "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 2e-3},
    "num_classes": 10,
    "image_size": 16,
    "channels": 1,
}


def tiny_model(**kw) -> NoisyClassifier:
    return instantiate({**MODEL, **kw})


def trainer(tmp_path, **kw) -> L.Trainer:
    return quiet_trainer(tmp_path, **{"num_sanity_val_steps": 0, **kw})


def val_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 180 validation digits at 16 px and their labels."""
    split = DigitsDataModule(resolution=16).build_splits()["val"]
    batches = list(torch.utils.data.DataLoader(split, batch_size=256))
    return batches[0]["image"], batches[0]["label"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A 0.1M-parameter classifier fitted for 500 steps (batch 32) on 16 px digits (~10 s)."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("noisy_classifier")
    model, data = tiny_model(), DigitsDataModule(resolution=16, batch_size=32)
    trainer_ = trainer(tmp, max_steps=500)
    trainer_.callbacks.append(ModelConfigInCheckpoint(MODEL))
    trainer_.fit(model, data)
    return model, data, trainer_


def test_network_shapes_for_integer_and_fractional_t():
    for pool in ("attention", "mean"):
        net = NoisyClassifierNet(in_channels=3, num_classes=7, channels=[8, 16, 32], pool=pool)
        x = torch.randn(5, 3, 16, 16)
        assert net(x, torch.randint(0, 1000, (5,))).shape == (5, 7)
        assert net(x, torch.rand(5) * 999 - 0.5).shape == (5, 7)
    with pytest.raises(ValueError, match="pool='max'"):
        NoisyClassifierNet(pool="max")


def test_learns_to_classify_noisy_digits(fitted):
    """Chance is 10%; at low noise (t = 50 of 1000, cosine: ᾱ = 0.99) the fitted classifier reads
    ~90% of the 180 validation digits, and much fewer once noise dominates (t = 900)."""
    model, data, trainer_ = fitted
    x0, labels = val_images()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        acc = {
            t: (model.classify(x0, torch.full((len(x0),), t), eps).argmax(1) == labels)
            .float()
            .mean()
            .item()
            for t in (50, 900)
        }
    assert acc[50] > 0.7, acc
    assert acc[900] < acc[50] - 0.2, acc
    metrics = trainer_.validate(model, data, verbose=False)[0]
    assert metrics["val/acc_t0-100"] > 0.6 and metrics["val/acc"] > 0.4, metrics
    bands = {"val/acc_t0-100", "val/acc_t100-250", "val/acc_t250-500", "val/acc_t500-1000"}
    assert bands | {"val/loss", "val/acc"} == set(metrics)


def test_evaluation_does_not_depend_on_batching(fitted):
    model, data, _ = fitted
    batch = next(iter(data.val_dataloader()))
    whole = model.evaluate(batch)
    halves = [model.evaluate({k: v[i : i + 16] for k, v in batch.items()}) for i in (0, 16)]
    for key in ("loss", "correct", "t"):
        torch.testing.assert_close(torch.cat([h[key] for h in halves]), whole[key])


def test_log_prob_grad_equals_finite_differences():
    """In float64, ∇ log p(y | x_t, t) is the central difference of log p along random
    directions, per item (the batch does not mix items), and it works under torch.no_grad()."""
    torch.manual_seed(0)
    model = tiny_model(net={**NET, "channels": [8, 16], "pool": "attention"}).double()
    # sinusoidal_embedding returns float32 features; feed the float64 MLP float64
    model.net.time_embed.mlp.register_forward_pre_hook(lambda m, args: (args[0].double(),))
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    t, labels = torch.tensor([3, 250, 700]), torch.tensor([1, 4, 9])

    def log_p(x_: torch.Tensor) -> torch.Tensor:  # (B,)
        return model(x_, t).log_softmax(1).gather(1, labels[:, None])[:, 0]

    with torch.no_grad():
        grad = model.log_prob_grad(labels)(x, t)
        assert grad.shape == x.shape and grad.dtype == torch.float64
        h = 1e-5
        for _ in range(3):
            v = torch.randn_like(x)
            numeric = (log_p(x + h * v) - log_p(x - h * v)) / (2 * h)  # (B,)
            torch.testing.assert_close((grad * v).sum((1, 2, 3)), numeric, rtol=1e-6, atol=1e-8)
        one = model.log_prob_grad(labels[1:2])(x[1:2], t[1:2])
    torch.testing.assert_close(one, grad[1:2])
    assert not model.training


def test_log_prob_grad_is_zero_above_max_train_t_and_checks_inputs():
    model = tiny_model(max_train_t=100)
    x = torch.randn(2, 1, 16, 16)
    grad = model.log_prob_grad([3, 3])(x, torch.tensor([99, 100]))
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0
    assert set(model.bands) == {"acc_t0-100"}
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        model.log_prob_grad([10])
    with pytest.raises(ValueError, match="1 channels at 16 px"):
        model.log_prob_grad([1, 2])(torch.randn(2, 3, 16, 16), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="max_train_t=2000"):
        tiny_model(max_train_t=2000)
    with pytest.raises(ValueError, match="model.net.num_classes=10 must equal"):
        tiny_model(num_classes=5)


def test_max_train_t_draws_only_low_times():
    g = torch.Generator().manual_seed(0)
    discrete = tiny_model(max_train_t=100).draw_t(1000, g)
    assert discrete.min() == 0 and discrete.max() == 99
    continuous = tiny_model(max_train_t=100, continuous_time=True).draw_t(1000, g)
    assert continuous.min() > -1 and continuous.max() <= 100 and continuous.max() > 99


def test_schedule_check_names_the_difference():
    model = tiny_model()
    model.check_schedule(Schedule("cosine", 1000))
    for other, field in [
        (Schedule("linear", 1000), "name"),
        (Schedule("cosine", 500), "num_timesteps"),
        (Schedule("cosine", 1000, continuous=True), "continuous"),
        (Schedule("cosine", 1000, log_snr_shift=-1.0), "log_snr_shift"),
    ]:
        with pytest.raises(ValueError, match=f"another noise schedule.*{field}: classifier"):
            model.check_schedule(other)


def test_unlabelled_dataset_is_refused(tmp_path):
    data = ShapesDataModule(resolution=16, batch_size=8, train_size=16, val_size=8, test_size=8)
    with pytest.raises(ValueError, match="needs a class-labelled dataset"):
        trainer(tmp_path, max_steps=1).fit(tiny_model(channels=3), data)


def test_checkpoint_round_trip(fitted, tmp_path):
    model, _, trainer_ = fitted
    path = tmp_path / "classifier.ckpt"
    trainer_.save_checkpoint(path)
    loaded = genlab.load(path)
    assert isinstance(loaded, NoisyClassifier) and not loaded.training
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([0, 10, 500, 999])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), model(x, t))
    labels = [0, 1, 2, 3]
    torch.testing.assert_close(
        loaded.log_prob_grad(labels)(x, t), model.log_prob_grad(labels)(x, t)
    )


def test_config_validates_and_names_a_bad_key(tmp_path):
    GlobalHydra.instance().clear()
    paths = [f"paths.output_dir={tmp_path}", f"paths.work_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train.yaml", ["model=noisy_classifier", "data=digits", *paths])
        bad = compose("train.yaml", ["model=noisy_classifier", "model.net.pool=max", *paths])
    validate_config(cfg)
    assert (cfg.model.channels, cfg.model.net.in_channels, cfg.model.image_size) == (1, 1, 32)
    with pytest.raises(ConfigError, match="model.net.pool='max': expected one of"):
        validate_config(bad)


def test_trains_through_the_entry_point(tmp_path: Path) -> None:
    """``python src/train.py model=noisy_classifier data=digits``, shrunk: train, validate,
    checkpoint, test (with the default callbacks: the sample grid skips a model that does not
    generate); the checkpoint rebuilds the classifier."""
    run_dir = tmp_path / "run"
    dropped = ("model.text_encoder", "data.train_size", "data.val_size", "data.test_size")
    dropped += ("callbacks.sample_grid", "model.net.attention_levels")
    overrides = [o for o in TINY if not o.startswith(dropped)]
    result = run_entry(
        "train.py",
        *overrides,
        "model=noisy_classifier",
        "data=digits",
        f"hydra.run.dir={run_dir}",
        tmp_path=tmp_path,
    )
    check_ok(result)
    model = genlab.load(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(model, NoisyClassifier) and model.channels == 1
    grad = model.log_prob_grad([7])(torch.randn(1, 1, 16, 16), torch.tensor([10]))
    assert grad.shape == (1, 1, 16, 16) and torch.isfinite(grad).all()
    header = next((run_dir / "csv").rglob("metrics.csv")).read_text().splitlines()[0]
    for name in ("train/acc", "val/acc", "val/acc_t0-100", "test/loss", "test/acc_t0-100"):
        assert name in header.split(","), header
