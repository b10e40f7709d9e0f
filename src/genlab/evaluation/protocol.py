"""What a model accepts for sampling, and the protocol every result carries.

The protocol names what a number was measured with: extractor and version, sample and reference
counts, sampler, steps, guidance scale, seed, weights (EMA or raw), evaluator versions
(docs/architecture.md, "The evaluation protocol").
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import lightning as L

from genlab.metrics.kid import subset_size_for
from genlab.models.contract import capabilities, resolve_sampling

METRICS = ("fid", "kid", "is", "pr", "caption", "clip")


def generates(pl_module: L.LightningModule) -> bool:
    """Whether the module draws images (the model contract's ``generate`` capability)."""
    return "generate" in capabilities(pl_module)


def reconstructs(pl_module: L.LightningModule) -> bool:
    """Whether the module is an autoencoder (the contract's ``reconstruct`` capability)."""
    return "reconstruct" in capabilities(pl_module)


def check_sampling(
    pl_module: L.LightningModule,
    sampling: dict[str, Any],
    guidance_scales: list[float | None],
    generate_options: dict[str, Any],
    where: str = "callbacks.generative_metrics.",
) -> None:
    """Refuse sampling options that a model would ignore: a model that does not generate (a
    first stage, measured by its reconstructions) takes none; one that does takes its
    ``sampling_keys`` (:func:`genlab.models.contract.resolve_sampling`).

    Args:
        sampling: ``{"sampler": ..., "steps": ...}`` (None: the model's own).
        guidance_scales: the scales to evaluate (``[None]``: the model's own).
        generate_options: further sampling options (e.g. DALL-E's ``n_candidates``).
    """
    if len(guidance_scales) > 1 and not generates(pl_module):
        name = type(pl_module).__name__
        raise ValueError(
            f"{where}guidance_scales={guidance_scales!r}: {name} does not generate (a first "
            "stage, measured by its reconstructions), so it takes no sampling options; leave "
            "guidance_scales null"
        )
    for scale in guidance_scales:
        given = sampling | {"guidance_scale": scale}
        resolve_sampling(pl_module, given | (generate_options or {}), where)


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
        size = min(ref_info["num_images"], n)
        protocol["kid_subset_size"] = subset_size_for(size, settings["kid_subset_size"])
        data = ref_info.get("data") or {}
        protocol["reference"] = {
            "split": ref_info["split"],
            "num_images": ref_info["num_images"],
            "key": ref_info["key"],
            **{k: data[k] for k in ("dataset", "resolution") if k in data},
        }
    for name in ("oracle", "clip"):
        if name in tools:
            protocol[f"{name}_version"] = tools[name].version
    if "clip" in tools:  # which CLIP scores: genlab's checkpoint or a pretrained one
        protocol["clip_model"] = getattr(tools["clip"], "name", None)
        if protocol["clip_model"] == "clip":
            protocol["clip_model"] = getattr(tools["clip"], "checkpoint", "clip")
    return protocol


def sampling_protocol(
    pl_module: L.LightningModule,
    sampling: dict[str, Any],
    generate_options: dict[str, Any],
    scale: float | None,
) -> dict[str, Any]:
    """What the model samples with for these options, every default resolved by the model
    (``sampling_options(**given).protocol()``); empty for a model that does not generate."""
    if not generates(pl_module):
        return {}
    given = sampling | (generate_options or {}) | {"guidance_scale": scale}
    return resolve_sampling(pl_module, given).protocol()


def weights_of(pl_module: L.LightningModule) -> str:
    """``EMA`` or ``raw``: the weights a model generates with (the contract's ``uses_ema``)."""
    return "EMA" if generates(pl_module) and pl_module.uses_ema else "raw"


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
