"""The feature extractor and the evaluators of a generative evaluation, loaded once.

``features: auto`` uses torch-fidelity's Inception-v3 when its weights are on disk
(``inception_weights`` or torch-fidelity's cache) and otherwise says so in a warning and uses
the offline evaluator named by ``fallback`` (the shapes oracle, or CLIP image embeddings). The
shapes oracle also parses images for caption accuracy whenever the prompts are shapes captions;
CLIP (when configured) gives the CLIP score of text models. Evaluator checkpoints are found or
built once (``genlab.metrics.evaluators``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import lightning as L
import torch

import genlab
from genlab.evaluation.protocol import generates, reconstructs
from genlab.metrics.evaluators import ensure_evaluator
from genlab.metrics.extractors import (
    CheckpointEvaluator,
    CLIPImageFeatures,
    InceptionV3,
    find_inception_weights,
    inception_weights_candidates,
)
from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

Evaluators = dict[str, tuple[str | None, list[str] | None]]  # name -> (checkpoint, recipe)


def load_tools(
    *,
    features: str,
    inception_weights: str | None,
    fallback: str,
    evaluators: Evaluators,
    metrics: Collection[str],
    pl_module: L.LightningModule,
    datamodule: Any,
    device: torch.device,
    pretrained_clip: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load the feature extractor (``extractor``) and evaluators (``oracle``, ``clip``) that
    the evaluation of ``pl_module`` on ``datamodule`` needs (building a missing one first).

    ``pretrained_clip`` (``{"name": <local folder or Hub name>, "allow_download": bool}``): the
    CLIP of the CLIP score (and of ``features: clip``) is that pretrained Hugging Face CLIP
    (:class:`genlab.metrics.pretrained_clip.PretrainedCLIP`) instead of genlab's checkpoint.
    """
    tools: dict[str, Any] = {}
    kind = features
    if kind in ("auto", "inception"):
        weights = find_inception_weights(inception_weights)
        looked = ", ".join(str(p) for p in inception_weights_candidates(inception_weights))
        if weights is not None:
            tools["extractor"] = InceptionV3(weights, device=device)
            kind = "inception"
        elif kind == "inception":
            raise FileNotFoundError(
                f"features=inception but no Inception weights were found (looked at {looked});"
                " put torch-fidelity's weights-inception-2015-12-05-6726825d.pth there, or "
                "use features=auto / shapes_oracle"
            )
        else:
            kind = fallback
            log.warning(
                f"Inception-v3 weights not found (looked at {looked}): FID/KID/IS/PR use the "
                f"offline evaluator '{kind}' instead. These numbers are NOT comparable with "
                "published Inception FIDs; the protocol names the extractor."
            )
    on_shapes = getattr(datamodule, "name", None) == "shapes"
    if kind == "shapes_oracle" and not on_shapes:
        log.warning(
            f"no feature extractor for {type(datamodule).__name__}: the shapes oracle "
            "reads only shapes images. FID/KID/IS/PR are skipped; give Inception weights "
            "(callbacks.generative_metrics.inception_weights=...) or fallback=clip with a "
            "CLIP trained on this data"
        )
        kind = None
    wanted_oracle = kind == "shapes_oracle" or (
        "caption" in metrics
        and (text_model(pl_module) or reconstructs(pl_module))
        and evaluators["shapes_oracle"][0] is not None
        and on_shapes
    )
    if wanted_oracle:
        tools["oracle"] = load_evaluator("shapes_oracle", evaluators, device)
    has_clip = evaluators["clip"][0] is not None or bool(pretrained_clip)
    wanted_clip = kind == "clip" or ("clip" in metrics and text_model(pl_module) and has_clip)
    if wanted_clip and pretrained_clip:
        tools["clip"] = load_pretrained_clip(pretrained_clip, device)
    elif wanted_clip:
        tools["clip"] = load_evaluator("clip", evaluators, device)
    if kind == "shapes_oracle":
        tools["extractor"] = tools["oracle"]
    elif kind == "clip":
        tools["extractor"] = CLIPImageFeatures(tools["clip"])
    return tools


def load_evaluator(name: str, evaluators: Evaluators, device: torch.device) -> CheckpointEvaluator:
    """Find (or build) and load an evaluator checkpoint, frozen, on ``device``."""
    checkpoint, recipe = evaluators[name]
    if checkpoint is None:
        raise ValueError(
            f"callbacks.generative_metrics needs the {name} evaluator: set its checkpoint "
            f"({'oracle' if name == 'shapes_oracle' else name}_checkpoint)"
        )
    path = ensure_evaluator(checkpoint, recipe, name=name)  # a lock: one build
    module = genlab.load(path, map_location=device).requires_grad_(False)
    check = getattr(module, "check_evaluator", None)  # its version (the shapes oracle's)
    if callable(check):
        check(path)
    evaluator = CheckpointEvaluator(module, name=name, checkpoint=path)
    log.info(f"{name} evaluator {path} (version {evaluator.version})")
    return evaluator


def load_pretrained_clip(settings: dict[str, Any], device: torch.device):
    """A pretrained Hugging Face CLIP (local files only unless ``allow_download``)."""
    from genlab.metrics.pretrained_clip import PretrainedCLIP

    clip = PretrainedCLIP(
        settings["name"], allow_download=bool(settings.get("allow_download")), device=device
    )
    log.info(f"pretrained CLIP {clip.name} (version {clip.version}) scores text-image agreement")
    return clip


def text_model(pl_module: L.LightningModule) -> bool:
    """Whether the module generates from prompts (the model contract)."""
    return generates(pl_module) and pl_module.condition == "text"
