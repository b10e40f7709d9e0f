"""The Imagen cascade (Saharia et al. 2022): a base stage's and super-resolution stages'
checkpoints chained into one text-to-image generator.

The stages themselves are configs of the diffusion system (``model=imagen_base``: a frozen
pretrained text encoder, high guidance and dynamic thresholding; ``model=imagen_sr``: the
low-resolution image with noise-conditioning augmentation, ``conditioners.LowResConditioner``).
The cascade draws from the prompts with the base, then each SR stage from its predecessor's
images, each with its own sampler, steps, guidance scale and augmentation level. It does not
train; ``eval.py`` and ``sample.py`` take it like any other model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning as L
import torch

from genlab.models.contract import SamplingOptions, StageOptions
from genlab.models.diffusion.conditioners import LowResConditioner
from genlab.utils.checkpoint import load_frozen

STAGE_KEYS = ("sampler", "steps", "guidance_scale", "thresholding", "aug_level")


class ImagenCascade(L.LightningModule):
    """Chain a base stage's and super-resolution stages' checkpoints into one generator.

    Args:
        stages: checkpoints: a text-conditional base model (``model=imagen_base`` or any
            text-conditional diffusion model), then ``imagen_sr`` stages whose low-resolution
            size is the previous stage's ``image_size``.
        options: per stage, ``{sampler, steps, guidance_scale, thresholding, aug_level}``
            (missing or None: the stage's own); a list as long as ``stages``, or empty.
    """

    condition = "text"
    capabilities = frozenset({"generate"})
    sampling_keys = frozenset({"guidance_scale", "thresholding"})  # the base stage's

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
            low_res = low_res_size(stage)
            if low_res != prev.image_size:
                raise ValueError(
                    f"model.stages[{i}]={stages[i]!r} must be a super-resolution stage from "
                    f"{prev.image_size} px (the previous stage's size); it has low_res_size="
                    f"{low_res}"
                )
        if getattr(loaded[0], "condition", None) != "text":
            raise ValueError(f"model.stages[0]={stages[0]!r} must be a text-conditional model")
        self.stages = torch.nn.ModuleList(loaded)
        self.stage_paths = [str(p) for p in stages]
        self.options = [
            StageOptions.parse(o, f"options[{i}]", STAGE_KEYS) for i, o in enumerate(options)
        ]
        self.image_size, self.channels = loaded[-1].image_size, loaded[-1].channels

    @property
    def uses_ema(self) -> bool:
        return all(stage.uses_ema for stage in self.stages)

    def stage_options(self, **given: Any) -> list[dict[str, Any]]:
        """Each stage's ``generate`` options; ``given`` (guidance scale, thresholding) apply to
        the base stage (a guidance sweep of the cascade sweeps the base)."""
        per_stage = [opts.given() for opts in self.options]
        per_stage[0] |= {k: v for k, v in given.items() if v is not None}
        return per_stage

    def sampling_options(self, **given: Any) -> SamplingOptions:
        """Each stage's resolved options, as the stages resolve them; the cascade's own
        ``guidance_scale`` is the base stage's (the one that ``guidance_scale=`` and a guidance
        sweep set)."""
        stages = []
        for stage, opts in zip(self.stages, self.stage_options(**given), strict=True):
            resolved = stage.sampling_options(**opts)
            extra = {"size": stage.image_size} | resolved.extra
            stages.append(dataclasses.replace(resolved, extra=extra))
        return SamplingOptions(
            sampler="cascade", guidance_scale=stages[0].guidance_scale, stages=tuple(stages)
        )

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
        options = self.stage_options(guidance_scale=guidance_scale, thresholding=thresholding)
        images = self.stages[0].generate(prompts, n=n, generator=generator, **options[0])
        for stage, opts in zip(self.stages[1:], options[1:], strict=True):
            images = stage.generate(prompts, n=n, low_res=images, generator=generator, **opts)
        return images


def low_res_size(stage: Any) -> int | None:
    """The low-resolution size a stage reads, or None for a stage that reads none."""
    conditioner = getattr(stage, "conditioner", None)
    found = conditioner(LowResConditioner) if callable(conditioner) else None
    return None if found is None else found.low_res_size
