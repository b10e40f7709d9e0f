"""Draw images from a checkpoint into one PNG grid (config: ``conf/sample.yaml``).

``python src/sample.py ckpt_path=... prompt="a red circle at the top left" n=16`` writes ``out``
(default ``<run folder>/samples.png``): one row of ``n`` images per prompt, and the prompts in row
order next to it (``.txt``). Prompts come from ``prompt`` (a string or a list) or
``prompts_file`` (one per line); with neither, an unconditional model draws ``n`` images.
``sampler=heun`` (any of ``conf/sampler/``) replaces the checkpoint's sampler; ``labels``,
``classifier_ckpt`` (classifier guidance), ``negative_prompt``, ``inpaint_image``/``inpaint_mask``
(inpainting), ``init_image``/``strength`` (SDEdit) and an unCLIP decoder's ``variations_of`` / ``interpolate`` (image variations and interpolations) are
documented in ``conf/sample.yaml``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image

from genlab.evaluation.verdicts import verdicts
from genlab.models.contract import capabilities, resolve_sampling
from genlab.utils import progress
from genlab.utils.checkpoint import load
from genlab.utils.frozen_parts import build_missing_parts
from genlab.utils.gallery import gallery_section, write_gallery
from genlab.utils.images import save_image_grid
from genlab.utils.instantiate import instantiate
from genlab.utils.rank_logging import RankedLogger
from genlab.utils.task import (
    Preempted,
    TaskResult,
    extras,
    null_group_overrides,
    task_wrapper,
)
from genlab.utils.validation import validate_config

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))
log = RankedLogger(__name__, rank_zero_only=True)

SAMPLING_KEYS = (
    "steps",
    "guidance_scale",
    "thresholding",
    "temperature",
    "top_k",
    "top_p",
    "n_candidates",
    "truncation",
)
TOP_LEVEL = {
    "task_name": str,
    "tags": list[str] | None,
    "ckpt_path": str | None,
    "prompt": str | list[str] | None,
    "prompts_file": str | None,
    "n": int,
    "seed": int,
    "steps": int | None,
    "guidance_scale": float | None,
    "thresholding": str | None,
    "temperature": float | None,
    "top_k": int | None,
    "top_p": float | None,
    "n_candidates": int | None,
    "truncation": float | None,
    "clip_ckpt": str | None,
    "clip_guidance_scale": float | None,
    "labels": list[int] | None,
    "classifier_ckpt": str | None,
    "classifier_scale": float,
    "negative_prompt": str | list[str] | None,
    "inpaint_image": str | None,
    "inpaint_mask": str | None,
    "init_image": str | None,
    "strength": float | None,
    "variations_of": str | list[str] | None,
    "interpolate": list[str] | None,
    "device": str,
    "out": str,
    "cell": int | None,
    "gallery": bool | str | None,
    "oracle_ckpt": str | None,
    "progress": bool,
}


@task_wrapper
def sample(cfg: DictConfig) -> TaskResult:
    """Generate ``n`` images per prompt from ``cfg.ckpt_path`` and save them as one grid."""
    prompts = read_prompts(cfg.get("prompt"), cfg.get("prompts_file"))
    if cfg.n < 1:
        raise ValueError(f"n={cfg.n}: need at least one image (per prompt)")
    if cfg.get("cell") is not None and cfg.cell < 1:
        raise ValueError(f"cell={cfg.cell}: pixels a side >= 1, or null for the native grid")
    device = (
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    progress.disable(not cfg.get("progress", True))
    model = load_model(cfg, device)
    generator = torch.Generator().manual_seed(cfg.seed)
    options = {key: cfg[key] for key in SAMPLING_KEYS if cfg.get(key) is not None}
    if cfg.get("sampler") is not None:
        options["sampler"] = instantiate(cfg.sampler)
    if cfg.get("labels") is not None:
        options["labels"] = list(cfg.labels)
    if cfg.get("negative_prompt") is not None:
        negative = cfg.negative_prompt
        options["negative_prompt"] = negative if isinstance(negative, str) else list(negative)
    if cfg.get("classifier_ckpt") is not None:
        options["classifier"] = load(cfg.classifier_ckpt, map_location=device)
        options["classifier_scale"] = cfg.classifier_scale
    if (cfg.get("inpaint_image") is None) != (cfg.get("inpaint_mask") is None):
        raise ValueError("inpainting needs both inpaint_image=... and inpaint_mask=...")
    if cfg.get("inpaint_image") is not None:
        check_inputs(model, {"known": cfg.inpaint_image})
        channels, height, width = model.image_shape
        size = (height, width)
        options["known"] = read_image(cfg.inpaint_image, size, channels)[None] * 2 - 1
        options["mask"] = (read_image(cfg.inpaint_mask, size, 1)[None] > 0.5).float()
    if cfg.get("init_image") is not None:
        check_inputs(model, {"init_image": cfg.init_image})
        channels, height, width = model.image_shape
        options["init_image"] = read_image(cfg.init_image, (height, width), channels)[None] * 2 - 1
    if cfg.get("strength") is not None:
        options["strength"] = float(cfg.strength)
    from_images = image_sources(cfg, model, prompts)
    out = Path(cfg.out)
    if cfg.get("clip_guidance_scale") is not None:  # GLIDE's CLIP guidance
        if cfg.get("clip_ckpt") is None:
            raise ValueError("clip_guidance_scale needs clip_ckpt=<a noise-aware CLIP checkpoint>")
        check_inputs(model, {"clip": cfg.clip_ckpt})
        options["clip"] = load(cfg.clip_ckpt, map_location=device)
        options["clip_guidance_scale"] = float(cfg.clip_guidance_scale)
    elif cfg.get("clip_ckpt") is not None:
        if "rerank" not in capabilities(model):
            raise ValueError(
                f"clip_ckpt: {type(model).__name__} does not rank candidates (a diffusion model "
                "takes clip_ckpt with clip_guidance_scale=, CLIP guidance)"
            )
        model.use_clip(cfg.clip_ckpt, key="clip_ckpt")
    check_inputs(model, options)
    if from_images is not None:
        method, sources = from_images
        log.info(f"{method}: {len(sources)} image(s), n={cfg.n}")
        draw = model.variations if method == "variations" else model.interpolate
        with progress.bar(f"{method}: {len(sources)} image(s), n={cfg.n}"):
            drawn = draw(sources, n=cfg.n, generator=generator, **options)
        if method == "variations":  # each source image, then its n variations
            rows = [
                torch.cat([src[None], drawn[i * cfg.n : (i + 1) * cfg.n]])
                for i, src in enumerate(sources)
            ]
            images, nrow = torch.cat(rows), cfg.n + 1
        else:  # the two images at the ends of the interpolation
            images, nrow = torch.cat([sources[:1], drawn, sources[1:]]), cfg.n + 2
        save_image_grid(images, out, nrow=nrow, cell=cfg.cell)
        captions = None
    else:
        log.info(f"drawing {cfg.n} image(s) per prompt for {len(prompts or [None])} prompt(s)")
        count = cfg.n * len(prompts or [None])
        with progress.bar(f"sampling {count} image(s)"):
            images = model.generate(prompts, n=cfg.n, generator=generator, **options)
        captions = None if not prompts else [p for p in prompts for _ in range(cfg.n)]
        save_image_grid(
            images, out, nrow=cfg.n if prompts else None, cell=cfg.cell, captions=captions
        )
    if prompts:
        out.with_suffix(".txt").write_text("\n".join(prompts) + "\n")
    if cfg.get("gallery"):
        write_sample_gallery(cfg, images, captions, device)
    weights = "EMA" if model.uses_ema else "raw"
    log.info(f"{len(images)} images ({weights} weights) written to {out}")
    print(f"samples written to {out}")
    return {}, {"cfg": cfg, "model": model, "images": images}


def write_sample_gallery(cfg: DictConfig, images: torch.Tensor, captions, device: str) -> None:
    """The HTML gallery of the drawn images at ``cfg.gallery``, with ``oracle_ckpt``'s verdict on
    each image for its prompt when one is given (and the prompts are captions it reads)."""
    judged = None
    if cfg.get("oracle_ckpt"):
        if not captions:
            raise ValueError("oracle_ckpt: the oracle judges images against prompts; give prompt=")
        oracle = load(cfg.oracle_ckpt, map_location=device)
        judged = verdicts(oracle, images, captions)
        if judged is None:
            log.warning(f"oracle_ckpt={cfg.oracle_ckpt}: it does not read these prompts")
    title = f"{len(images)} samples from {cfg.get('ckpt_path') or 'the assembled model'}"
    note = f"seed {cfg.seed}; grid: {cfg.out}" + ("; verdicts by the oracle" if judged else "")
    section = gallery_section(
        images, title=title, captions=captions, verdicts=judged, note=note, cell=cfg.cell or 128
    )
    path = cfg.gallery if isinstance(cfg.gallery, str) else Path(cfg.out).parent / "gallery.html"
    path = write_gallery(path, [section], title="genlab samples")
    print(f"gallery written to {path}")


INPUTS = {  # generate() inputs other than sampling options, and the capability each needs
    "negative_prompt": "negative_prompt",
    "known": "inpaint",
    "mask": "inpaint",
    "init_image": "img2img",
    "strength": "img2img",
    "clip": "clip_guidance",
    "clip_guidance_scale": "clip_guidance",
    "classifier": "classifier_guidance",
    "classifier_scale": "classifier_guidance",
}


def check_inputs(model, options: dict) -> None:
    """Refuse what the model cannot take (the model contract: its ``sampling_keys``, its
    ``capabilities`` and its ``condition``), naming the option."""
    name, found = type(model).__name__, capabilities(model)
    if "generate" not in found:
        raise ValueError(f"{name} does not generate: sample.py needs a generative model")
    sampling = {k: v for k, v in options.items() if k not in INPUTS and k != "labels"}
    resolve_sampling(model, sampling)
    for key, needed in INPUTS.items():
        if key in options and needed not in found:
            raise ValueError(f"{key}={options[key]!r}: {name} does not take it (leave it null)")
    if "labels" in options and model.condition != "label" and "classifier" not in options:
        raise ValueError(f"labels={options['labels']!r}: {name} does not take it (leave it null)")


def image_sources(cfg: DictConfig, model, prompts) -> tuple[str, torch.Tensor] | None:
    """``("variations", images)`` or ``("interpolate", two images)`` read at the model's size in
    [-1, 1], or None when neither ``variations_of`` nor ``interpolate`` is set."""
    variations, interpolate = cfg.get("variations_of"), cfg.get("interpolate")
    if variations is None and interpolate is None:
        return None
    if variations is not None and interpolate is not None:
        raise ValueError("give variations_of=... or interpolate=[a,b], not both")
    method = "variations" if variations is not None else "interpolate"
    if "variations" not in capabilities(model):
        raise ValueError(
            f"{'variations_of' if variations is not None else 'interpolate'}: "
            f"{type(model).__name__} cannot do it (an unCLIP decoder or model=unclip can)"
        )
    if prompts is not None:
        raise ValueError(f"{method} start from images: leave prompt and prompts_file out")
    paths = [variations] if isinstance(variations, str) else list(variations or interpolate)
    if method == "interpolate" and len(paths) != 2:
        raise ValueError(f"interpolate={paths}: give exactly two images, interpolate=[a.png,b.png]")
    if not paths:
        raise ValueError("variations_of=[]: give at least one image")
    size = (model.image_size, model.image_size)
    return method, torch.stack([read_image(p, size, model.channels) * 2 - 1 for p in paths])


def load_model(cfg: DictConfig, device: str):
    """The checkpoint's model, or one assembled from checkpoints (``model=imagen_cascade``)."""
    if cfg.get("ckpt_path") and cfg.get("model"):
        raise ValueError("give ckpt_path=... or model=... (e.g. model=imagen_cascade), not both")
    if cfg.get("ckpt_path"):
        return load(cfg.ckpt_path, map_location=device)
    if cfg.get("model"):
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        build_missing_parts(model_cfg)
        return instantiate(model_cfg).to(device).eval()
    raise ValueError("ckpt_path is mandatory: pass ckpt_path=... (or model=imagen_cascade ...)")


def read_image(path: str, size: tuple[int, int], channels: int) -> torch.Tensor:
    """A PNG/JPEG as a (channels, H, W) tensor in [0, 1], resized to ``size``.

    Raises:
        ValueError: for a missing or unreadable file.
    """
    if not Path(path).is_file():
        raise ValueError(f"{path!r}: no such image file")
    try:
        image = Image.open(path).convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path!r} is not a readable image: {err}") from err
    image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return (
        torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        .reshape(image.height, image.width, channels)
        .permute(2, 0, 1)
    )


def read_prompts(prompt: str | ListConfig | None, prompts_file: str | None) -> list[str] | None:
    """The prompts from ``prompt`` (a string or list) or ``prompts_file``; None for neither.

    Raises:
        ValueError: for both given, an empty prompt, or a missing or empty prompts file.
    """
    if prompt is not None and prompts_file is not None:
        raise ValueError("give prompt=... or prompts_file=..., not both")
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise ValueError(f"prompts_file={prompts_file!r}: no such file")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompts_file={prompts_file!r} has no prompt (one per line)")
        return prompts
    if prompt is None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError('prompt=[] is empty: give at least one, e.g. prompt="a red circle"')
    for i, text in enumerate(prompts):
        if not text.strip():
            where = "prompt" if isinstance(prompt, str) else f"prompt[{i}]"
            raise ValueError(
                f'{where}={text!r} is empty: give some text, e.g. prompt="a red circle"'
            )
    return prompts


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample.yaml")
def main(cfg: DictConfig) -> None:
    """Validate the composed config, then sample."""
    validate_config(cfg, TOP_LEVEL)
    extras(cfg)
    try:
        sample(cfg)
    except Preempted as stop:
        sys.exit(128 + stop.signum)  # what the signal would have given; the message is logged


if __name__ == "__main__":
    sys.argv = null_group_overrides(sys.argv, Path(__file__).resolve().parents[1] / "conf")
    main()
