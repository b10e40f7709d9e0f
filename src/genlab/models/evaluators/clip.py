"""CLIP: contrastive language-image pre-training (Radford et al. 2021), the project's evaluator.

The whole method in one file. An image encoder (``genlab.nn.image_encoder``) and a text
Transformer over a BPE tokenizer trained on the dataset's captions (``genlab.nn.text_encoder``,
its pooled output) are each followed by a linear projection into a shared space of ``embed_dim``
(§2.4) and L2-normalised. For a batch of N (image, caption) pairs the N × N cosine similarities,
times a learned logit scale t = exp(log(1/τ)) clamped at 100 (§2.5), are trained with the
symmetric cross-entropy of Fig. 3: each image must pick its caption among the batch's captions,
and each caption its image.

Notation (Fig. 3): I_e, T_e the normalised image and text embeddings (N, d_e); t the logit scale;
logits = t · I_e T_eᵀ (N, N), row i = image i, column j = text j.

Duplicate captions. Several items of a batch can share one caption text (often on ``shapes``,
whose captions are drawn from a small grammar). Fig. 3's targets would then push an image away
from its own caption's copies. Here the targets treat identical texts as positives: each row's
cross-entropy takes the uniform distribution over the columns with the same text (and likewise
per column). Without duplicates this is exactly Fig. 3's loss. A copy of a scene under another
caption template remains a negative: whether two texts mean the same is not known in general.

Evaluation runs in float32 without autocast, like ``encode_images`` / ``encode_texts``. It
gathers the embeddings of the whole split (``SplitEmbeddings``: torchmetrics cat states synced
over ranks, sorted and de-duplicated by the items' ``index``) and reports, for that split:
``loss`` (the symmetric InfoNCE with every caption of the split as a negative, so it does not
depend on batching or ranks; larger than ``train/loss``, whose negatives are one batch),
retrieval accuracy ``i2t_top1``, ``i2t_top5``, ``t2i_top1``, ``t2i_top5`` (a retrieved caption,
or the caption of a retrieved image, is right if its TEXT equals the query's caption), and
``clip_score`` = 100 · mean max(cos, 0) of the matched pairs (Hessel et al. 2021 use w = 2.5
with OpenAI's CLIP; w = 100 is the torchmetrics convention).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from genlab.data.tokenizer import TOKENIZER_KEY, BPETokenizer, train_for_datamodule
from genlab.diffusion.denoiser import broadcast
from genlab.diffusion.parametrization import q_sample
from genlab.diffusion.schedules import Schedule, ScheduleName
from genlab.models.contract import captions_of, check_prompts
from genlab.utils.images import check_images
from genlab.utils.lr_schedule import optimizers

MAX_LOGIT_SCALE = 100.0  # §2.5: "clipped to prevent scaling the logits by more than 100"
ENCODE_BATCH = 256  # most items encoded at once by encode_images / encode_texts


class CLIP(L.LightningModule):
    """A contrastive image-text model: encoders, projections and a learned temperature.

    Args:
        image_encoder: images (B, C, H, W) → features (B, image_encoder.out_dim).
        text_encoder: token ids and mask → (tokens, pooled (B, text_encoder.width)), with
            ``vocab_size`` and ``context_length`` attributes (``TransformerTextEncoder``).
        embed_dim: width d_e of the shared embedding space.
        optimizer: partial optimizer, called with two parameter groups: the weights (decayed)
            and the gains, biases and logit scale (no weight decay, as in CLIP).
        lr_scheduler: partial scheduler called with ``(optimizer, total_steps=...)``, or None.
        image_size, channels: the shape of the images the model reads.
        tokenizer_vocab_size: BPE vocabulary size, at most the text encoder's embedding rows.
        init_temperature: τ at initialisation (0.07 as in CLIP, after Wu et al. 2018); the
            model learns log(1/τ), and the logit scale 1/τ is clamped at 100.
        noise_aware: GLIDE's noised CLIP (Nichol et al. 2022, §2.3): the image encoder reads
            x_t and the model time t (a timestep-conditioned encoder such as
            ``genlab.nn.classifier.NoisyClassifierNet``), trained on images noised at uniformly
            drawn t of the schedule below (evaluation: t and ε seeded by each item's index);
            ``guidance_grad`` then gives the gradient that CLIP guidance follows.
        schedule, num_timesteps, continuous_time, log_snr_shift: that noise schedule, the one
            of the diffusion models it will guide (``genlab.diffusion.schedules.Schedule``).
    """

    capabilities = frozenset()  # the model contract (genlab.models.contract)

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        embed_dim: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        image_size: int,
        channels: int = 3,
        tokenizer_vocab_size: int,
        init_temperature: float = 0.07,
        noise_aware: bool = False,
        schedule: ScheduleName = "cosine",
        num_timesteps: int = 1000,
        continuous_time: bool = False,
        log_snr_shift: float = 0.0,
    ):
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"model.embed_dim={embed_dim} must be at least 1")
        if not init_temperature >= 1 / MAX_LOGIT_SCALE:  # also rejects NaN
            raise ValueError(
                f"model.init_temperature={init_temperature} must be at least "
                f"{1 / MAX_LOGIT_SCALE} (the logit scale 1/τ is clamped at {MAX_LOGIT_SCALE:g})"
            )
        if tokenizer_vocab_size > text_encoder.vocab_size:
            raise ValueError(
                f"model.tokenizer_vocab_size={tokenizer_vocab_size} exceeds "
                f"model.text_encoder.vocab_size={text_encoder.vocab_size}"
            )
        if not hasattr(image_encoder, "out_dim"):
            raise ValueError(
                f"model.image_encoder ({type(image_encoder).__name__}) must say its feature "
                "width as an out_dim attribute (e.g. genlab.nn.image_encoder.ImageEncoder)"
            )
        if noise_aware and not hasattr(image_encoder, "time_embed"):
            raise ValueError(
                "model.noise_aware=true needs an image encoder that reads the model time t "
                "(genlab.nn.classifier.NoisyClassifierNet; experiment=clip_noisy_shapes)"
            )
        self.noise_aware = noise_aware
        self.schedule = (
            Schedule(
                schedule, num_timesteps, continuous=continuous_time, log_snr_shift=log_snr_shift
            )
            if noise_aware
            else None
        )
        self.image_size, self.channels = image_size, channels
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        # §2.4: "only a linear projection to map from each encoder's representation to the
        # multi-modal embedding space"
        self.image_projection = nn.Linear(image_encoder.out_dim, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_encoder.width, embed_dim, bias=False)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.metrics = nn.ModuleDict({"val": SplitEmbeddings(), "test": SplitEmbeddings()})
        self.tokenizer: BPETokenizer | None = None

    # ----------------------------------------------------------------------------------------
    # the embeddings
    def logit_scale(self) -> torch.Tensor:
        """t = 1/τ, at most 100 (§2.5)."""
        return self.log_logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def embed_images(self, images: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """I_e: L2-normalised embeddings (B, d_e) of images (B, C, H, W), float32 (float64 for
        float64 images); a noise-aware CLIP reads them as x_t at model times t (None: t = 0)."""
        if self.noise_aware:
            if t is None:
                t = torch.zeros(len(images), device=images.device)
            features = self.image_encoder(images, t.reshape(-1).expand(len(images)))
        else:
            features = self.image_encoder(images)
        dtype = torch.promote_types(images.dtype, torch.float32)
        return F.normalize(self.image_projection(features).to(dtype), dim=-1)

    def noised(
        self, images: torch.Tensor, generators: list[torch.Generator] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x_t, t) of a noise-aware CLIP's training or evaluation batch: t uniform on the
        schedule and x_t = √ᾱ x + √(1-ᾱ) ε, from the global RNG or one generator per item;
        (images, None) for a plain CLIP."""
        if not self.noise_aware:
            return images, None
        if generators is None:
            t = self.schedule.sample_t(len(images), device=self.device)
            eps = torch.randn(images.shape, device=self.device)
        else:
            t = torch.cat([self.schedule.sample_t(1, generator=g) for g in generators])
            eps = torch.stack([torch.randn(images.shape[1:], generator=g) for g in generators])
            t, eps = t.to(self.device), eps.to(self.device)
        alpha_bar = broadcast(self.schedule.alpha_bar(t), images)
        return q_sample(images.float(), eps, alpha_bar), t

    def guidance_grad(
        self, texts: list[str]
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``grad(x_t, t)`` = ∇_{x_t} f(x_t, t) · g(c) per row, the cosine of the noisy image's
        and its text's embeddings: what CLIP guidance follows (GLIDE, Nichol et al. 2022, §2.3),
        shaped like x_t, one text per row. Needs a noise-aware CLIP. Eval mode, float32 without
        autocast (float64 for float64 inputs), autograd on inside ``no_grad`` sampling loops."""
        if not self.noise_aware:
            raise ValueError(
                "CLIP guidance needs a noise-aware CLIP (model.noise_aware=true, python "
                "src/train.py experiment=clip_noisy_shapes): this CLIP only reads clean images"
            )
        text_emb = self.encode_texts(list(texts))  # (B, d_e), checked prompts
        self.eval()

        def grad(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if len(x_t) != len(text_emb):
                raise ValueError(f"CLIP guidance: {len(x_t)} images for {len(text_emb)} texts")
            dtype = torch.promote_types(x_t.dtype, torch.float32)
            with torch.enable_grad(), torch.autocast(self.device.type, enabled=False):
                x = x_t.detach().to(self.device, dtype).requires_grad_(True)
                times = torch.as_tensor(t, device=self.device).reshape(-1).expand(len(x))
                similarity = (self.embed_images(x, times) * text_emb.to(dtype)).sum()
                (g,) = torch.autograd.grad(similarity, x)  # rows are independent: sum is fine
            return g.to(x_t.device, x_t.dtype)

        return grad

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """T_e: L2-normalised float32 embeddings (B, d_e); long texts are truncated."""
        if self.tokenizer is None:
            raise RuntimeError("the CLIP tokenizer is not trained: fit the model or load a ckpt")
        ids, mask = self.tokenizer.encode(texts, context_length=self.text_encoder.context_length)
        _, pooled = self.text_encoder(ids.to(self.device), mask.to(self.device))  # (B, width)
        return F.normalize(self.text_projection(pooled).float(), dim=-1)

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Eval mode, no gradients, float32 without autocast; the previous mode restored after."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                yield
        finally:
            self.train(was_training)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings (B, embed_dim) of images (B, C, H, W) in [-1, 1], in float32
        on the module's device, whatever the caller's precision or autocast.

        Raises:
            ValueError: images of another shape, outside [-1, 1], or not finite.
        """
        check_images(images, name="CLIP input", channels=self.channels, size=self.image_size)
        with self.inference():
            chunks = images.to(self.device, torch.float32).split(ENCODE_BATCH)
            return torch.cat([self.embed_images(chunk) for chunk in chunks])

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised embeddings (B, embed_dim) of texts, in float32 on the module's device.

        Texts longer than the text encoder's context are truncated (one warning per model).

        Raises:
            ValueError: an empty list, a non-string or an empty (whitespace-only) text; the
                message names its position.
        """
        check_prompts(texts, "text")
        with self.inference():
            chunks = [texts[i : i + ENCODE_BATCH] for i in range(0, len(texts), ENCODE_BATCH)]
            return torch.cat([self.embed_texts(chunk) for chunk in chunks])

    def similarity(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Cosine similarity (B,) of each image with its text (the matched pairs)."""
        check_prompts(texts, "text")
        if len(texts) != len(images):
            raise ValueError(
                f"similarity needs one text per image: {len(images)} images, {len(texts)} texts"
            )
        return (self.encode_images(images) * self.encode_texts(texts)).sum(dim=-1)

    # ----------------------------------------------------------------------------------------
    # training
    def setup(self, stage: str) -> None:
        """Check the data's shape; train the BPE tokenizer on its captions (once; rank 0's)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        resolution = getattr(datamodule, "resolution", self.image_size)
        channels = getattr(datamodule, "channels", self.channels)
        if (resolution, channels) != (self.image_size, self.channels):
            raise ValueError(
                f"model.image_size={self.image_size}, model.channels={self.channels}, but the "
                f"dataset yields {channels}-channel images of {resolution} px: make them match"
            )
        if self.tokenizer is None:
            self.tokenizer = train_for_datamodule(
                datamodule,
                self.trainer.strategy,
                vocab_size=self.tokenizer_vocab_size,
                max_vocab_size=self.text_encoder.vocab_size,
                model="clip",
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint[TOKENIZER_KEY] = self.tokenizer.to_json()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if TOKENIZER_KEY in checkpoint:
            self.tokenizer = BPETokenizer.from_json(checkpoint[TOKENIZER_KEY])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        captions = captions_of(batch)
        x, t = self.noised(batch["image"])
        image_emb, text_emb = self.embed_images(x, t), self.embed_texts(captions)
        ids = caption_ids(captions).to(self.device)
        if self.trainer.world_size > 1:  # negatives from every rank's batch, as CLIP does
            image_emb = self.all_gather(image_emb, sync_grads=True).flatten(0, 1)  # (W·B, d_e)
            text_emb = self.all_gather(text_emb, sync_grads=True).flatten(0, 1)
            ids = self.all_gather(ids).flatten(0, 1)  # (W·B,)
        with torch.autocast(self.device.type, enabled=False):  # logits up to 100 in float32
            logits = self.logit_scale() * image_emb @ text_emb.T  # (N, N)
            loss = contrastive_loss(logits, ids[:, None] == ids[None, :]).mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", self.logit_scale())
        return loss

    def configure_optimizers(self):
        # CLIP decays every weight but the gains, biases and the temperature (as open_clip)
        named = list(self.named_parameters())
        groups = [
            {"params": [p for _, p in named if p.ndim >= 2]},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
        ]
        return optimizers(self.optimizer_factory, self.lr_scheduler_factory, groups, self.trainer)

    # ----------------------------------------------------------------------------------------
    # evaluation: over the whole split, in float32
    def evaluation_update(self, stage: str, batch: dict[str, Any]) -> None:
        captions = captions_of(batch)
        gens = [torch.Generator().manual_seed(int(i)) for i in batch["index"]]
        x, t = self.noised(batch["image"].float(), gens if self.noise_aware else None)
        with torch.autocast(self.device.type, enabled=False):
            image_emb = self.embed_images(x.float(), t)
            text_emb = self.embed_texts(captions)
        ids = caption_ids(captions).to(self.device)
        self.metrics[stage].update(image_emb, text_emb, ids, batch["index"], self.logit_scale())

    def log_split_metrics(self, stage: str) -> None:
        results = self.metrics[stage].compute()
        self.metrics[stage].reset()
        for name, value in results.items():  # equal on every rank: the sync is a no-op mean
            prog_bar = name in ("loss", "i2t_top1")
            self.log(f"{stage}/{name}", value, sync_dist=True, prog_bar=prog_bar)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_update("val", batch)

    def on_validation_epoch_end(self) -> None:
        self.log_split_metrics("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_update("test", batch)

    def on_test_epoch_end(self) -> None:
        self.log_split_metrics("test")


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Per-pair symmetric InfoNCE (Radford et al. 2021, Fig. 3) with several positives per row.

    Args:
        logits: (N, N) scaled similarities, row i = image i, column j = text j.
        positives: (N, N) bool, True where text j describes image i; a symmetric relation
            holding on the diagonal (identical caption texts).

    Returns:
        (N,): for pair i, the mean of the image-to-text cross-entropy of row i and the
        text-to-image cross-entropy of column i, each against the uniform distribution over its
        positives. With only the diagonal positive it is Fig. 3's ``(loss_i + loss_t) / 2``.
    """
    targets = positives.float() / positives.sum(dim=1, keepdim=True)  # (N, N), rows sum to 1
    loss_i = -(targets * logits.log_softmax(dim=1)).sum(dim=1)  # image i → its texts
    loss_t = -(targets.T * logits.T.log_softmax(dim=1)).sum(dim=1)  # text i → its images
    return (loss_i + loss_t) / 2


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ids: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> dict[str, torch.Tensor]:
    """Loss, retrieval accuracy and CLIP score of N matched pairs (see the module doc).

    Args:
        image_emb, text_emb: (N, d_e) normalised embeddings; row i of both is item i.
        ids: (N,) caption identity (``caption_ids``): a retrieval is right if the ids match.
        logit_scale: t, for the loss.
    """
    sims = image_emb @ text_emb.T  # (N, N) cosine of image i, text j
    same = ids[:, None] == ids[None, :]  # (N, N), symmetric
    k = min(5, len(ids))
    i2t = sims.topk(k, dim=1).indices  # (N, k): texts retrieved by each image
    t2i = sims.topk(k, dim=0).indices.T  # (N, k): images retrieved by each text
    hit_i2t, hit_t2i = same.gather(1, i2t), same.gather(1, t2i)  # (N, k)
    return {
        "loss": contrastive_loss(logit_scale * sims, same).mean(),
        "i2t_top1": hit_i2t[:, 0].float().mean(),
        "i2t_top5": hit_i2t.any(dim=1).float().mean(),
        "t2i_top1": hit_t2i[:, 0].float().mean(),
        "t2i_top5": hit_t2i.any(dim=1).float().mean(),
        "clip_score": 100 * sims.diagonal().clamp(min=0).mean(),
    }


class SplitEmbeddings(Metric):
    """The embeddings of a whole split, gathered over ranks, and their ``retrieval_metrics``.

    Cat states hold each item's image and text embeddings, caption id and ``index``; ``compute``
    sorts them by index and drops repeats (a distributed sampler pads ranks with repeated
    items), so the figures are the same on any number of ranks and for any batching.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        for name in ("image_emb", "text_emb", "ids", "index"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("logit_scale", default=torch.tensor(0.0), dist_reduce_fx="max")

    def update(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        ids: torch.Tensor,
        index: torch.Tensor,
        logit_scale: torch.Tensor | float,
    ) -> None:
        self.image_emb.append(image_emb.detach().float())
        self.text_emb.append(text_emb.detach().float())
        self.ids.append(ids.to(self.device, torch.int64))
        self.index.append(torch.as_tensor(index, device=self.device, dtype=torch.int64))
        self.logit_scale = torch.as_tensor(logit_scale, device=self.device).detach().float()

    def compute(self) -> dict[str, torch.Tensor]:
        index, order = dim_zero_cat(self.index).sort(stable=True)
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]  # the first copy of each item
        order = order[first]
        image_emb, text_emb, ids = (
            dim_zero_cat(s)[order] for s in (self.image_emb, self.text_emb, self.ids)
        )
        return retrieval_metrics(image_emb, text_emb, ids, self.logit_scale)


def caption_ids(captions: Sequence[str]) -> torch.Tensor:
    """A stable int64 identity (BLAKE2b, not the salted ``hash``) of each caption text, (B,)."""
    digests = [hashlib.blake2b(c.encode("utf-8"), digest_size=8).digest() for c in captions]
    return torch.tensor([int.from_bytes(d, "little", signed=True) for d in digests])
