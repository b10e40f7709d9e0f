"""Every config in conf/ composes, passes the validator against the real signatures, and every
model config instantiates; the experiment equals the default job; sweeps name real keys."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import CONF, ROOT
from genlab.data.tokenizer import TOKENIZER_KEY, BPETokenizer
from genlab.diffusion.samplers import Sampler
from genlab.utils.checkpoint import MODEL_CONFIG_KEY
from genlab.utils.instantiate import instantiate
from genlab.utils.validation import validate_config

sys.path.insert(0, str(ROOT / "src"))
import eval as eval_entry  # noqa: E402  (src/eval.py, not the builtin)
import sample as sample_entry  # noqa: E402
import train as train_entry  # noqa: E402

GROUPS = ["data", "model", "trainer", "callbacks", "logger", "experiment", "debug", "paths"]
GROUPS += ["extras", "hydra", "hparams_search"]
# values that a config leaves mandatory (???) and a user must give
MANDATORY = {
    ("data", "image_folder"): ["data.root=images"],
    ("data", "webdataset"): ["data.urls=shards/train-000000.tar"],
    ("model", "ldm"): ["model.space.first_stage_ckpt=vae.ckpt"],
    ("experiment", "ldm_shapes"): ["model.space.first_stage_ckpt=vae.ckpt"],
    ("experiment", "ldm_coco"): ["model.space.first_stage_ckpt=vae.ckpt"],
    ("model", "dalle"): ["model.tokenizer_ckpt=dvae.ckpt"],
    ("experiment", "dalle_shapes"): ["model.tokenizer_ckpt=dvae.ckpt"],
    ("experiment", "dalle_coco"): ["model.tokenizer_ckpt=dvae.ckpt"],
    ("model", "vq_prior"): ["model.tokenizer_ckpt=vqgan.ckpt"],
    ("experiment", "vq_prior_shapes"): ["model.tokenizer_ckpt=vqgan.ckpt"],
    ("experiment", "vq_prior_shapes_label"): ["model.tokenizer_ckpt=vqgan.ckpt"],
    ("experiment", "vq_prior_cifar10"): ["model.tokenizer_ckpt=vqgan.ckpt"],
    ("experiment", "vq_prior_mnist"): ["model.tokenizer_ckpt=vqgan.ckpt"],
    ("experiment", "vq_prior_coco"): ["model.tokenizer_ckpt=vqgan.ckpt"],
    ("model", "imagen_sr"): ["model.conditioners.low_res.low_res_size=16"],
    ("model", "imagen_cascade"): ["model.stages=[base.ckpt,sr.ckpt]"],
    ("model", "unclip"): ["model.prior_ckpt=prior.ckpt", "model.decoder_ckpt=decoder.ckpt"],
}
# models built on a frozen checkpoint: the key that names it and the model that makes it
FROZEN_PART = {
    "ldm": ("space.first_stage_ckpt", "vae"),
    "dalle": ("tokenizer_ckpt", "dvae"),
    "vq_prior": ("tokenizer_ckpt", "vqgan"),
    "unclip_prior": ("clip_ckpt", "clip"),
    "unclip_decoder": ("conditioners.image_embed.clip_ckpt", "clip"),
}


def options(group: str) -> list[str]:
    """The option names of a config group: its YAML files."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(config: str, overrides: list[str], tmp_path: Path, hydra_cfg: bool = False):
    """Compose ``conf/<config>`` with a run folder in ``tmp_path`` (as a Hydra job would have)."""
    GlobalHydra.instance().clear()
    paths = [f"paths.output_dir={tmp_path}", f"paths.work_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config, overrides=overrides + paths, return_hydra_config=hydra_cfg)


GROUP_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no config"
    assert {"default", "cpu", "gpu", "ddp", "ddp_cpu"} <= set(options("trainer"))
    assert {"csv", "tensorboard", "wandb", "many_loggers"} <= set(options("logger"))
    assert {"default", "fdr", "limit", "overfit", "profiler"} <= set(options("debug"))
    assert {"default", "none", "sample_grid", "model_checkpoint", "early_stopping"} <= set(
        options("callbacks")
    )


@pytest.mark.parametrize(
    ("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS]
)
def test_train_config_composes_and_validates(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}", *MANDATORY.get((group, option), [])]
    cfg = compose_cfg("train.yaml", overrides, tmp_path)
    validate_config(cfg, train_entry.TOP_LEVEL)
    assert cfg.model._target_ and cfg.data._target_


def test_train_defaults_and_top_level_keys(tmp_path: Path) -> None:
    cfg = compose_cfg("train.yaml", [], tmp_path, hydra_cfg=True)
    choices = cfg.hydra.runtime.choices
    assert (choices.data, choices.model, choices.trainer) == ("shapes", "ddpm", "default")
    assert (choices.callbacks, choices.logger) == ("default", "csv")
    top = {"task_name", "tags", "train", "test", "ckpt_path", "seed", "optimized_metric"}
    assert top <= set(cfg)
    assert cfg.optimized_metric == "val/loss"
    assert cfg.trainer.max_steps > 0 and cfg.trainer.max_epochs == -1
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 1.0
    assert Path(cfg.paths.root_dir).resolve() == ROOT
    assert "runs" in cfg.hydra.run.dir and "multiruns" in cfg.hydra.sweep.dir
    assert cfg.hydra.job.chdir is False


def test_experiment_ddpm_shapes_is_the_default_job(tmp_path: Path) -> None:
    default = OmegaConf.to_container(compose_cfg("train.yaml", [], tmp_path), resolve=True)
    experiment = compose_cfg("train.yaml", ["experiment=ddpm_shapes"], tmp_path)
    experiment = OmegaConf.to_container(experiment, resolve=True)
    assert experiment.pop("tags") != default.pop("tags")
    assert experiment == default


@pytest.mark.parametrize("search", options("hparams_search"))
def test_hparams_search_params_are_config_keys(search: str, tmp_path: Path) -> None:
    cfg = compose_cfg("train.yaml", [f"hparams_search={search}"], tmp_path, hydra_cfg=True)
    params = cfg.hydra.sweeper.params
    assert params, f"hparams_search/{search} searches nothing"
    missing = "<missing>"
    for key in params:
        assert OmegaConf.select(cfg, key, default=missing) != missing, f"{key} is not in the config"
    # prompt fidelity from the metrics callback after every validation, maximized
    assert cfg.hydra.sweeper.direction == "maximize"
    assert cfg.optimized_metric == "val/caption_exact"
    assert cfg.callbacks.generative_metrics.every_n_epochs == 1


NOT_GENERATIVE = {
    "noisy_classifier",
    "shapes_oracle",
    "clip",
    "unclip_prior",
}  # evaluators, guides, priors
FIRST_STAGES = {"vqgan", "vqvae", "dvae", "ae", "dae"}  # reconstruct; the VAEs also generate


# built from trained stages' checkpoints: tests/test_imagen.py, tests/test_unclip.py
ASSEMBLED = {"imagen_cascade", "unclip"}


@pytest.mark.parametrize("model", sorted(set(options("model")) - ASSEMBLED))
def test_every_model_config_instantiates(model: str, tmp_path: Path) -> None:
    overrides = [f"model={model}", *MANDATORY.get(("model", model), [])]
    if model in FROZEN_PART:  # an untrained first stage of the default data's size
        key, maker = FROZEN_PART[model]
        overrides.append(f"model.{key}={untrained_checkpoint(maker, tmp_path)}")
    cfg = compose_cfg("train.yaml", overrides, tmp_path)
    module = instantiate(OmegaConf.to_container(cfg.model, resolve=True))
    assert sum(p.numel() for p in module.parameters()) > 0
    assert hasattr(module, "generate") or model in NOT_GENERATIVE | FIRST_STAGES
    if model in FIRST_STAGES:
        assert callable(module.reconstruct)


def untrained_checkpoint(model: str, tmp_path: Path) -> Path:
    """A self-describing checkpoint of ``model=<model>``'s untrained weights."""
    config = OmegaConf.to_container(
        compose_cfg("train.yaml", [f"model={model}"], tmp_path).model, resolve=True
    )
    path = tmp_path / f"{model}.ckpt"
    ckpt = {MODEL_CONFIG_KEY: config, "state_dict": instantiate(config).state_dict()}
    if model == "clip":  # a CLIP is used with the tokenizer it was trained with
        tokenizer = BPETokenizer.train(["a red circle", "a blue square at the top"], vocab_size=64)
        ckpt[TOKENIZER_KEY] = tokenizer.to_json()
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("sampler", options("sampler"))
def test_every_sampler_config_reaches_the_model(sampler: str, tmp_path: Path) -> None:
    cfg = compose_cfg("train.yaml", [f"sampler={sampler}"], tmp_path)
    spec = instantiate(OmegaConf.to_container(cfg.model.sampler, resolve=True))
    assert isinstance(spec, Sampler) and spec.name == sampler


@pytest.mark.parametrize("net", options("model/net"))
def test_every_network_preset_instantiates(net: str, tmp_path: Path) -> None:
    # Transformers are DALL-E's (and the VQ prior's), the PixelCNN the VQ prior's
    model = {"gpt": "dalle", "pix": "vq_prior"}.get(net[:3], "ddpm")
    overrides = [f"model={model}", f"model/net={net}", *MANDATORY.get(("model", model), [])]
    cfg = compose_cfg("train.yaml", overrides, tmp_path)
    validate_config(cfg, train_entry.TOP_LEVEL)
    network = instantiate(OmegaConf.to_container(cfg.model.net, resolve=True))
    if model == "dalle":  # a partial: the model fills in the vocabulary and the token grid
        network = network(vocab_size=64, text_length=8, grid=4)
    if model == "vq_prior":  # a partial: the codebook, classes and grid come from the model
        network = network(num_codes=32, num_classes=1, grid=4)
    assert sum(p.numel() for p in network.parameters()) > 0


@pytest.mark.parametrize("data", [*options("data"), None])
def test_eval_config_composes_and_validates(data: str | None, tmp_path: Path) -> None:
    overrides = ["ckpt_path=model.ckpt"] + ([f"data={data}"] if data else [])
    overrides += MANDATORY.get(("data", data), [])
    cfg = compose_cfg("eval.yaml", overrides, tmp_path)
    validate_config(cfg, eval_entry.TOP_LEVEL)
    assert ("data" in cfg) == (data is not None)
    assert cfg.metrics_file == str(tmp_path / "metrics.json")


def test_sample_config_composes_and_validates(tmp_path: Path) -> None:
    cfg = compose_cfg("sample.yaml", ["ckpt_path=model.ckpt", "prompt=a red circle"], tmp_path)
    validate_config(cfg, sample_entry.TOP_LEVEL)
    assert cfg.prompt == "a red circle" and cfg.out == str(tmp_path / "samples.png")


@pytest.mark.parametrize("config", ["eval.yaml", "sample.yaml"])
def test_ckpt_path_is_mandatory(config: str, tmp_path: Path) -> None:
    cfg = compose_cfg(config, [], tmp_path)
    with pytest.raises(ValueError, match="ckpt_path is mandatory"):
        validate_config(cfg)
        eval_entry.check_task(cfg)  # eval.py: unless +compare=[...] is given
