"""Small pieces of sampling that the diffusion models share: the starting noise, inpainting
and SDEdit inputs, negative prompts and the spherical interpolation of embeddings."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from genlab.models.diffusion.conditioners import (
    Conditions,
    ImageEmbedConditioner,
    LabelConditioner,
    LowResConditioner,
    TextConditioner,
    take,
)


def initial_noise(
    shape: tuple[int, ...], x_T: torch.Tensor | None, generator: torch.Generator | None
) -> torch.Tensor:
    """x_T ~ N(0, I) of ``shape`` drawn from ``generator`` (on its device), or the given ``x_T``
    (1 or N rows) expanded to it."""
    if x_T is None:
        noise_device = "cpu" if generator is None else generator.device
        return torch.randn(shape, generator=generator, device=noise_device)  # (N, C, H, W)
    if x_T.dim() != len(shape) or x_T.shape[1:] != shape[1:] or len(x_T) not in (1, shape[0]):
        raise ValueError(
            f"x_T of shape {tuple(x_T.shape)} must be (1 or {shape[0]}, "
            f"{', '.join(map(str, shape[1:]))})"
        )
    return x_T.float().expand(shape)


def check_inpainting(known, mask, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """``known`` and ``mask`` as float tensors that broadcast to the images drawn."""
    if mask is None:
        raise ValueError("inpainting needs a mask (1 = keep the known pixels) with known")
    known, mask = torch.as_tensor(known).float(), torch.as_tensor(mask).float()
    if known.dim() != 4 or known.shape[1:] != shape[1:] or len(known) not in (1, shape[0]):
        raise ValueError(
            f"known image shape {tuple(known.shape)} must be (1 or {shape[0]}, {shape[1]}, "
            f"{shape[2]}, {shape[3]})"
        )
    try:
        torch.broadcast_shapes(mask.shape, known.shape)
    except RuntimeError as err:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not fit {tuple(known.shape)}"
        ) from err
    return known, mask


def check_clip_guidance(model: Any, clip: Any, scale: float | None, conditions) -> list | None:
    """The caption of every image to draw when CLIP guidance is on (None when off), or a
    ValueError naming what does not fit."""
    if clip is None:
        if scale is not None:
            raise ValueError(f"clip_guidance_scale={scale} needs a noise-aware CLIP: pass clip=")
        return None
    if scale is None:
        raise ValueError("clip= guides with a scale: pass clip_guidance_scale= too")
    if "clip_guidance" not in model.capabilities:
        raise ValueError(
            f"CLIP guidance is not available for model={model.config_name}: it guides "
            "text-conditional diffusion models in pixel space"
        )
    if not getattr(clip, "noise_aware", False):
        raise ValueError(
            "CLIP guidance needs a noise-aware CLIP (model.noise_aware=true, python src/train.py "
            "experiment=clip_noisy_shapes): this CLIP only reads clean images"
        )
    clip.schedule.check_same(model.schedule, "noise-aware CLIP")
    size = (clip.channels, clip.image_size)
    if size != (model.channels, model.image_size):
        raise ValueError(
            f"the CLIP reads {clip.channels}-channel images of {clip.image_size} px; this model "
            f"draws {model.channels}-channel images of {model.image_size} px"
        )
    return list(conditions["caption"])


DEFAULT_STRENGTH = 0.75  # SDEdit's strength when an init_image comes without one


def check_edit(model: Any, init_image, strength, shape) -> torch.Tensor | None:
    """The SDEdit input as a float tensor that broadcasts to the images drawn (None without
    one), or a ValueError naming what does not fit."""
    if init_image is None:
        if strength is not None:
            raise ValueError(f"strength={strength} edits an init_image: pass init_image= too")
        return None
    if "img2img" not in model.capabilities:
        raise ValueError(
            f"init_image= (SDEdit) is not available for model={model.config_name}: a "
            "super-resolution stage draws from its low-resolution input"
        )
    if strength is not None and not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength={strength} must be in [0, 1] (0: the input, 1: from noise)")
    init = torch.as_tensor(init_image).float()
    if init.dim() != 4 or init.shape[1:] != shape[1:] or len(init) not in (1, shape[0]):
        raise ValueError(
            f"init_image of shape {tuple(init.shape)} must be (1 or {shape[0]}, "
            f"{', '.join(map(str, shape[1:]))}), in [-1, 1]"
        )
    return init


def edit_start(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ x0 + √(1-ᾱ) ε at the first time of an SDEdit grid (``alpha_bar`` of shape (1,))."""
    a = float(alpha_bar[0])
    return math.sqrt(a) * x0 + math.sqrt(1 - a) * noise


def interpolation_embeddings(embedder: Any, images: Any, n: int | None, device) -> torch.Tensor:
    """``n`` (default 8, at least 2) unit embeddings along the slerp from the first of two images'
    CLIP embeddings to the second's."""
    images = torch.as_tensor(images).float()
    if len(images) != 2:
        raise ValueError(f"interpolation needs exactly two images, got {len(images)}")
    steps = 8 if n is None else n
    if steps < 2:
        raise ValueError(f"n={steps}: an interpolation needs at least its two ends")
    z = embedder.embed_images(images.to(device)).cpu()
    return slerp(z[0], z[1], torch.linspace(0, 1, steps))


def slerp(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of unit vectors a, b (d,) at ``weights`` (n,) in [0, 1] → (n, d)
    unit vectors; linear (then normalised) when a and b are (anti)parallel."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    w = weights.float()[:, None]
    theta = torch.arccos((a * b).sum().clamp(-1.0, 1.0))
    if torch.sin(theta).abs() < 1e-6:
        return F.normalize((1 - w) * a + w * b, dim=-1)
    mixed = (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)
    return F.normalize(mixed, dim=-1)


def generation_conditions(model: Any, request: dict[str, Any], generator) -> tuple[Conditions, int]:
    """The conditions of every image to draw, and how many images that is."""
    classifier = request["classifier"]
    if classifier is not None:
        check_classifier(model, classifier, request["labels"])
    embed = model.conditioner(ImageEmbedConditioner)
    if embed is not None and classifier is not None:
        raise ValueError("classifier: not available for the unCLIP decoder")
    if embed is None and request["image_embeds"] is not None:
        raise ValueError("image_embeds: this model reads no CLIP image embedding")
    per_row = request["n"] or 1
    conditions: Conditions = {}
    if embed is not None:  # one source row per embedding, captions optional
        conditions = embed.for_embeddings(request["image_embeds"], model.device)
        sources = len(conditions["image_embed"])
        prompts = request["prompts"]
        if model.condition == "text":
            if prompts is not None and (isinstance(prompts, str) or len(prompts) != sources):
                raise ValueError(
                    f"pass one prompt per image embedding ({sources}) as a list, or none"
                )
            captions = [""] * sources if prompts is None else list(prompts)
            if prompts is not None:
                TextConditioner.for_prompts(prompts, 1)  # the prompt check
            conditions["caption"] = captions
        elif prompts is not None:
            raise ValueError("this decoder reads no caption: leave prompts out")
        conditions = take(conditions, [i for i in range(sources) for _ in range(per_row)])
    elif model.condition == "text":
        conditions = TextConditioner.for_prompts(request["prompts"], per_row)
    elif model.condition == "label" and classifier is None:
        found = model.conditioner(LabelConditioner)
        conditions = found.for_labels(request["labels"], request["n"], generator)
    elif classifier is not None:
        conditions = {}
        rows = len(torch.as_tensor(request["labels"]).reshape(-1))
        if model.condition == "label":
            conditions = model.conditioner(LabelConditioner).for_labels(
                request["labels"], None, generator
            )
        return conditions, rows
    elif request["n"] is None or request["n"] < 1:
        raise ValueError(f"this model is unconditional: pass n >= 1 (got n={request['n']})")
    rows = next((len(v) for v in conditions.values()), request["n"])
    low_res = model.conditioner(LowResConditioner)
    if low_res is not None:
        conditions |= low_res.for_images(
            request["low_res"],
            rows,
            model.channels,
            request["aug_level"],
            generator,
            model.device,
        )
    elif request["low_res"] is not None:
        raise ValueError("low_res: this model is not a super-resolution stage")
    return conditions, rows


def check_arguments(condition, text_encoder, num_classes, cond_drop_prob, space, bpd_images):
    """The constructor's argument checks, in words."""
    if condition == "text" and text_encoder is None:
        raise ValueError("model.condition='text' needs a model.text_encoder")
    if condition == "label" and not num_classes:
        raise ValueError("model.condition='label' needs model.num_classes")
    if condition not in ("text", "label", "none"):
        raise ValueError(f"model.condition={condition!r} is not one of ['label', 'none', 'text']")
    if not 0.0 <= cond_drop_prob < 1.0:
        raise ValueError(f"model.cond_drop_prob={cond_drop_prob} must be in [0, 1)")
    if bpd_images and not space.pixel_space:
        raise ValueError("model.bpd_images: bits/dim is a pixel-space bound; set it to 0")


def check_classifier(model: Any, classifier: Any, labels: Any) -> None:
    """Classifier guidance needs a label or unconditional model, labels and the same schedule."""
    if model.condition == "text":
        raise ValueError("classifier guidance needs a label-conditional or unconditional model")
    if labels is None:
        raise ValueError("classifier guidance needs labels: the classes to guide towards")
    classifier.check_schedule(model.schedule)
    wanted = torch.as_tensor(labels).long()
    if wanted.min() < 0 or wanted.max() >= classifier.num_classes:
        raise ValueError(
            f"labels must be in [0, {classifier.num_classes}) for the classifier; "
            f"got {wanted.tolist()}"
        )


def negative_captions(
    model: Any, negative: str | list[str], prompts: Any, n: int | None, guidance_scale: float
) -> list[str]:
    """One negative caption per image to draw (prompt-major, ``n`` per prompt, as the prompts'
    rows), or a ValueError naming what does not fit."""
    if "negative_prompt" not in model.capabilities:
        raise ValueError(
            f"negative_prompt: model={model.config_name} has no caption for it to replace "
            "(text-conditional diffusion models only)"
        )
    if not model.guided(guidance_scale):
        raise ValueError(
            f"negative_prompt needs classifier-free guidance: guidance_scale={guidance_scale} "
            "draws from the conditional model alone and would ignore it"
        )
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    per_row = n or 1
    if isinstance(negative, str):
        return [negative] * (len(prompts) * per_row)
    negative = list(negative)
    if len(negative) != len(prompts):
        raise ValueError(
            f"negative_prompt: {len(negative)} negative prompts for {len(prompts)} prompts; give "
            "one for all or one per prompt"
        )
    return [neg for neg in negative for _ in range(per_row)]
