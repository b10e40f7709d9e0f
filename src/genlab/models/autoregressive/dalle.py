"""DALL·E (Ramesh et al. 2021): an autoregressive Transformer over [text tokens ; image tokens],
with image tokens from a frozen discrete first stage (a ``dvae`` or ``vqgan`` checkpoint), fast
KV-cached sampling, classifier-free guidance on logits and CLIP reranking.

The stream (§2.2). A caption becomes L BPE tokens framed by [BOS] ... [EOS]; the positions after
[EOS] hold *per-position* pad tokens (pad i at text position i, as in the paper), so the model
always knows how long the caption was. The image becomes the h × w token grid of the frozen first
stage, in raster order. One vocabulary serves the whole stream:

    [0, V)               BPE text tokens          V = tokenizer_vocab_size
    [V, V + L)           the per-position pads    L = text_length
    [V + L, V + L + K)   image codes              K = the first stage's codebook size

Training maximises the likelihood of the stream, with text and image cross-entropies weighted
separately (1/8 and 7/8 in the paper, ``text_loss_weight`` / ``image_loss_weight``): position i
predicts token i + 1; text targets are scored over the text part of the vocabulary and image
targets over the image codes (the other logits are masked out, so an image position cannot put
mass on text tokens). The text loss is averaged over the captions that were kept: with
probability ``cond_drop_prob`` a caption is replaced by the empty caption ([BOS] [EOS] and pads),
which trains the unconditional model that classifier-free guidance needs. Logged per stage:
``text_loss``, ``image_loss`` and the same in bits per token (``text_bpt``, ``image_bpt``).

Sampling (``generate``): the caption's L tokens are read in one pass (the "prefill"), then the N
image tokens are drawn one by one; with the cache (``use_cache``) each new token costs one
position's work instead of a pass over the whole prefix. Each draw takes the image-code logits,
applies guidance ℓ = ℓ_∅ + s (ℓ_c − ℓ_∅) (s = ``guidance_scale``; 1: none), then temperature,
top-k and nucleus (top-p, Holtzman et al. 2020) filtering, and samples from what is left with the
caller's generator (temperature 0: greedy). Prompts × candidates are decoded as one batch (in
chunks of ``sample_batch_size``), and the tokens are decoded to pixels by the first stage.
With ``n_candidates`` = k > ``keep`` = m, the k candidates of each prompt are scored by a CLIP
checkpoint (cosine similarity of image and prompt, ``clip_ckpt``) and the m best are returned,
best first (§2.3: 512 candidates per caption in the paper).

The first stage and CLIP are rebuilt from their checkpoints (``genlab.load``), frozen, kept out of
this model's weights and optimizer, and moved with it; a DALL·E checkpoint stores their paths and
SHA-256, and loading it checks that the first stage is still the one it was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from genlab.data.tokenizer import TOKENIZER_KEY, BPETokenizer, train_for_datamodule
from genlab.models.autoregressive.codes import (
    FROZEN_KEY,
    check_code_stage,
    check_token_options,
    decode_stream,
    load_code_stage,
    sample_logits,  # noqa: F401  (genlab.models.autoregressive.dalle.sample_logits, as before)
)
from genlab.models.contract import SamplingOptions, captions_of, check_prompts
from genlab.nn.ema import EMA
from genlab.nn.transformer import DalleTransformer
from genlab.utils.checkpoint import load_frozen
from genlab.utils.io import file_version
from genlab.utils.lr_schedule import optimizers


class DALLE(L.LightningModule):
    """Text-to-image Transformer over a frozen discrete first stage.

    Args:
        tokenizer_ckpt: a ``dvae`` or ``vqgan`` checkpoint: its ``encode_indices`` gives the
            image tokens, ``decode_indices`` turns them back into pixels.
        net: a partial ``DalleTransformer`` (its size and attention patterns); the vocabulary,
            text length and grid are filled in here.
        optimizer, lr_scheduler: partial optimizer and scheduler (``total_steps=`` given).
        text_length: L, caption tokens incl. [BOS]/[EOS] (longer captions are truncated).
        tokenizer_vocab_size: V, the BPE vocabulary trained on the training captions.
        image_size: the images' side in pixels (must be the first stage's).
        text_loss_weight, image_loss_weight: weights of the two cross-entropies.
        cond_drop_prob: probability of training on the empty caption (for guidance).
        ema_decay: keep an EMA of the weights and sample with it (None: off).
        guidance_scale, temperature, top_k, top_p: sampling defaults (top_k 0 / top_p 1: off).
        n_candidates, keep: default candidates per prompt and how many to keep (reranking when
            n_candidates > keep; needs ``clip_ckpt``).
        clip_ckpt: a genlab CLIP checkpoint that ranks the candidates, or None.
        sample_batch_size: sequences decoded at once.
    """

    config_name = "dalle"
    condition = "text"
    capabilities = frozenset({"generate", "rerank"})
    sampling_keys = frozenset(
        ("guidance_scale", "temperature", "top_k", "top_p", "n_candidates", "keep", "clip_ckpt")
    )

    def __init__(
        self,
        *,
        tokenizer_ckpt: str,
        net: Callable[..., DalleTransformer],
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        text_length: int = 32,
        tokenizer_vocab_size: int = 512,
        image_size: int = 32,
        text_loss_weight: float = 1 / 8,
        image_loss_weight: float = 7 / 8,
        cond_drop_prob: float = 0.1,
        ema_decay: float | None = None,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        n_candidates: int = 1,
        keep: int = 1,
        clip_ckpt: str | None = None,
        sample_batch_size: int = 256,
    ):
        super().__init__()
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"model.cond_drop_prob={cond_drop_prob} must be in [0, 1)")
        if text_length < 3:
            raise ValueError(f"model.text_length={text_length}: needs room for [BOS] word [EOS]")
        if min(text_loss_weight, image_loss_weight) < 0 or image_loss_weight == 0:
            raise ValueError(
                f"model.text_loss_weight={text_loss_weight} and image_loss_weight="
                f"{image_loss_weight} must be >= 0, the image weight > 0"
            )
        first_stage, record = load_code_stage(tokenizer_ckpt, image_size)
        object.__setattr__(self, "first_stage", first_stage)  # not a submodule: see _apply
        object.__setattr__(self, "clip", None)
        self.frozen_parts = {"first_stage": record}
        if clip_ckpt:
            self.use_clip(clip_ckpt)
        self.text_length, self.text_vocab = text_length, tokenizer_vocab_size
        self.grid, self.num_codes = first_stage.latent_size, first_stage.num_codes
        self.image_offset = tokenizer_vocab_size + text_length  # first image code's id
        self.net = net(
            vocab_size=self.image_offset + self.num_codes, text_length=text_length, grid=self.grid
        )
        self.ema = None if ema_decay is None else EMA(self.net, decay=ema_decay)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.image_size = image_size
        self.channels = getattr(first_stage, "channels", 3)
        self.text_loss_weight, self.image_loss_weight = text_loss_weight, image_loss_weight
        self.cond_drop_prob = cond_drop_prob
        self.guidance_scale, self.temperature, self.top_k, self.top_p = (
            guidance_scale,
            temperature,
            top_k,
            top_p,
        )
        self.n_candidates, self.keep = n_candidates, keep
        self.sample_batch_size = sample_batch_size
        self.tokenizer: BPETokenizer | None = None
        check_sampling(self.resolve_options({}), reranks=self.clip is not None)

    # ------------------------------------------------------------------------------------------
    # the frozen parts
    def _apply(self, fn, recurse=True):
        """Move the first stage and CLIP with the model (they are not registered submodules, so
        that they stay out of ``state_dict``, ``parameters`` and ``train()``)."""
        for part in (self.first_stage, self.clip):
            if part is not None:
                part._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def use_clip(self, path: str, key: str = "model.clip_ckpt") -> None:
        """Rank candidates with the CLIP checkpoint at ``path`` from now on."""
        hint = "use a genlab CLIP checkpoint (python src/train.py experiment=clip_shapes)"
        clip = load_frozen(path, key=key, needs=("similarity",), hint=hint)
        object.__setattr__(self, "clip", clip.to(self.device))
        self.frozen_parts["clip"] = {"path": str(path), "version": file_version(path)}

    @property
    def uses_ema(self) -> bool:
        return self.ema is not None

    def sampling_net(self) -> DalleTransformer:
        """The EMA weights when there are any, else the trained ones."""
        return self.ema.module if self.ema is not None else self.net

    # ------------------------------------------------------------------------------------------
    # the token stream
    def text_tokens(self, captions: list[str]) -> torch.Tensor:
        """Caption ids (B, L): BPE ids with per-position pads (id V + i at position i)."""
        if self.tokenizer is None:
            raise RuntimeError("the BPE tokenizer is not trained: fit the model or load a ckpt")
        ids, mask = self.tokenizer.encode(captions, context_length=self.text_length)
        pads = self.text_vocab + torch.arange(self.text_length).expand_as(ids)
        return torch.where(mask, ids, pads).to(self.device)

    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The first stage's codes of images, (B, N) in raster order, in [0, K)."""
        return self.first_stage.encode_indices(images).flatten(1)

    def losses(
        self, net: nn.Module, images: torch.Tensor, captions: list[str], keep: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-sample text and image cross-entropies (nats per token) of the stream; the text
        loss only where ``keep`` (the caption was not dropped)."""
        text = self.text_tokens(captions)  # (B, L)
        image = self.image_tokens(images)  # (B, N)
        stream = torch.cat([text, image + self.image_offset], dim=1)  # (B, T)
        logits = net(stream[:, :-1]).float()  # (B, T - 1, vocab): position i predicts i + 1
        n_text = self.text_length  # L
        text_logits = logits[:, : n_text - 1, : self.image_offset]  # (B, L - 1, V + L)
        image_logits = logits[:, n_text - 1 :, self.image_offset :]  # (B, N, K)
        text_ce = F.cross_entropy(text_logits.transpose(1, 2), text[:, 1:], reduction="none")
        image_ce = F.cross_entropy(image_logits.transpose(1, 2), image, reduction="none")
        return {"text": text_ce.mean(1), "image": image_ce.mean(1), "keep": keep}

    def total_loss(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted loss and its parts, averaged over the batch (text over kept captions)."""
        keep = parts["keep"].float()
        text = (parts["text"] * keep).sum() / keep.sum().clamp(min=1.0)
        image = parts["image"].mean()
        loss = self.text_loss_weight * text + self.image_loss_weight * image
        return {
            "loss": loss,
            "text_loss": text,
            "image_loss": image,
            "text_bpt": text / math.log(2),
            "image_bpt": image / math.log(2),
        }

    # ------------------------------------------------------------------------------------------
    # training
    def setup(self, stage: str) -> None:
        """Check the data's size; train the BPE tokenizer on its captions (once; rank 0's)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        resolution = getattr(datamodule, "resolution", self.image_size)
        if resolution != self.image_size:
            raise ValueError(
                f"model.image_size={self.image_size} (the first stage's), but the dataset yields "
                f"{resolution} px images: set data.resolution={self.image_size}"
            )
        if self.tokenizer is None:
            self.tokenizer = train_for_datamodule(
                datamodule,
                self.trainer.strategy,
                vocab_size=self.text_vocab,
                max_vocab_size=self.text_vocab,
                model=self.config_name,
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        captions = captions_of(batch)
        drop = torch.rand(len(captions), device=self.device) < self.cond_drop_prob
        kept = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        values = self.total_loss(self.losses(self.net, batch["image"], kept, ~drop))
        self.log_dict({f"train/{k}": v.detach() for k, v in values.items()})
        self.log("loss", values["loss"].detach(), prog_bar=True, logger=False)
        return values["loss"]

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # here, so that a checkpoint written after the batch has it
            self.ema.update(self.net)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.log("train/ema_decay", self.ema.current_decay())

    def evaluation_step(self, batch: dict[str, Any], stage: str) -> None:
        """Losses with every caption kept, with the sampling weights (EMA when on)."""
        captions = captions_of(batch)
        keep = torch.ones(len(captions), dtype=torch.bool, device=self.device)
        parts = self.losses(self.sampling_net(), batch["image"], captions, keep)
        n = len(captions)
        for name, value in self.total_loss(parts).items():
            self.log(
                f"{stage}/{name}", value, batch_size=n, sync_dist=True, prog_bar=name == "loss"
            )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    def configure_optimizers(self):
        return optimizers(
            self.optimizer_factory, self.lr_scheduler_factory, self.net.parameters(), self.trainer
        )

    # ------------------------------------------------------------------------------------------
    # checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint[TOKENIZER_KEY] = self.tokenizer.to_json()
        checkpoint[FROZEN_KEY] = self.frozen_parts

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if TOKENIZER_KEY in checkpoint:
            self.tokenizer = BPETokenizer.from_json(checkpoint[TOKENIZER_KEY])
        check_code_stage(checkpoint, self.frozen_parts["first_stage"], "DALL-E")

    # ------------------------------------------------------------------------------------------
    # sampling
    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The sampling settings: ``options`` where given (not None), else the model's; one
        candidate per kept image unless ``n_candidates`` is given (or the model's is larger)."""
        names = ("guidance_scale", "temperature", "top_k", "top_p", "n_candidates", "keep")
        opts = {
            name: getattr(self, name) if options.get(name) is None else options[name]
            for name in names
        }
        if options.get("n_candidates") is None:
            opts["n_candidates"] = max(self.n_candidates, opts["keep"])
        return opts

    def sampling_options(self, **given: Any) -> SamplingOptions:
        """The model's sampling settings with ``given`` applied (the model contract)."""
        opts = self.resolve_options(given)
        scale = opts.pop("guidance_scale")
        return SamplingOptions("autoregressive (KV cache)", guidance_scale=scale, extra=opts)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | None = None,
        *,
        n: int | None = None,
        generator: torch.Generator | None = None,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        n_candidates: int | None = None,
        keep: int | None = None,
        clip_ckpt: str | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Draw images (P · m, C, H, W) in [-1, 1] for P prompts, prompt-major.

        m = ``keep`` (or ``n``, images per prompt; default the model's ``keep``). Each prompt
        gets k = ``n_candidates`` candidates (default m); when k > m, CLIP keeps the m best,
        best first, by the model's CLIP or the one at ``clip_ckpt`` (kept for later calls).
        Unset options take the model's defaults (module docstring).
        """
        if prompts is None or isinstance(prompts, str):
            raise ValueError("DALL-E is text-conditional: pass prompts as a list of str")
        check_prompts(prompts)
        if clip_ckpt is not None and self.frozen_parts.get("clip", {}).get("path") != clip_ckpt:
            self.use_clip(clip_ckpt, key="clip_ckpt")
        if n is not None and keep is not None and n != keep:
            raise ValueError(f"n={n} and keep={keep} both give the images per prompt: pass one")
        given = {
            "guidance_scale": guidance_scale,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "n_candidates": n_candidates,
            "keep": keep if n is None else n,
        }
        opts = self.resolve_options(given)
        check_sampling(opts, reranks=self.clip is not None)
        k, m = opts["n_candidates"], opts["keep"]
        texts = [p for p in prompts for _ in range(k)]
        tokens = torch.cat(
            [
                self.sample_tokens(
                    texts[s : s + self.sample_batch_size], generator, opts, use_cache
                )
                for s in range(0, len(texts), self.sample_batch_size)
            ]
        )  # (P·k, N)
        images = self.decode_tokens(tokens)  # (P·k, C, H, W)
        if k > m:
            images = self.rerank(images, prompts, k, m)
        return images.float().cpu().clamp(-1, 1)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Images of image-token sequences (B, N), decoded by the first stage in chunks."""
        grids = tokens.view(-1, self.grid, self.grid)  # (B, h, w)
        chunks = grids.split(self.sample_batch_size)
        return torch.cat([self.first_stage.decode_indices(c).float() for c in chunks])

    def rerank(self, images: torch.Tensor, prompts: list[str], k: int, m: int) -> torch.Tensor:
        """The m images of each prompt's k candidates that CLIP scores highest, best first."""
        texts = [p for p in prompts for _ in range(k)]
        scores = self.clip.similarity(images.clamp(-1, 1), texts).view(len(prompts), k)
        best = scores.topk(m, dim=1).indices  # (P, m)
        rows = (best + k * torch.arange(len(prompts), device=best.device)[:, None]).flatten()
        return images[rows.to(images.device)]

    def sample_tokens(
        self, texts: list[str], generator: torch.Generator | None, opts: dict, use_cache: bool
    ) -> torch.Tensor:
        """Image tokens (B, N) for the captions, drawn one position at a time (module doc)."""
        net = self.sampling_net()
        text = self.text_tokens(texts)  # (B, L)
        guided = opts["guidance_scale"] != 1.0
        if guided:  # the unconditional stream rides along in the same batch
            text = torch.cat([text, self.text_tokens([""] * len(texts))])  # (2B, L)
        return decode_stream(
            net, text, self.grid * self.grid, self.image_offset, generator, opts, guided, use_cache
        )


# ----------------------------------------------------------------------------------------------
def check_sampling(opts: dict[str, Any], *, reranks: bool) -> None:
    """Sampling settings in range, with a message naming the setting."""
    check_token_options(opts)
    if opts["keep"] < 1 or opts["n_candidates"] < opts["keep"]:
        raise ValueError(
            f"keep={opts['keep']} and n_candidates={opts['n_candidates']}: need "
            "1 <= keep <= n_candidates"
        )
    if opts["n_candidates"] > opts["keep"] and not reranks:
        raise ValueError(
            f"n_candidates={opts['n_candidates']} > keep={opts['keep']} ranks candidates with "
            "CLIP: set model.clip_ckpt (python src/train.py experiment=clip_shapes makes one)"
        )
