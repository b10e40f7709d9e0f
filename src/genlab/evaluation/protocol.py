"""What a model accepts for sampling, and the protocol every result carries.

The protocol names what a number was measured with: extractor and version, sample and reference
counts, sampler, steps, guidance scale, seed, weights (EMA or raw), evaluator versions
(DESIGN.md, "Evaluation protocol").
"""

from __future__ import annotations

import inspect
from collections.abc import Collection
from typing import Any

import lightning as L

METRICS = ("fid", "kid", "is", "pr", "caption", "clip")


def generates(pl_module: L.LightningModule) -> bool:
    """Whether the module draws images with ``generate`` (the model contract)."""
    return callable(getattr(pl_module, "generate", None))


def reconstructs(pl_module: L.LightningModule) -> bool:
    """Whether the module is an autoencoder with ``reconstruct(images) -> images``."""
    return callable(getattr(pl_module, "reconstruct", None))


def accepted_keywords(model: Any) -> set[str]:
    """The keywords ``model.generate`` takes, following ``**kwargs`` up the class hierarchy to
    the first definition that names all of its own."""
    names: set[str] = set()
    for cls in type(model).__mro__:
        fn = cls.__dict__.get("generate")
        if fn is None:
            continue
        params = inspect.signature(fn).parameters.values()
        names |= {
            p.name for p in params if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
        }
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def check_sampling(
    pl_module: L.LightningModule,
    sampling: dict[str, Any],
    guidance_scales: list[float | None],
    generate_options: dict[str, Any],
) -> None:
    """Refuse sampling options that a model would ignore: a first stage that does not
    generate (VQ-GAN, dVAE) takes none; one that does takes those its ``generate`` names, or
    those it has a setting of (``sampler``, ``guidance_scale``) when it passes ``**kwargs``
    on. The VAE, which decodes prior samples in one pass, takes none.

    Args:
        sampling: ``{"sampler": ..., "steps": ...}`` (None: the model's own).
        guidance_scales: the scales to evaluate (``[None]``: the model's own).
        generate_options: further keywords of ``generate``.
    """
    settings = {"sampler": "sampler", "steps": "sampler", "guidance_scale": "guidance_scale"}
    asked = [(key, value, key) for key, value in sampling.items() if value is not None]
    if len(guidance_scales) > 1:
        asked.append(("guidance_scales", guidance_scales, "guidance_scale"))
    elif guidance_scales[0] is not None:
        asked.append(("guidance_scale", guidance_scales[0], "guidance_scale"))
    name = type(pl_module).__name__
    if asked and not generates(pl_module):
        key, value, _ = asked[0]
        raise ValueError(
            f"callbacks.generative_metrics.{key}={value!r}: {name} does not generate (a first"
            " stage, measured by its reconstructions), so it takes no sampling options; leave"
            f" {key} null"
        )
    if generate_options and not generates(pl_module):
        raise ValueError(
            f"callbacks.generative_metrics.generate_options={generate_options}: "
            f"{name} does not generate; leave it empty"
        )
    parameters = (
        inspect.signature(pl_module.generate).parameters if asked or generate_options else {}
    )
    forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = sorted(set(generate_options) - set(parameters))
    if unknown and not forwards:
        raise ValueError(
            f"callbacks.generative_metrics.generate_options.{unknown[0]}: {name}.generate "
            f"takes no {unknown[0]!r}; it takes {sorted(parameters)}"
        )
    for key, value, parameter in asked:
        has_setting = hasattr(pl_module, settings[parameter])
        if parameter not in parameters and not (forwards and has_setting):
            raise ValueError(
                f"callbacks.generative_metrics.{key}={value!r}: {name} has no {parameter} "
                f"(its generate does not take one); leave {key} null"
            )


def base_protocol(
    tools: dict[str, Any], ref_info: dict[str, Any], settings: dict[str, int], n: int
) -> dict[str, Any]:
    """Extractor, evaluator versions, reference and metric settings in effect for n images."""
    extractor = tools.get("extractor")
    described = (
        extractor.describe() if extractor else {"extractor": None, "extractor_version": None}
    )
    protocol = {**described, **settings}  # with the values in effect:
    protocol["is_splits"] = min(settings["is_splits"], n // 2)
    if ref_info:
        protocol["kid_subset_size"] = min(settings["kid_subset_size"], ref_info["num_images"], n)
        protocol["reference"] = {
            "split": ref_info["split"],
            "num_images": ref_info["num_images"],
            "key": ref_info["key"],
        }
    for name in ("oracle", "clip"):
        if name in tools:
            protocol[f"{name}_version"] = tools[name].version
    return protocol


def sampling_protocol(
    pl_module: L.LightningModule,
    sampling: dict[str, Any],
    generate_options: dict[str, Any],
    scale: float | None,
) -> dict[str, Any]:
    """Sampler, steps and guidance scale where the model has them (a VAE draws from its prior
    in one pass: none), with the model's own settings (DALL-E's ``sampling_protocol``)."""
    resolve = getattr(pl_module, "resolve_sampler", None)
    sampler = resolve(sampling["sampler"], sampling["steps"]) if resolve else sampling["sampler"]
    model_scale = getattr(pl_module, "guidance_scale", None)
    protocol = {
        "sampler": str(sampler) if sampler is not None else None,
        "steps": getattr(sampler, "steps", sampling["steps"]),
        "guidance_scale": model_scale if scale is None else scale,
    }
    own = getattr(pl_module, "sampling_protocol", None)  # a model's own settings (DALL-E)
    if callable(own):
        given = generate_options | ({} if scale is None else {"guidance_scale": scale})
        protocol = {k: v for k, v in protocol.items() if v is not None} | own(given)
    if all(value is None for value in protocol.values()):
        protocol = {}
    return protocol


def weights_of(pl_module: L.LightningModule) -> str:
    """``EMA`` or ``raw``: the weights a model generates with."""
    return "EMA" if getattr(pl_module, "uses_ema", False) else "raw"


def named_values(name: str, value: Any) -> dict[str, float]:
    """Flatten a metric's ``compute()`` into named floats: ``fid``, ``kid``/``kid_std``, ..."""
    if isinstance(value, dict):
        prefix = {"caption": "caption_", "clip": "", "reconstruction": ""}.get(name, f"{name}_")
        return {f"{prefix}{k}": float(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        names = {"kid": ("kid", "kid_std"), "is": ("is", "is_std"), "pr": ("precision", "recall")}[
            name
        ]
        return {k: float(v) for k, v in zip(names, value, strict=True)}
    return {name: float(value)}


def check_options(
    *,
    num_samples: int,
    batch_size: int,
    every_n_epochs: int,
    metrics: Collection[str],
    features: str,
    fallback: str,
    guidance_scales: list[float] | None,
) -> None:
    """Check the generative metrics callback's options; errors name the key."""
    check(num_samples >= 2, "num_samples", num_samples, "an int >= 2")
    check(batch_size >= 1, "batch_size", batch_size, "an int >= 1")
    check(every_n_epochs >= 0, "every_n_epochs", every_n_epochs, "an int >= 0")
    unknown = sorted(set(metrics) - set(METRICS))
    check(not unknown, "metrics", metrics, f"a list from {list(METRICS)}")
    choices = ("auto", "inception", "shapes_oracle", "clip")
    check(features in choices, "features", features, f"one of {list(choices)}")
    check(fallback in choices[2:], "fallback", fallback, "shapes_oracle or clip")
    check(
        guidance_scales is None or len(guidance_scales) > 0,
        "guidance_scales",
        guidance_scales,
        "a non-empty list or null",
    )


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a ValueError naming ``callbacks.generative_metrics.<key>`` unless ``ok``."""
    if not ok:
        raise ValueError(f"callbacks.generative_metrics.{key}={value!r}: must be {allowed}")
