"""Complete an LDM's config with its first stage, at the entry point (``src/train.py``), before
the model is built: ``python src/train.py model=ldm data=coco`` works as typed.

:func:`resolve_first_stage` acts on a config whose ``model.space`` is a ``LatentSpace``:

* ``model.space.first_stage_ckpt`` given (a genlab checkpoint or export folder, or a diffusers
  ``AutoencoderKL`` / ``VQModel`` folder): used as is.
* null: the first stage *made for this data and resolution* by ``model.space.first_stage_recipe``
  (``src/train.py`` overrides; null: ``[experiment=vae_<data>]``, e.g. ``experiment=vae_coco``
  for ``data=coco``), kept at ``<first_stage_dir>/<recipe>_<data>_<resolution>px_<key>.ckpt``
  where the key is a hash of the recipe's composed model, data and step budget. When that file
  is missing it is built once, by running the recipe (``python src/train.py <recipe>
  paths.data_dir=<this run's>``) in a subprocess, with its log in ``<file stem>_build/build.log``
  and a progress line every 30 s (``genlab.metrics.evaluators.build``, as for the evaluators); a lock file makes a second process wait for
  the first one's build instead of building again (whichever rank of a distributed job gets the
  lock builds, as one process), and the checkpoint (weights, no training state) is installed by
  an atomic rename, so a reader sees no file or the whole file.

Then the resolutions are made consistent: a genlab first stage was trained at one resolution, and
``data.resolution`` follows it (logged) unless it was set on the command line, in which case a
disagreement is an error that says both ways out. A diffusers first stage is convolutional: any
``data.resolution`` divisible by its downsampling factor is taken.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from genlab.utils.io import description_key
from genlab.utils.validation import ConfigError

log = logging.getLogger(__name__)

KEY = "model.space"


def is_latent_space(cfg: DictConfig) -> bool:
    space = cfg.get("model", {}).get("space") if "model" in cfg else None
    return bool(space) and str(space.get("_target_", "")).endswith(".LatentSpace")


def resolve_first_stage(cfg: DictConfig) -> None:
    """Fill ``cfg.model.space.first_stage_ckpt`` (finding or building the first stage) and make
    ``data.resolution`` agree with it; in place, before the model and data are instantiated. A
    config without a latent space is left alone."""
    if not is_latent_space(cfg):
        return
    space = cfg.model.space
    given = None if OmegaConf.is_missing(space, "first_stage_ckpt") else space.first_stage_ckpt
    fmt = space.get("first_stage_format") or "auto"
    if not given:
        recipe = list(space.get("first_stage_recipe") or default_recipe())
        folder = space.get("first_stage_dir") or f"{cfg.paths.data_dir}/first_stages"
        path = ensure_first_stage(recipe, Path(folder), data_dir=str(cfg.paths.data_dir))
        space.first_stage_ckpt = str(path)
        given, fmt = str(path), "genlab"
    match_resolution(cfg, str(given), fmt)


def default_recipe() -> list[str]:
    """``[experiment=vae_<data>]`` for the config's data choice, when that recipe exists."""
    from hydra.core.hydra_config import HydraConfig

    data = HydraConfig.get().runtime.choices.get("data") if HydraConfig.initialized() else None
    conf = Path(__file__).resolve().parents[3] / "conf" / "experiment"
    if data and (conf / f"vae_{data}.yaml").is_file():
        return [f"experiment=vae_{data}"]
    raise ConfigError(
        f"{KEY}.first_stage_ckpt is null and there is no first-stage recipe for data={data}: "
        f"give {KEY}.first_stage_ckpt=<a vae or vqgan checkpoint, or a diffusers AutoencoderKL "
        f"folder> or {KEY}.first_stage_recipe=[experiment=...] (the train.py overrides that "
        "make one)"
    )


# ----------------------------------------------------------------------------------------------
# where the first stage of a recipe lives
def recipe_description(recipe: list[str], data_dir: str) -> dict[str, Any]:
    """The recipe's composed first-stage config: its model, data and step budget (resolved)."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"paths.data_dir={data_dir}", *recipe]
    if not GlobalHydra.instance().is_initialized():
        raise ConfigError(f"{KEY}.first_stage_recipe is resolved by the entry points only")
    try:
        composed = compose("train.yaml", overrides=overrides)
    except Exception as err:  # an unknown experiment or key: say which recipe
        raise ConfigError(f"{KEY}.first_stage_recipe={recipe} does not compose: {err}") from err
    node = {}
    for name in ("model", "data"):
        try:
            node[name] = OmegaConf.to_container(composed[name], resolve=True)
        except Exception:  # an interpolation only a run can resolve: keep it unresolved
            node[name] = OmegaConf.to_container(composed[name], resolve=False)
    node["max_steps"] = composed.trainer.get("max_steps")
    node["recipe"] = overrides
    return node


def first_stage_file(recipe: list[str], folder: Path, description: dict[str, Any]) -> Path:
    """``<folder>/<recipe>_<data>_<resolution>px_<key>.ckpt``."""
    named = dict(o.lstrip("+~").split("=", 1) for o in recipe if "=" in o)
    label = named.get("experiment") or named.get("model") or "first_stage"
    data = description["data"]
    module = str(data.get("_target_", "data")).split(".")
    dataset = module[-2] if len(module) > 1 else module[0]
    res = data.get("resolution") or description["model"].get("image_size") or "any"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{label}_{dataset}_{res}px")
    return folder / f"{safe}_{description_key(description)[:10]}.ckpt"


def ensure_first_stage(
    recipe: list[str], folder: Path, *, data_dir: str, wait_seconds: float = 7 * 24 * 3600
) -> Path:
    """The first stage of ``recipe`` for ``data_dir``: found in ``folder``, or built once (locked,
    installed atomically)."""
    from genlab.metrics.evaluators import build, take_lock, wait_for

    description = recipe_description(recipe, data_dir)
    path = first_stage_file(recipe, folder, description)
    shown = "python src/train.py " + " ".join(recipe)
    if path.is_file():
        log.info(f"{KEY}.first_stage_ckpt=null: using {path}, the first stage of `{shown}`")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    if not take_lock(lock):
        log.warning(f"{KEY}.first_stage_ckpt=null: another process is building {path}; waiting")
        return wait_for(path, lock, name="first stage", seconds=wait_seconds)
    try:
        if not path.is_file():  # built by another process between the check and the lock
            build(path, description["recipe"], name="first stage")
    finally:
        lock.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------------------------
# resolutions
def command_line_keys() -> set[str]:
    """The keys this run's command line set (``data.resolution=64`` → ``data.resolution``)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    overrides = HydraConfig.get().overrides.task
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


def first_stage_resolution(path: str, fmt: str) -> tuple[int | None, int]:
    """(the resolution a first stage was trained at, or None for a diffusers one; its f)."""
    from genlab.nn.diffusers_vae import config_of, diffusers_folder
    from genlab.utils.export import is_export

    if fmt == "diffusers" or (
        fmt == "auto" and diffusers_folder(path) is not None and not is_export(path)
    ):
        config = config_of(path)
        return None, 2 ** (len(config["block_out_channels"]) - 1)
    config = stored_model_config(path)
    f = 2 ** (len(config.get("decoder", {}).get("channels", [0])) - 1)
    return config.get("image_size"), f


def stored_model_config(path: str) -> dict[str, Any]:
    """The model config stored in a genlab checkpoint or export folder (read without the
    weights where possible)."""
    import torch

    from genlab.utils.checkpoint import MODEL_CONFIG_KEY
    from genlab.utils.export import META_FILE, is_export

    if is_export(path):
        return json.loads((Path(path) / META_FILE).read_text())["entries"][MODEL_CONFIG_KEY]
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{KEY}.first_stage_ckpt={path!r}: no such file. Train one first (python src/train.py "
            f"experiment=vae_shapes_64), give a diffusers AutoencoderKL folder, or leave it null "
            "to find or build one by model.space.first_stage_recipe"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # an old-format file cannot be memory-mapped
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt.get(MODEL_CONFIG_KEY) or {}


def match_resolution(cfg: DictConfig, path: str, fmt: str) -> None:
    """Make ``data.resolution`` agree with the first stage's (module docstring)."""
    if "resolution" not in cfg.data:
        return
    trained, f = first_stage_resolution(path, fmt)
    data_res = int(cfg.data.resolution)
    explicit = command_line_keys() & {"data.resolution", "model.image_size"}
    if trained is None:  # diffusers: convolutional
        if data_res % f:
            raise ConfigError(
                f"data.resolution={data_res} is not a multiple of the first stage's "
                f"downsampling factor f={f} ({path}): use e.g. {max(f, data_res // f * f)}"
            )
        return
    if data_res == trained:
        return
    if explicit:
        raise ConfigError(
            f"data.resolution={data_res} but the first stage {path} was trained at {trained} px. "
            f"Drop data.resolution (the data then follows the first stage), or use a first stage "
            f"made at {data_res} px: {KEY}.first_stage_ckpt=null with "
            f"{KEY}.first_stage_recipe=[<its recipe>,data.resolution={data_res}]"
        )
    log.warning(
        f"data.resolution: {data_res} -> {trained} px, the resolution of the first stage {path} "
        f"(latents of {trained // f}x{trained // f}); set data.resolution and "
        f"{KEY}.first_stage_recipe=[...,data.resolution=...] together for another one"
    )
    cfg.data.resolution = trained
