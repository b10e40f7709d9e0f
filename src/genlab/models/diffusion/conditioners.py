"""Conditioners: what a diffusion model is conditioned on, each an ``nn.Module`` injected into
:class:`~genlab.models.diffusion.model.DiffusionModel`.

A conditioner turns *conditions* — a flat dict of per-image entries, lists or tensors with one row
per image (``caption``: list[str], ``label``: (B,), ``low_res``/``aug_level``, ``image_embed``/
``embed_drop``) — into the network's keyword inputs (``context``, ``context_mask``, ``cond``,
``labels``, ``low_res``, ``aug_level``), and knows its own *null* condition, which classifier-free
guidance (``genlab.diffusion.guidance``) pairs with the conditional one:

| conditioner | reads | network inputs | null | dropped in training |
| --- | --- | --- | --- | --- |
| :class:`TextConditioner` | ``caption`` | tokens, mask, pooled | ``""`` | the model's ``cond_drop_prob`` |
| :class:`LabelConditioner` | ``label`` | ``labels`` | ``num_classes`` | the model's ``cond_drop_prob`` |
| :class:`LowResConditioner` | ``low_res``, ``aug_level`` | the same | itself | never |
| :class:`ImageEmbedConditioner` | ``image_embed``, ``embed_drop`` | 4 context tokens + vector | learned null | its own ``drop_prob`` |

Conditioners that produce context tokens are merged by :func:`merge_inputs`: tokens concatenated,
pooled vectors summed (the unCLIP decoder reads caption and CLIP embedding together).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genlab.data.text_cache import TextCacheOptions, TextEmbeddingCache
from genlab.data.tokenizer import TOKENIZER_KEY, BPETokenizer, train_for_datamodule
from genlab.diffusion.schedules import cosine_log_snr
from genlab.models.contract import check_prompts
from genlab.nn.unclip import EmbeddingConditioning
from genlab.utils.checkpoint import load_frozen
from genlab.utils.io import file_version
from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

CLIP_KEY = "genlab_unclip_clip"  # the CLIP file an unCLIP model was trained with
Conditions = dict[str, Any]  # name -> list (one entry per image) or tensor (rows = images)


class Shared:
    """A value that every copy of its module shares: ``copy.deepcopy`` (the EMA copy of the
    denoiser) returns it as is. Holds frozen networks and the trained tokenizer."""

    def __init__(self, value: Any = None):
        self.value = value

    def __deepcopy__(self, memo: dict) -> Shared:
        return self


def take(conditions: Conditions, rows: slice | list[int]) -> Conditions:
    """The rows ``rows`` of every entry of ``conditions``."""
    out = {}
    for key, value in conditions.items():
        if isinstance(value, torch.Tensor) or isinstance(rows, slice):
            out[key] = value[rows]
        else:
            out[key] = [value[i] for i in rows]
    return out


def merge_inputs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The network inputs of several conditioners as one dict: context tokens concatenated along
    the sequence (a missing mask is all real tokens), pooled vectors summed."""
    merged: dict[str, Any] = {}
    for part in parts:
        if "context" in merged and "context" in part:
            tokens = part["context"]
            ones = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            first = merged["context_mask"]
            second = ones if part["context_mask"] is None else part["context_mask"].bool()
            merged["context"] = torch.cat([merged["context"].to(tokens.dtype), tokens], dim=1)
            merged["context_mask"] = torch.cat([first.bool(), second], dim=1)
            merged["cond"] = merged["cond"].to(part["cond"].dtype) + part["cond"]
        else:
            merged |= part
    return merged


class Conditioner(nn.Module):
    """One kind of condition (module docstring).

    Attributes:
        keys: the entries of the conditions it reads.
        shares_drop: dropped where the model's shared ``cond_drop_prob`` draw says (the caption
            or label); False for conditioners that never drop or draw their own.
        guided: whether classifier-free guidance has a null for it (it takes part in the
            [cond; null] pair); the low-resolution image does not.
    """

    keys: tuple[str, ...] = ()
    shares_drop = False
    guided = True

    def check(self, model: Any) -> None:
        """Refuse a model this conditioner cannot work with (its network, its options)."""

    def setup(self, trainer: Any, model_name: str) -> None:
        """Prepare what needs the data (the text conditioner's tokenizer)."""

    def on_fit_start(self, trainer: Any) -> None:
        """Prepare what training needs, on the training device (the text-embedding cache)."""

    def checkpoint_entries(self) -> dict[str, Any]:
        """What the model's checkpoint keeps of this conditioner outside its ``state_dict``."""
        return {}

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_entries` saved; refuse changed frozen parts."""

    def from_batch(self, batch: dict[str, Any], *, training: bool) -> Conditions:
        """The conditions of a training or evaluation batch."""
        raise NotImplementedError

    def drop(self, conditions: Conditions, drop: torch.Tensor) -> Conditions:
        """``conditions`` with the rows where ``drop`` is True replaced by the null."""
        return conditions

    def null(self, conditions: Conditions) -> Conditions:
        """The null condition for every row of ``conditions``."""
        return conditions

    def forward(self, conditions: Conditions, device: torch.device) -> dict[str, Any]:
        """The network's keyword inputs for ``conditions``."""
        raise NotImplementedError


class TextConditioner(Conditioner):
    """A caption through a text encoder: the trainable Transformer over a BPE tokenizer learnt
    on the training captions at setup, or a frozen pretrained encoder that tokenizes for itself
    (``genlab.nn.pretrained_text``). Null: the empty caption.

    With ``cache`` enabled (``model.text_cache``, frozen encoders only) the distinct training
    captions are encoded once at the start of fit into a memory-mapped store
    (``genlab.data.text_cache``) that :meth:`forward` reads instead of running the encoder.

    Args:
        encoder: maps token ids to (tokens, pooled), or has ``encode(captions)``.
        tokenizer_vocab_size: the BPE vocabulary, at most the encoder's embedding rows.
        cache: the options of :class:`~genlab.data.text_cache.TextCacheOptions`, or None.
    """

    keys = ("caption",)
    shares_drop = True

    def __init__(
        self,
        encoder: nn.Module,
        *,
        tokenizer_vocab_size: int | None = 512,
        cache: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.slot = Shared()  # the BPE tokenizer, shared with the EMA copy
        self.cache_options = TextCacheOptions(**(cache or {}))
        if self.cache_options.enabled and not self.pretrained:
            raise ValueError(
                "model.text_cache.enabled=true caches a frozen text encoder's features, but "
                f"{type(encoder).__name__} is trained with the model: use model/text_encoder="
                "minilm, t5 or clip, or set model.text_cache.enabled=false"
            )
        self.cache_slot = Shared()  # the TextEmbeddingCache, shared with the EMA copy

    @property
    def cache(self) -> TextEmbeddingCache | None:
        return self.cache_slot.value

    @property
    def pretrained(self) -> bool:
        """Whether the encoder is frozen and tokenizes for itself."""
        return callable(getattr(self.encoder, "encode", None))

    @property
    def tokenizer(self) -> BPETokenizer | None:
        return self.slot.value

    @tokenizer.setter
    def tokenizer(self, value: BPETokenizer | None) -> None:
        self.slot.value = value

    def setup(self, trainer: Any, model_name: str) -> None:
        """Train the BPE tokenizer on the training captions (once; rank 0's copy wins)."""
        if self.pretrained or self.tokenizer is not None:
            return
        self.tokenizer = train_for_datamodule(
            trainer.datamodule,
            trainer.strategy,
            vocab_size=self.tokenizer_vocab_size,
            max_vocab_size=self.encoder.vocab_size,
            model=model_name,
        )

    def on_fit_start(self, trainer: Any) -> None:
        """Open (building it first if needed) the text-embedding cache, when enabled."""
        if not self.cache_options.enabled:
            return
        if trainer.fast_dev_run:
            log.info("text cache: not built for a fast_dev_run; encoding each batch instead")
            return
        self.cache_slot.value = TextEmbeddingCache.open(trainer, self.encoder, self.cache_options)

    def checkpoint_entries(self) -> dict[str, Any]:
        return {} if self.tokenizer is None else {TOKENIZER_KEY: self.tokenizer.to_json()}

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if TOKENIZER_KEY in checkpoint:
            self.tokenizer = BPETokenizer.from_json(checkpoint[TOKENIZER_KEY])

    def from_batch(self, batch: dict[str, Any], *, training: bool) -> Conditions:
        return {"caption": list(batch["caption"])}

    def drop(self, conditions: Conditions, drop: torch.Tensor) -> Conditions:
        captions = conditions["caption"]
        return {"caption": ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]}

    def null(self, conditions: Conditions) -> Conditions:
        return {"caption": [""] * len(conditions["caption"])}

    def forward(self, conditions: Conditions, device: torch.device) -> dict[str, Any]:
        captions = conditions["caption"]
        if self.pretrained:
            cache = self.cache
            encoding = (
                self.encoder.encode(captions) if cache is None else cache.encode(captions, device)
            )
            mask = encoding.mask.to(device)
            return {"context": encoding.tokens, "context_mask": mask, "cond": encoding.pooled}
        if self.tokenizer is None:
            raise RuntimeError("the text tokenizer is not trained: call setup() or load a ckpt")
        ids, mask = self.tokenizer.encode(captions, context_length=self.encoder.context_length)
        tokens, pooled = self.encoder(ids.to(device), mask.to(device))
        return {"context": tokens, "context_mask": mask.to(device), "cond": pooled}

    @staticmethod
    def for_prompts(prompts: Any, per_prompt: int) -> Conditions:
        """``per_prompt`` images per prompt, prompt-major."""
        if prompts is None or isinstance(prompts, str):
            raise ValueError("this model is text-conditional: pass prompts as a list of str")
        check_prompts(prompts)
        return {"caption": [p for p in prompts for _ in range(per_prompt)]}


class LabelConditioner(Conditioner):
    """A class label, embedded by the network (``labels``); null: the label ``num_classes``."""

    keys = ("label",)
    shares_drop = True

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def from_batch(self, batch: dict[str, Any], *, training: bool) -> Conditions:
        return {"label": batch["label"]}

    def drop(self, conditions: Conditions, drop: torch.Tensor) -> Conditions:
        return {"label": torch.where(drop, self.num_classes, conditions["label"])}

    def null(self, conditions: Conditions) -> Conditions:
        return {"label": torch.full_like(conditions["label"], self.num_classes)}

    def forward(self, conditions: Conditions, device: torch.device) -> dict[str, Any]:
        return {"labels": conditions["label"].to(device)}

    def for_labels(self, labels: Any, n: int | None, generator) -> Conditions:
        """The given labels (checked), or ``n`` drawn uniformly."""
        if labels is None:
            if n is None:
                raise ValueError("this model is label-conditional: pass labels or n")
            labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        labels = torch.as_tensor(labels).long()
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}); got {labels.tolist()}")
        return {"label": labels}


def build_conditioners(
    condition: str,
    text_encoder: nn.Module | None,
    num_classes: int | None,
    vocab_size: int | None,
    text_cache: dict[str, Any] | None = None,
) -> dict[str, Conditioner]:
    """The conditioner of a model's ``condition``: the caption's through ``text_encoder`` (with
    the text-embedding cache's options), the label's, or none."""
    if condition == "text":
        text = TextConditioner(text_encoder, tokenizer_vocab_size=vocab_size, cache=text_cache)
        return {"text": text}
    if condition == "label":
        return {"label": LabelConditioner(num_classes)}
    return {}


# ----------------------------------------------------------------------------------------------
# the low-resolution image of a super-resolution stage
def augmentation_alpha_bar(level: torch.Tensor) -> torch.Tensor:
    """ᾱ(s) of the noise-conditioning augmentation: the cosine schedule at continuous time s."""
    return torch.sigmoid(cosine_log_snr(level.clamp(0.0, 1.0)))


def corrupt(images: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_s = √ᾱ(s) x + √(1 − ᾱ(s)) ε per sample; level (B,), images and noise (B, C, H, W)."""
    alpha_bar = augmentation_alpha_bar(level).to(images.dtype)[:, None, None, None]
    return alpha_bar.sqrt() * images + (1 - alpha_bar).sqrt() * noise


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image (B, C, H, W) blurred by a separable Gaussian of its own std ``sigma`` (B,) in
    pixels, reflect-padded, the kernel cut at 3σ of the largest; σ = 0 is the identity exactly."""
    sigma = sigma.float().to(images.device)
    if not bool((sigma > 0).any()):
        return images
    b, c, h, w = images.shape
    radius = min(max(1, math.ceil(3 * float(sigma.max()))), min(h, w) - 1)
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    safe = sigma.clamp(min=1e-6)[:, None]
    kernel = torch.exp(-0.5 * (offsets[None] / safe) ** 2)
    kernel = torch.where(sigma[:, None] > 0, kernel, (offsets == 0).float()[None])
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B·C, K)
    x = images.float().reshape(1, b * c, h, w)
    x = F.conv2d(
        F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c
    )
    x = F.conv2d(
        F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c
    )
    return x.reshape(b, c, h, w).to(images.dtype)


AUGMENTATIONS = ("noise", "blur", "both")


class LowResConditioner(Conditioner):
    """The low-resolution image of a super-resolution stage with conditioning augmentation
    (Ho et al. 2021, CDM §3.2, §4.2; Saharia et al. 2022, Imagen §2.5): downsampled (area),
    upsampled (bilinear) to the stage's size and corrupted at a level s that the network is told;
    s ~ U(0, ``aug_max``) in training, ``sample_aug_level`` otherwise. The corruption
    (``augmentation``) is the forward process at s (``noise``), a Gaussian blur of std
    s · ``blur_sigma`` pixels (``blur``, CDM's blur augmentation), or the blur then the noise
    (``both``); level 0 is the clean upsampled image. Never dropped: both halves of guidance see
    the same image.

    Args:
        low_res_size: the side of the low-resolution input.
        image_size: the side of the stage's output.
        aug_max: training levels are drawn from U(0, aug_max).
        sample_aug_level: the level at sampling and evaluation.
        augmentation: ``noise`` | ``blur`` | ``both``.
        blur_sigma: the blur's std (output pixels) at level 1.
    """

    keys = ("low_res", "aug_level")
    guided = False

    def __init__(
        self,
        *,
        low_res_size: int,
        image_size: int,
        aug_max: float = 0.5,
        sample_aug_level: float = 0.1,
        augmentation: str = "noise",
        blur_sigma: float = 2.0,
    ):
        super().__init__()
        if augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"model.conditioners.low_res.augmentation={augmentation!r} is not one of "
                f"{list(AUGMENTATIONS)}"
            )
        if blur_sigma < 0:
            raise ValueError(f"model.conditioners.low_res.blur_sigma={blur_sigma} must be >= 0")
        self.augmentation, self.blur_sigma = augmentation, float(blur_sigma)
        if not 0 < low_res_size < image_size:
            raise ValueError(
                f"model.conditioners.low_res.low_res_size={low_res_size} must be between 0 and "
                f"model.image_size={image_size}: a super-resolution stage needs a smaller input"
            )
        if not (0.0 <= aug_max <= 1.0 and 0.0 <= sample_aug_level <= 1.0):
            raise ValueError(
                f"model.conditioners.low_res.aug_max={aug_max} and sample_aug_level="
                f"{sample_aug_level} must be in [0, 1]"
            )
        self.low_res_size, self.image_size = low_res_size, image_size
        self.aug_max, self.sample_aug_level = aug_max, sample_aug_level

    def check(self, model: Any) -> None:
        net = model.denoiser["net"]
        if getattr(net, "low_res_channels", None) != model.channels or net.aug_embed is None:
            raise ValueError(
                "model.net must read the low-resolution image: set model.net.low_res_channels="
                f"{model.channels} and model.net.aug_level_embedding=true"
            )
        if self.image_size != model.image_size:
            raise ValueError(
                f"model.conditioners.low_res.image_size={self.image_size} must be "
                f"model.image_size={model.image_size}"
            )
        if model.bpd_images:
            raise ValueError("model.bpd_images: bits/dim of a super-resolution stage is not done")

    def downsample(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → (B, C, low, low), area-averaged: what the base stage draws."""
        return F.interpolate(images.float(), size=self.low_res_size, mode="area")

    def upsample(self, low: torch.Tensor) -> torch.Tensor:
        """(B, C, low, low) → (B, C, H, W), bilinear: what the UNet reads beside x_t."""
        size = (self.image_size, self.image_size)
        return F.interpolate(low.float(), size=size, mode="bilinear", align_corners=False)

    def augment(self, up: torch.Tensor, levels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The upsampled images corrupted at their levels (B,) by ``augmentation``."""
        if self.augmentation in ("blur", "both"):
            up = gaussian_blur(up, levels * self.blur_sigma)
        if self.augmentation in ("noise", "both"):
            up = corrupt(up, levels, noise)
        return up

    def from_batch(self, batch: dict[str, Any], *, training: bool) -> Conditions:
        """The augmented, upsampled low-resolution version of a batch's images and its levels;
        in evaluation the noise is seeded by each item's ``index`` (batching-independent)."""
        up = self.upsample(self.downsample(batch["image"]))  # (B, C, H, W)
        n, device = len(up), up.device
        if training:
            levels = torch.rand(n, device=device) * self.aug_max
            noise = torch.randn(up.shape, device=device)
        else:
            levels = torch.full((n,), self.sample_aug_level, device=device)
            gens = [torch.Generator().manual_seed(int(i) + 7919) for i in batch["index"]]
            noise = torch.stack([torch.randn(up.shape[1:], generator=g) for g in gens])
        return {"low_res": self.augment(up, levels, noise.to(device)), "aug_level": levels}

    def forward(self, conditions: Conditions, device: torch.device) -> dict[str, Any]:
        return {"low_res": conditions["low_res"], "aug_level": conditions["aug_level"]}

    def for_images(
        self, low_res: Any, rows: int, channels: int, aug_level: float | None, generator, device
    ) -> Conditions:
        """Conditions from the previous stage's images (rows, C, low, low) in [-1, 1]."""
        expected = (rows, channels, self.low_res_size, self.low_res_size)
        if low_res is None or tuple(low_res.shape) != expected:
            got = None if low_res is None else tuple(low_res.shape)
            raise ValueError(
                f"a super-resolution stage draws from low-resolution images: pass low_res of "
                f"shape {expected} (one per image to draw, prompt-major); got {got}"
            )
        level = self.sample_aug_level if aug_level is None else float(aug_level)
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"aug_level={level} must be in [0, 1]")
        up = self.upsample(low_res.to(device).clamp(-1, 1))
        noise_device = "cpu" if generator is None else generator.device
        noise = torch.randn(up.shape, generator=generator, device=noise_device).to(device)
        levels = torch.full((len(up),), level, device=device)
        return {"low_res": self.augment(up, levels, noise), "aug_level": levels}


# ----------------------------------------------------------------------------------------------
# the CLIP image embedding of the unCLIP decoder
class ImageEmbedConditioner(Conditioner):
    """The CLIP image embedding of the unCLIP decoder (Ramesh et al. 2022, §2.1, after GLIDE):
    ``embed_tokens`` extra context tokens and a vector added to the timestep embedding
    (``genlab.nn.unclip.EmbeddingConditioning``), a learned null replacing it with probability
    ``drop_prob`` in training (the paper: 10%, drawn independently of the caption's drop).

    The frozen CLIP (``clip_ckpt``) is held outside the module tree: not in ``state_dict`` or
    ``parameters``, shared by the EMA copy; the owning model saves its file's SHA-256 and checks it
    on load. Embeddings are unit vectors scaled by √d (unit variance per component).

    Args:
        clip_ckpt: a genlab CLIP checkpoint (``python src/train.py experiment=clip_shapes``).
        embed_tokens: the context tokens the embedding becomes (the paper: 4).
        drop_prob: probability of training on the null embedding.
        context_dim, cond_dim: the network's context-token and pooled-condition widths.
    """

    keys = ("image_embed", "embed_drop")

    def __init__(
        self,
        *,
        clip_ckpt: str,
        embed_tokens: int = 4,
        drop_prob: float = 0.1,
        context_dim: int,
        cond_dim: int,
    ):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(
                f"model.conditioners.image_embed.drop_prob={drop_prob} must be in [0, 1)"
            )
        self.frozen = Shared(load_clip(clip_ckpt))
        self.clip_ckpt, self.clip_version = str(clip_ckpt), file_version(clip_ckpt)
        self.embed_dim = self.clip.image_projection.out_features
        self.embed_scale = math.sqrt(self.embed_dim)
        self.drop_prob = drop_prob
        self.projection = EmbeddingConditioning(
            embed_dim=self.embed_dim,
            tokens=embed_tokens,
            context_dim=context_dim,
            cond_dim=cond_dim,
        )

    @property
    def clip(self) -> nn.Module:
        return self.frozen.value

    def _apply(self, fn, recurse=True):
        self.clip._apply(fn, recurse)  # the frozen CLIP moves with the model
        return super()._apply(fn, recurse)

    def check(self, model: Any) -> None:
        if model.condition == "label":
            raise ValueError("model.condition: an unCLIP decoder reads a caption or nothing")
        if model.bpd_images:
            raise ValueError("model.bpd_images: bits/dim of the unCLIP decoder is not done")

    def checkpoint_entries(self) -> dict[str, Any]:
        return {CLIP_KEY: {"path": self.clip_ckpt, "version": self.clip_version}}

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_clip_version(checkpoint, self.clip_ckpt, self.clip_version)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's unit image embeddings (B, d) of images in [-1, 1] of any size (resized to
        CLIP's with area averaging or bilinear upsampling)."""
        return clip_image_embeddings(self.clip, images)

    def from_batch(self, batch: dict[str, Any], *, training: bool) -> Conditions:
        embeds = self.embed_images(batch["image"])
        if training:
            drop = torch.rand(len(embeds), device=embeds.device) < self.drop_prob
        else:
            drop = torch.zeros(len(embeds), dtype=torch.bool, device=embeds.device)
        return {"image_embed": embeds, "embed_drop": drop}

    def null(self, conditions: Conditions) -> Conditions:
        return conditions | {"embed_drop": torch.ones_like(conditions["embed_drop"])}

    def forward(self, conditions: Conditions, device: torch.device) -> dict[str, Any]:
        z = conditions["image_embed"].to(device).float() * self.embed_scale
        tokens, vector = self.projection(z, conditions["embed_drop"])
        return {"context": tokens, "context_mask": None, "cond": vector}

    def for_embeddings(self, image_embeds: Any, device) -> Conditions:
        """Checked unit embeddings (E, d) with no drop, one row per embedding."""
        if image_embeds is None:
            raise ValueError(
                "the unCLIP decoder draws from CLIP image embeddings: pass image_embeds (E, d), "
                "or sample from prompts with the pair (model=unclip model.prior_ckpt=... "
                "model.decoder_ckpt=...)"
            )
        embeds = torch.as_tensor(image_embeds).float()
        if embeds.dim() != 2 or embeds.shape[1] != self.embed_dim or not len(embeds):
            raise ValueError(
                f"image_embeds of shape {tuple(embeds.shape)} must be (E, {self.embed_dim})"
            )
        if not torch.isfinite(embeds).all():
            raise ValueError("image_embeds holds NaN or infinite values")
        rows = F.normalize(embeds, dim=-1).to(device)
        return {"image_embed": rows, "embed_drop": torch.zeros(len(rows), dtype=torch.bool)}


def check_clip_version(checkpoint: dict[str, Any], path: str, version: str) -> None:
    """Refuse a checkpoint trained with another CLIP file than ``path`` holds now."""
    saved = checkpoint.get(CLIP_KEY, {}).get("version")
    if saved is not None and saved != version:
        raise ValueError(
            f"the CLIP {path} has changed since this model was trained (sha256 {version}, "
            f"trained with {saved}): its embeddings no longer match; put the original file back"
        )


def load_clip(path: str) -> nn.Module:
    """A frozen genlab CLIP with its trained tokenizer, or a clear error."""
    hint = "use a genlab CLIP checkpoint (python src/train.py experiment=clip_shapes)"
    clip = load_frozen(path, key="model.clip_ckpt", needs=("encode_images", "tokenizer"), hint=hint)
    if clip.tokenizer is None:
        raise ValueError(f"model.clip_ckpt={str(path)!r} has no trained tokenizer: {hint}")
    return clip


def clip_image_embeddings(clip: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """CLIP's unit image embeddings (B, d) of images in [-1, 1] of any size."""
    size = clip.image_size
    if images.shape[-1] != size or images.shape[-2] != size:
        mode = "area" if images.shape[-1] > size else "bilinear"
        images = F.interpolate(images.float(), size=(size, size), mode=mode).clamp(-1, 1)
    return clip.encode_images(images).to(images.device)
