"""The model contract: what the entry points and callbacks may ask of a genlab model.

Every LightningModule of ``genlab.models`` declares what it can do in ``capabilities`` (a set of
the names below) instead of being probed with ``hasattr``; a generative model also declares its
``sampling_keys`` (the options ``sampling_options`` takes), ``condition`` and ``uses_ema``:

| capability | the model has | used by |
| --- | --- | --- |
| ``generate`` | ``generate(prompts=None, *, n=, generator=, **options)`` → images (N, C, H, W) in [-1, 1], and ``sampling_options(**given)`` | sample grids, metrics, ``sample.py``, ``eval.py`` |
| ``reconstruct`` | ``reconstruct(images)`` → images | reconstruction metrics and grids |
| ``variations`` | ``variations(images, n=)`` and ``interpolate(images, n=)`` | ``sample.py variations_of= / interpolate=`` |
| ``inpaint`` | ``generate(known=, mask=)`` | ``sample.py inpaint_image=`` |
| ``img2img`` | ``generate(init_image=, strength=)`` (SDEdit) | ``sample.py init_image=`` |
| ``negative_prompt`` | ``generate(negative_prompt=)`` | ``sample.py negative_prompt=`` |
| ``rerank`` | ``use_clip(ckpt)``: rank ``n_candidates`` by a CLIP | ``sample.py clip_ckpt=`` |
| ``clip_guidance`` | ``generate(clip=, clip_guidance_scale=)`` (a noise-aware CLIP) | ``sample.py clip_ckpt= clip_guidance_scale=`` |
| ``classifier_guidance`` | ``generate(labels=, classifier=, classifier_scale=)`` | ``sample.py classifier_ckpt=`` |

``condition`` is ``"text"``, ``"label"`` or ``"none"``: what ``generate`` is asked with. A
*composite* (the Imagen cascade, the unCLIP pair) chains checkpoints and does not train; its
per-stage options have one shape, :class:`StageOptions`.

:class:`SamplingOptions` is the one place where a model's sampling defaults meet what a caller
gave: ``model.sampling_options(**given)`` resolves them once, and ``generate``, the callbacks and
the entry points all read the result (``protocol()`` for the metrics' records).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch

Condition = Literal["text", "label", "none"]
CAPABILITIES = (
    "generate",
    "reconstruct",
    "variations",
    "inpaint",
    "img2img",
    "negative_prompt",
    "classifier_guidance",
    "clip_guidance",
    "rerank",
)


@runtime_checkable
class GenerativeModel(Protocol):
    """A model that draws images (``"generate" in capabilities``)."""

    condition: Condition
    capabilities: frozenset[str]
    sampling_keys: frozenset[str]
    uses_ema: bool

    def generate(self, prompts: list[str] | None = None, **options: Any) -> torch.Tensor: ...

    def sampling_options(self, **given: Any) -> SamplingOptions: ...


@runtime_checkable
class ReconstructingModel(Protocol):
    """An autoencoder (``"reconstruct" in capabilities``)."""

    capabilities: frozenset[str]

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How one model samples, every default resolved (``model.sampling_options(**given)``).

    ``sampler`` is a ``genlab.diffusion.samplers.Sampler`` for diffusion models and None for the
    others; ``extra`` holds family-specific settings (candidates of the unCLIP prior, top-k of
    DALL·E, truncation of the GAN, ...); ``stages`` the per-stage options of a composite.
    """

    sampler: Any = None
    guidance_scale: float | None = None
    thresholding: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    stages: tuple[Any, ...] = ()

    def protocol(self) -> dict[str, Any]:
        """The record of these options that evaluation results carry."""
        out: dict[str, Any] = {}
        if self.sampler is not None:
            out["sampler"] = str(self.sampler)
        if self.guidance_scale is not None:
            out["guidance_scale"] = self.guidance_scale
        if self.thresholding is not None:
            out["thresholding"] = self.thresholding
        if self.stages:
            out["stages"] = [stage.protocol() for stage in self.stages]
        return out | self.extra


@dataclasses.dataclass
class StageOptions:
    """How one stage of a composite samples (None: that stage's own setting)."""

    sampler: Any = None
    steps: int | None = None
    guidance_scale: float | None = None
    thresholding: str | None = None
    aug_level: float | None = None  # super-resolution stages
    candidates: int | None = None  # the unCLIP prior

    @classmethod
    def parse(
        cls, options: dict[str, Any] | None, key: str, allowed: Sequence[str]
    ) -> StageOptions:
        """Options from a config dict; keys outside ``allowed`` are refused with their name."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"model.{key}: unknown option(s) {unknown}; allowed: {list(allowed)}")
        return cls(**options)

    def given(self, *names: str) -> dict[str, Any]:
        """The set (not None) options among ``names`` (all when none are named)."""
        names = names or tuple(f.name for f in dataclasses.fields(self))
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def capabilities(model: Any) -> frozenset[str]:
    """What ``model`` declares it can do (empty for a module outside the contract)."""
    return frozenset(getattr(model, "capabilities", ()))


def resolve_sampling(model: Any, given: dict[str, Any], where: str = "") -> SamplingOptions:
    """``model.sampling_options(**given)`` (None values dropped), after checking that the model
    generates and that every given key is one of its ``sampling_keys``; errors name the config
    key as ``<where><key>=<value>``."""
    given = {k: v for k, v in given.items() if v is not None}
    name = type(model).__name__
    if "generate" not in capabilities(model):
        if given:
            key, value = next(iter(given.items()))
            raise ValueError(
                f"{where}{key}={value!r}: {name} does not generate (a first stage, measured by "
                f"its reconstructions), so it takes no sampling options; leave {key} null"
            )
        return SamplingOptions()
    allowed = frozenset(model.sampling_keys)
    for key, value in given.items():
        if key not in allowed:
            raise ValueError(
                f"{where}{key}={value!r}: {name} has no {key} (its sampling options are "
                f"{sorted(allowed)}); leave {key} null"
            )
    return model.sampling_options(**given)


def check_prompts(prompts: Any, what: str = "prompt") -> None:
    """The one prompt check: a non-empty list of non-empty strings, or a ValueError naming the
    first bad entry."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"{what}s must be a list of str, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError(f"{what}s is an empty list: pass at least one {what}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"{what} {i} is a {type(prompt).__name__}, not a str")
        if not prompt.strip():
            raise ValueError(f"{what} {i} is empty: every {what} needs some text")


def captions_of(batch: dict[str, Any]) -> list[str]:
    """The captions of a batch, or a clear error for a dataset without them."""
    captions = batch.get("caption")
    if captions is None:
        raise ValueError(
            "this model needs captions, but the batch has none: use a captioned dataset "
            "(data=shapes, data=coco, or data=image_folder with captions)"
        )
    return list(captions)


def check_no_prompts(prompts: Any, what: str) -> None:
    """Refuse prompts for an unconditional model (it takes ``n``)."""
    if prompts is not None:
        raise ValueError(f"{what} is unconditional: pass n, not prompts")
