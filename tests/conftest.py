"""Shared helpers for the framework tests: run the entry points as real subprocesses on a tiny
version of the default job, and train one checkpoint per session for the tests that need one."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Set before anything composes a config in-process (paths.root_dir reads it).
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

# The evaluators the tests' metrics use: a tiny shapes oracle at 16 px, built once per session by
# its recipe (genlab.metrics.evaluators.ensure_evaluator, as the default job builds the real one),
# and the reference-statistics cache, in a temporary folder instead of data/.
EVALUATORS = Path(tempfile.mkdtemp(prefix="genlab-test-evaluators-"))
atexit.register(shutil.rmtree, EVALUATORS, ignore_errors=True)
ORACLE_CKPT = EVALUATORS / "shapes_oracle.ckpt"
ORACLE_RECIPE = [
    "experiment=shapes_oracle",
    "trainer.max_steps=40",
    "data.resolution=16",
    "data.train_size=640",
    "data.val_size=16",
    "data.test_size=16",
    "data.batch_size=16",
    "model.net.channels=[8,16]",
    "model.net.feature_dim=32",
    "model.whiten_dim=8",
    "model.whiten_images=256",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
]
ORACLE_OVERRIDES = [
    f"callbacks.generative_metrics.oracle_checkpoint={ORACLE_CKPT}",
    "callbacks.generative_metrics.oracle_recipe=["
    + ",".join(f'"{o}"' for o in ORACLE_RECIPE)
    + "]",
    f"callbacks.generative_metrics.cache_dir={EVALUATORS / 'reference'}",
]

# ----------------------------------------------------------------------------------------------
# The tiny settings, in one place. The entry-point tests compose their Hydra overrides from these
# blocks and add only what is specific to their model; a test that needs another value of a key
# overrides it after the block (on Hydra's command line, the last value of a key wins).

TINY_DATA = [  # 16 px shapes, batch 8, small splits (8 train batches)
    "data.resolution=16",
    "data.batch_size=8",
    "data.train_size=64",
    "data.val_size=16",
    "data.test_size=16",
]
TINY_TRAINER = [  # a few steps, every one logged, no rich progress bar or model summary
    "trainer.max_steps=4",
    "trainer.log_every_n_steps=1",
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
]
TINY_EVAL = [  # a native 4-image sample grid; metrics of 8 images in batches of 4, tiny oracle
    "callbacks.sample_grid.num_samples=4",
    "callbacks.sample_grid.cell=null",
    "callbacks.generative_metrics.num_samples=8",
    "callbacks.generative_metrics.batch_size=4",
    *ORACLE_OVERRIDES,
]
TINY_RUN = [*TINY_TRAINER, *TINY_EVAL]
TINY_UNET = [  # model.net of the diffusion models (conf/model/net/unet_tiny.yaml), shrunk
    "model.net.channels=[16,32]",
    "model.net.attention_levels=[1]",
    "model.net.heads=2",
    "model.net.groups=8",
]
TINY_BPE = [  # model.text_encoder=bpe_transformer (and CLIP's text tower), shrunk
    "model.text_encoder.width=32",
    "model.text_encoder.layers=1",
    "model.text_encoder.heads=2",
    "model.text_encoder.vocab_size=128",
]

# the models' own networks, shrunk (each used by more than one test file)
TINY_GAN = [  # a few thousand parameters at 16 px
    "model.generator.z_dim=16",
    "model.generator.channels=[16,8]",
    "model.discriminator.channels=[8,16]",
    *TINY_BPE,
]
TINY_GLOW = ["model.flow.levels=2", "model.flow.steps=2", "model.flow.hidden=16"]
TINY_DALLE = [
    "model.net.width=32",
    "model.net.layers=2",
    "model.net.heads=2",
    "model.text_length=32",
    "model.tokenizer_vocab_size=128",
]
TINY_PRIOR = ["model.net.width=32", "model.net.layers=1", "model.net.heads=2"]  # unCLIP's prior
TINY_ENCODER = [  # a first stage's encoder at f = 4 (three levels)
    "model.encoder.channels=[8,16,16]",
    "model.encoder.groups=8",
    "model.encoder.mid_attention=false",
]
TINY_VQ = [  # 4 latent channels, 32 codes, no k-means initialization
    "model.encoder.latent_channels=4",
    "model.quantizer.code_dim=4",
    "model.quantizer.num_codes=32",
    "model.quantizer.kmeans_init=false",
]
CLIP_TINY = [  # a 16 px CLIP of a few thousand parameters
    "model.image_encoder.channels=[16,32]",
    "model.image_encoder.heads=2",
    *TINY_BPE,
    "model.embed_dim=32",
]
CLIP_RECIPE = [  # the tests' tiny CLIP: 20 steps of 16 images
    "experiment=clip_shapes",
    *TINY_DATA,
    "data.batch_size=16",
    "data.train_size=320",
    *TINY_TRAINER,
    "trainer.max_steps=20",
    *CLIP_TINY,
]
CLIP_OVERRIDES = [  # CLIP scores with a tiny CLIP, built on first use like the oracle
    f"callbacks.generative_metrics.clip_checkpoint={EVALUATORS / 'clip_shapes.ckpt'}",
    "callbacks.generative_metrics.clip_recipe=[" + ",".join(f'"{o}"' for o in CLIP_RECIPE) + "]",
]

# The default job, shrunk to seconds: 16 px shapes, a 0.1M-parameter UNet and text encoder,
# 4 optimizer steps (half an epoch: the final validation runs mid-epoch), a 4-image grid drawn
# with 2 DDIM steps, generative metrics of 8 images at the final test (the tiny oracle above).
# Everything else (callbacks, CSV logger, bf16 autocast) stays as in the job.
TINY = [*TINY_DATA, *TINY_RUN, *TINY_UNET, *TINY_BPE, "sampler.steps=2"]


def entry_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of an entry-point run in a test: one torch thread unless set, W&B
    offline into ``tmp_path``, no HYDRA_FULL_ERROR; ``extra`` variables on top."""
    env = {
        "OMP_NUM_THREADS": "1",
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_SILENT": "true",
        **extra,
    }
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_entry(
    script: str, *overrides: str, tmp_path: Path, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Run ``python src/<script> <overrides>`` from ``tmp_path`` with W&B offline.

    The working directory is not the repository, so this also checks that the entry points find
    their configs and the project root from anywhere. The wall time is stored on the result.
    Torch gets one thread unless OMP_NUM_THREADS is set: these tiny models gain nothing from two,
    and two threads on a core that another process is using ran 5x slower here (28 s vs 5.7 s
    for a 4-step job).
    """
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "src" / script), *overrides],
        cwd=tmp_path,
        env=entry_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    result.seconds = time.monotonic() - start
    return result


def quiet_trainer(tmp_path: Path, **overrides):
    """A CPU Lightning Trainer without logger, progress bar, summary or checkpoints."""
    import lightning as L

    args = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    return L.Trainer(**{**args, **overrides})


def check_ok(result: subprocess.CompletedProcess) -> None:
    """Fail with the end of the subprocess's output when it did not exit with 0."""
    tail = (result.stdout[-3000:] + "\n----- stderr -----\n" + result.stderr[-6000:]).strip()
    assert result.returncode == 0, f"exit code {result.returncode}:\n{tail}"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of one tiny default job with every logger (CSV, TensorBoard, W&B offline)."""
    tmp = tmp_path_factory.mktemp("trained")
    run_dir = tmp / "run"
    result = run_entry(
        "train.py", *TINY, "logger=many_loggers", f"hydra.run.dir={run_dir}", tmp_path=tmp
    )
    check_ok(result)
    return run_dir


@pytest.fixture(scope="session")
def oracle_checkpoint() -> Path:
    """The tests' tiny shapes oracle, built by its recipe on first use."""
    from genlab.metrics.evaluators import ensure_evaluator

    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return ensure_evaluator(ORACLE_CKPT, ORACLE_RECIPE, name="shapes_oracle")
    finally:
        if env is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env


# Tiny first stages (f = 4) that LDM and DALL-E tests train for a few steps and build on.
FIRST_STAGE = {
    "vae": ["model.discriminator=null", "model.perceptual=null", "model.disc_weight=0"],
    "vqgan": [
        "model.discriminator=null",
        "model.perceptual=null",
        "model.disc_weight=0",
        *TINY_VQ,
    ],
    "dvae": ["model.quantizer.num_codes=32", "model.quantizer.code_dim=4"],
}


def compose_model(overrides: list[str]) -> dict:
    """The resolved ``model`` node of ``train.yaml`` composed with ``overrides``, as a dict."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides)
    return OmegaConf.to_container(cfg.model, resolve=True)


def shapes_data(size: int = 16, **overrides):
    """A small shapes DataModule (32 train, 16 val, 16 test items)."""
    from genlab.data.shapes import ShapesDataModule

    args = dict(resolution=size, batch_size=8, train_size=32, val_size=16, test_size=16)
    return ShapesDataModule(**{**args, **overrides})


def make_first_stage(kind: str, path: Path, steps: int = 2, size: int = 16) -> Path:
    """A tiny first stage (f = 4, 4 latent channels), trained a few steps, saved to ``path``."""
    from genlab.utils.checkpoint import ModelConfigInCheckpoint
    from genlab.utils.instantiate import instantiate

    config = compose_model(
        [
            f"model={kind}",
            f"data.resolution={size}",
            *TINY_ENCODER,
            *FIRST_STAGE[kind],
        ]
    )
    module = instantiate(config)
    trainer = quiet_trainer(
        path.parent,
        max_steps=steps,
        limit_val_batches=0,
        callbacks=[ModelConfigInCheckpoint(config)],
    )
    trainer.fit(module, datamodule=shapes_data(size))
    trainer.save_checkpoint(path)
    return path
