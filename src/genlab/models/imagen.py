"""Imagen (Saharia et al. 2022): a cascade of text-conditioned diffusion models on a frozen
pretrained text encoder.

* **The base stage** is the shared diffusion model at low resolution with a frozen text encoder
  (``model=imagen_base``: all-MiniLM-L6-v2 offline, or T5 by name or path) read by
  cross-attention, its pooled embedding added to the timestep embedding, high guidance scales and
  dynamic thresholding — a config of ``models/ddpm.py``, not a class of its own.
* **A super-resolution stage** (:class:`ImagenSR`, ``model=imagen_sr``) draws an image of
  ``image_size`` given the caption and a low-resolution image of ``low_res_size``, which the UNet
  reads bilinearly upsampled and concatenated to its input. It is trained with *noise-conditioning
  augmentation* (Ho et al. 2021, "Cascaded Diffusion Models", §3.2; Imagen §2.5): the training
  image is downsampled (area) to the low resolution, upsampled, and corrupted by the diffusion's
  own forward process at a random level s ~ U(0, ``aug_max``),

      z_s = √ᾱ(s) · x_low + √(1 − ᾱ(s)) · ε,   ᾱ(s) = the cosine schedule in continuous time,

  and the network is told s (``aug_level_embedding`` of the UNet). At sampling a fixed level
  (``sample_aug_level``) corrupts the previous stage's output the same way, so the stage does not
  trust the base model's artefacts more than it learnt to. Validation and test use the sampling
  level, with noise seeded by each item's index.
* **The cascade** (:class:`ImagenCascade`, ``model=imagen_cascade``) chains the stages'
  checkpoints: the base draws from the prompts, each SR stage draws from its predecessor's images,
  each with its own sampler, steps, guidance scale and augmentation level. It does not train; it
  is evaluated by ``eval.py`` and sampled by ``sample.py`` like any other model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from genlab.diffusion.guidance import Thresholding
from genlab.diffusion.samplers import Sampler
from genlab.diffusion.schedules import cosine_log_snr
from genlab.models.diffusion_model import DiffusionModel
from genlab.utils.checkpoint import load_frozen


def augmentation_alpha_bar(level: torch.Tensor) -> torch.Tensor:
    """ᾱ(s) of the noise-conditioning augmentation: the cosine schedule at continuous time s."""
    return torch.sigmoid(cosine_log_snr(level.clamp(0.0, 1.0)))


def corrupt(images: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_s = √ᾱ(s) x + √(1 − ᾱ(s)) ε per sample; level (B,), images and noise (B, C, H, W)."""
    alpha_bar = augmentation_alpha_bar(level).to(images.dtype)[:, None, None, None]
    return alpha_bar.sqrt() * images + (1 - alpha_bar).sqrt() * noise


class ImagenSR(DiffusionModel):
    """Text-conditional super-resolution diffusion with noise-conditioning augmentation.

    Args:
        low_res_size: the side of the low-resolution image it is conditioned on.
        aug_max: training augmentation levels are drawn from U(0, aug_max).
        sample_aug_level: the augmentation level at sampling and evaluation.
        **kwargs: the diffusion model's arguments (:class:`DiffusionModel`); ``image_size`` is
            the high resolution, and the net must read ``low_res_channels = channels`` with an
            augmentation-level embedding.
    """

    config_name = "imagen_sr"

    def __init__(
        self,
        *,
        low_res_size: int,
        aug_max: float = 0.5,
        sample_aug_level: float = 0.1,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if not 0 < low_res_size < self.image_size:
            raise ValueError(
                f"model.low_res_size={low_res_size} must be between 0 and model.image_size="
                f"{self.image_size}: a super-resolution stage needs a smaller input"
            )
        if not (0.0 <= aug_max <= 1.0 and 0.0 <= sample_aug_level <= 1.0):
            raise ValueError(
                f"model.aug_max={aug_max} and model.sample_aug_level={sample_aug_level} must be "
                "in [0, 1]"
            )
        net = self.denoiser["net"]
        if getattr(net, "low_res_channels", None) != self.channels or net.aug_embed is None:
            raise ValueError(
                f"model.net must read the low-resolution image: set model.net.low_res_channels="
                f"{self.channels} and model.net.aug_level_embedding=true"
            )
        if self.bpd_images:
            raise ValueError("model.bpd_images: bits/dim of a super-resolution stage is not done")
        self.low_res_size, self.aug_max = low_res_size, aug_max
        self.sample_aug_level = sample_aug_level
        self.sampling_low_res: tuple[torch.Tensor, float] | None = None  # set during generate

    # ------------------------------------------------------------------------------------------
    # the low-resolution condition
    def downsample(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → (B, C, low, low), area-averaged: what the base stage draws."""
        return F.interpolate(images.float(), size=self.low_res_size, mode="area")

    def upsample(self, low: torch.Tensor) -> torch.Tensor:
        """(B, C, low, low) → (B, C, H, W), bilinear: what the UNet reads beside x_t."""
        size = (self.image_size, self.image_size)
        return F.interpolate(low.float(), size=size, mode="bilinear", align_corners=False)

    def training_levels(self, n: int) -> torch.Tensor:
        """Augmentation levels of a batch: U(0, aug_max) in training, the sampling level else."""
        if not self.training:
            return torch.full((n,), self.sample_aug_level, device=self.device)
        draw = torch.rand(n, device=self.device)
        return draw * self.aug_max

    def low_res_condition(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The augmented, upsampled low-resolution version of a batch's images and its levels;
        in evaluation the noise is seeded by each item's ``index`` (batching-independent)."""
        up = self.upsample(self.downsample(batch["image"]))  # (B, C, H, W)
        levels = self.training_levels(len(up))
        if self.training:
            noise = torch.randn(up.shape, device=self.device)
        else:
            gens = [torch.Generator().manual_seed(int(i) + 7919) for i in batch["index"]]
            noise = torch.stack([torch.randn(up.shape[1:], generator=g) for g in gens])
        return {"low_res": corrupt(up, levels, noise.to(up.device)), "aug_level": levels}

    def drop_condition(self, batch: dict[str, Any], drop: torch.Tensor) -> dict[str, Any]:
        """The caption is dropped for guidance; the low-resolution image never is."""
        return super().drop_condition(batch, drop) | self.low_res_condition(batch)

    def condition_inputs(
        self, denoiser, captions=None, labels=None, low_res=None, aug_level=None
    ) -> dict[str, torch.Tensor]:
        inputs = super().condition_inputs(denoiser, captions, labels)
        return inputs | {"low_res": low_res, "aug_level": aug_level}

    # ------------------------------------------------------------------------------------------
    # sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | None = None,
        *,
        low_res: torch.Tensor | None = None,
        aug_level: float | None = None,
        n: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Draw (N, C, H, W) images in [-1, 1] from ``low_res`` (N, C, low, low) images in
        [-1, 1], one per image to draw (prompt-major: ``n`` per prompt), at augmentation level
        ``aug_level`` (default ``sample_aug_level``). Other options are
        :meth:`DiffusionModel.generate`'s (sampler, steps, guidance scale, thresholding)."""
        for option in ("known", "mask", "classifier"):
            if kwargs.get(option) is not None:
                raise ValueError(f"{option}: not available for a super-resolution stage")
        per_prompt = n or 1
        wanted = len(prompts or []) * per_prompt if self.condition == "text" else per_prompt
        expected = (wanted, self.channels, self.low_res_size, self.low_res_size)
        if low_res is None or tuple(low_res.shape) != expected:
            got = None if low_res is None else tuple(low_res.shape)
            raise ValueError(
                f"a super-resolution stage draws from low-resolution images: pass low_res of "
                f"shape {expected} (one per image to draw, prompt-major); got {got}"
            )
        level = self.sample_aug_level if aug_level is None else float(aug_level)
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"aug_level={level} must be in [0, 1]")
        up = self.upsample(low_res.to(self.device).clamp(-1, 1))
        noise_device = "cpu" if generator is None else generator.device
        noise = torch.randn(up.shape, generator=generator, device=noise_device).to(self.device)
        levels = torch.full((len(up),), level, device=self.device)
        self.sampling_low_res = (corrupt(up, levels, noise), level)
        try:
            return super().generate(prompts, n=n, generator=generator, **kwargs)
        finally:
            self.sampling_low_res = None

    def generation_conditions(self, prompts, n, labels, generator, classifier=None) -> list:
        """Each image's condition paired with its row of the augmented low-res images."""
        conds = super().generation_conditions(prompts, n, labels, generator, classifier)
        return list(zip(conds, range(len(conds)), strict=True))

    def condition_kwargs(self, conds: list, guided: bool) -> dict[str, Any]:
        low_res, level = self.sampling_low_res
        kwargs = super().condition_kwargs([c for c, _ in conds], guided)
        rows = low_res[[i for _, i in conds]]  # (B, C, H, W)
        if guided:  # the unconditional half sees the same low-resolution images
            rows = torch.cat([rows, rows])
        return kwargs | {
            "low_res": rows,
            "aug_level": torch.full((len(rows),), level, device=self.device),
        }


@dataclasses.dataclass
class StageOptions:
    """How one stage of the cascade samples (None: that stage's own setting)."""

    sampler: Sampler | str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    thresholding: Thresholding | None = None
    aug_level: float | None = None  # super-resolution stages only


class ImagenCascade(L.LightningModule):
    """Chain a base stage's and super-resolution stages' checkpoints into one generator.

    Args:
        stages: checkpoints: a text-conditional base model (``model=imagen_base`` or any
            text-conditional diffusion model), then ``imagen_sr`` stages whose ``low_res_size``
            is the previous stage's ``image_size``.
        options: per stage, ``{sampler, steps, guidance_scale, thresholding, aug_level}`` (missing or None:
            the stage's own); a list as long as ``stages``, or empty.
    """

    condition = "text"

    def __init__(self, *, stages: list[str], options: list[dict[str, Any]] | None = None):
        super().__init__()
        if len(stages) < 2:
            raise ValueError(f"model.stages={stages}: a cascade needs a base and >= 1 SR stage")
        options = list(options or [{}] * len(stages))
        if len(options) != len(stages):
            raise ValueError(
                f"model.options has {len(options)} entries for {len(stages)} stages: give one "
                "per stage (or none)"
            )
        hint = "use an imagen_base/ddpm checkpoint, then imagen_sr checkpoints"
        loaded = [
            load_frozen(path, key=f"model.stages[{i}]", needs=("generate",), hint=hint)
            for i, path in enumerate(stages)
        ]
        for i, (prev, stage) in enumerate(zip(loaded, loaded[1:], strict=False), start=1):
            if getattr(stage, "low_res_size", None) != prev.image_size:
                raise ValueError(
                    f"model.stages[{i}]={stages[i]!r} must be a super-resolution stage from "
                    f"{prev.image_size} px (the previous stage's size); it has low_res_size="
                    f"{getattr(stage, 'low_res_size', None)}"
                )
        if getattr(loaded[0], "condition", None) != "text":
            raise ValueError(f"model.stages[0]={stages[0]!r} must be a text-conditional model")
        self.stages = torch.nn.ModuleList(loaded)
        self.stage_paths = [str(p) for p in stages]
        self.options = [StageOptions(**o) for o in options]
        self.image_size, self.channels = loaded[-1].image_size, loaded[-1].channels

    @property
    def uses_ema(self) -> bool:
        return all(getattr(stage, "uses_ema", False) for stage in self.stages)

    def sampling_protocol(self, given: dict[str, Any]) -> dict[str, Any]:
        """Each stage's sampler, steps, guidance scale, thresholding and augmentation level."""
        described = []
        for i, (stage, opts) in enumerate(zip(self.stages, self.options, strict=True)):
            if i == 0 and given.get("guidance_scale") is not None:
                opts = dataclasses.replace(opts, guidance_scale=given["guidance_scale"])
            sampler = stage.resolve_sampler(opts.sampler, opts.steps)
            scale = stage.guidance_scale if opts.guidance_scale is None else opts.guidance_scale
            entry = {"size": stage.image_size, "sampler": str(sampler), "guidance_scale": scale}
            entry["thresholding"] = (
                (i == 0 and given.get("thresholding")) or opts.thresholding or stage.thresholding
            )
            if isinstance(stage, ImagenSR):
                level = stage.sample_aug_level if opts.aug_level is None else opts.aug_level
                entry["aug_level"] = level
            described.append(entry)
        return {"sampler": "cascade", "stages": described}

    def train(self, mode: bool = True) -> ImagenCascade:
        return super().train(False)  # the stages never train

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Nothing to compute per batch: the cascade is measured by the metrics callback."""

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | None = None,
        *,
        n: int | None = None,
        generator: torch.Generator | None = None,
        guidance_scale: float | None = None,
        thresholding: str | None = None,
    ) -> torch.Tensor:
        """(P · n, C, H, W) images in [-1, 1] at the last stage's size. ``guidance_scale`` and
        ``thresholding`` override the base stage's (a guidance sweep of the cascade)."""
        first, *rest = zip(self.stages, self.options, strict=True)
        base_kwargs = stage_kwargs(first[1])
        if guidance_scale is not None:
            base_kwargs["guidance_scale"] = guidance_scale
        if thresholding is not None:
            base_kwargs["thresholding"] = thresholding
        images = first[0].generate(prompts, n=n, generator=generator, **base_kwargs)
        for stage, opts in rest:
            kwargs = stage_kwargs(opts)
            if opts.aug_level is not None:
                kwargs["aug_level"] = opts.aug_level
            images = stage.generate(prompts, n=n, low_res=images, generator=generator, **kwargs)
        return images


def stage_kwargs(opts: StageOptions) -> dict[str, Any]:
    """The ``generate`` keywords that a stage's options set."""
    kwargs = {
        "sampler": opts.sampler,
        "steps": opts.steps,
        "guidance_scale": opts.guidance_scale,
        "thresholding": opts.thresholding,
    }
    return {k: v for k, v in kwargs.items() if v is not None}
