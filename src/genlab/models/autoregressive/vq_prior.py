"""A learned prior over the codes of a frozen VQ autoencoder: what makes a VQ-VAE (van den Oord et
al. 2017, §4.2: a PixelCNN over the latent grid) or a VQ-GAN (Esser et al. 2021, §3.2: a
Transformer over the codes in raster order, taming's second stage) a generative model.

The frozen first stage (``tokenizer_ckpt``: a vqgan, vqvae or dvae checkpoint) turns an image into
an h × w grid of codes in [0, K); the prior factorises p(s | y) = Π_i p(s_i | s_<i, y) in raster
order, y a class label or nothing, and is trained by maximum likelihood. Two networks:

* ``model/net=pixelcnn``: the gated PixelCNN (``genlab.nn.pixelcnn``) on the grid, the class as a
  bias of every gate; sampling runs the whole network once per position.
* ``model/net=gpt_tiny`` / ``gpt_small``: the decoder-only Transformer of DALL·E on the stream
  [class token ; codes], the class token being the start of the sequence; sampling reads one new
  position per step through the KV cache.

A label-conditional prior (``condition=label``) trains with the label replaced by a null class
with probability ``cond_drop_prob``, and samples with classifier-free guidance on the logits,
ℓ = ℓ_∅ + s (ℓ_y − ℓ_∅). Sampling filters by temperature, top-k and top-p (``sample_logits``) and
decodes the codes to pixels with the frozen first stage. Text conditioning is DALL·E itself
(``model=dalle``, the same Transformer with the caption's tokens in front, on the same
``tokenizer_ckpt``).

Logged per stage: ``loss`` (nats per code) and ``bpc`` (bits per code); the uniform prior's is
log2 K, logged once as ``uniform_bpc`` for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from genlab.models.autoregressive.codes import (
    FROZEN_KEY,
    check_code_stage,
    check_token_options,
    decode_stream,
    draw_token,
    load_code_stage,
)
from genlab.models.contract import SamplingOptions
from genlab.nn.ema import EMA
from genlab.nn.pixelcnn import GatedPixelCNN
from genlab.utils.lr_schedule import optimizers


class VQPrior(L.LightningModule):
    """An autoregressive prior (PixelCNN or Transformer) over a frozen first stage's codes.

    Args:
        tokenizer_ckpt: a ``vqgan``, ``vqvae`` or ``dvae`` checkpoint (``encode_indices`` /
            ``decode_indices``).
        net: a partial ``GatedPixelCNN`` or ``DalleTransformer`` (sizes); the vocabulary and the
            grid are filled in here.
        optimizer, lr_scheduler: partial optimizer and scheduler (``total_steps=`` given).
        condition: ``none`` or ``label`` (text: ``model=dalle``).
        num_classes: the classes of a label-conditional prior.
        image_size: the images' side (must be the first stage's).
        cond_drop_prob: probability of training on the null class (label priors).
        ema_decay: sample with an EMA of the weights (None: off).
        guidance_scale, temperature, top_k, top_p: sampling defaults.
        sample_batch_size: sequences drawn at once.
    """

    config_name = "vq_prior"
    capabilities = frozenset({"generate"})
    sampling_keys = frozenset(("guidance_scale", "temperature", "top_k", "top_p"))

    def __init__(
        self,
        *,
        tokenizer_ckpt: str,
        net: Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        condition: Literal["none", "label"] = "none",
        num_classes: int | None = None,
        image_size: int = 32,
        cond_drop_prob: float = 0.1,
        ema_decay: float | None = None,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        sample_batch_size: int = 256,
    ):
        super().__init__()
        if condition not in ("none", "label"):
            hint = " (a text prior over codes is model=dalle)" if condition == "text" else ""
            raise ValueError(f"model.condition={condition!r} must be none or label{hint}")
        if condition == "label" and not num_classes:
            raise ValueError("model.condition=label needs model.num_classes")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"model.cond_drop_prob={cond_drop_prob} must be in [0, 1)")
        first_stage, record = load_code_stage(tokenizer_ckpt, image_size)
        object.__setattr__(self, "first_stage", first_stage)  # not a submodule: see _apply
        self.frozen_parts = {"first_stage": record}
        self.condition = condition
        self.num_classes = num_classes if condition == "label" else None
        self.null_class = num_classes if condition == "label" else 0  # the start / null token
        classes = self.null_class + 1
        self.grid, self.num_codes = first_stage.latent_size, first_stage.num_codes
        builds = getattr(net, "func", net)
        self.pixelcnn = isinstance(builds, type) and issubclass(builds, GatedPixelCNN)
        if self.pixelcnn:
            self.net = net(num_codes=self.num_codes, num_classes=classes, grid=self.grid)
        else:  # the Transformer over [class token ; codes]: codes come after the class ids
            self.net = net(vocab_size=classes + self.num_codes, text_length=1, grid=self.grid)
        self.code_offset = 0 if self.pixelcnn else classes
        self.ema = None if ema_decay is None else EMA(self.net, decay=ema_decay)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.image_size = image_size
        self.channels = getattr(first_stage, "channels", 3)
        self.cond_drop_prob = cond_drop_prob
        self.guidance_scale, self.temperature = guidance_scale, temperature
        self.top_k, self.top_p = top_k, top_p
        self.sample_batch_size = sample_batch_size
        check_token_options(self.resolve_options({}))

    # ------------------------------------------------------------------------------------------
    # the frozen first stage
    def _apply(self, fn, recurse=True):
        """Move the first stage with the model (it stays out of ``state_dict`` and ``train()``)."""
        self.first_stage._apply(fn, recurse)
        return super()._apply(fn, recurse)

    @property
    def uses_ema(self) -> bool:
        return self.ema is not None

    def sampling_net(self) -> nn.Module:
        """The EMA weights when there are any, else the trained ones."""
        return self.ema.module if self.ema is not None else self.net

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[FROZEN_KEY] = self.frozen_parts

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_code_stage(checkpoint, self.frozen_parts["first_stage"], "VQ prior")

    def setup(self, stage: str) -> None:
        """Check the data's size and, for a label prior, its classes."""
        datamodule = getattr(self.trainer, "datamodule", None)
        resolution = getattr(datamodule, "resolution", self.image_size)
        if resolution != self.image_size:
            raise ValueError(
                f"model.image_size={self.image_size} (the first stage's), but the dataset yields "
                f"{resolution} px images: set data.resolution={self.image_size}"
            )
        classes = getattr(datamodule, "num_classes", None)
        if self.condition == "label" and classes is not None and classes != self.num_classes:
            raise ValueError(
                f"model.num_classes={self.num_classes} but the dataset has {classes} classes: "
                f"set model.num_classes={classes}"
            )

    # ------------------------------------------------------------------------------------------
    # likelihood
    @torch.no_grad()
    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """The first stage's code grid of images, (B, h, w) in [0, K)."""
        return self.first_stage.encode_indices(images)

    def logits(self, net: nn.Module, codes: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, K) of each code given the codes before it (raster order) and the class."""
        if self.pixelcnn:
            return net(codes, classes).flatten(2).transpose(1, 2)
        stream = torch.cat([classes[:, None], codes.flatten(1) + self.code_offset], dim=1)
        return net(stream[:, :-1])[:, :, self.code_offset :]

    def classes_of(self, batch: dict[str, Any], drop: torch.Tensor | None) -> torch.Tensor:
        """The class of each item: its label (the null one where ``drop``), or the start class."""
        n = len(batch["image"])
        if self.condition == "none":
            return torch.full((n,), self.null_class, dtype=torch.long, device=self.device)
        if "label" not in batch:
            raise ValueError(
                "model.condition=label needs labelled data (data=digits|mnist|cifar10, or "
                "data=shapes data.label=shape|color|shape_color)"
            )
        labels = batch["label"].long().to(self.device)
        return labels if drop is None else torch.where(drop, self.null_class, labels)

    def nll(self, net: nn.Module, batch: dict[str, Any], drop=None) -> torch.Tensor:
        """Per-image negative log-likelihood, nats per code (B,)."""
        codes = self.codes(batch["image"])
        logits = self.logits(net, codes, self.classes_of(batch, drop)).float()
        ce = F.cross_entropy(logits.transpose(1, 2), codes.flatten(1), reduction="none")
        return ce.mean(1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        drop = None
        if self.condition == "label":
            drop = torch.rand(len(batch["image"]), device=self.device) < self.cond_drop_prob
        loss = self.nll(self.net, batch, drop).mean()
        self.log_dict({"train/loss": loss.detach(), "train/bpc": loss.detach() / math.log(2)})
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.net)

    def evaluation_step(self, batch: dict[str, Any], stage: str) -> None:
        nll = self.nll(self.sampling_net(), batch)
        n = len(nll)
        self.log(f"{stage}/loss", nll.mean(), batch_size=n, sync_dist=True, prog_bar=True)
        self.log(f"{stage}/bpc", nll.mean() / math.log(2), batch_size=n, sync_dist=True)
        self.log(f"{stage}/uniform_bpc", math.log2(self.num_codes), batch_size=n, sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    def configure_optimizers(self):
        return optimizers(
            self.optimizer_factory, self.lr_scheduler_factory, self.net.parameters(), self.trainer
        )

    # ------------------------------------------------------------------------------------------
    # sampling
    def resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        names = ("guidance_scale", "temperature", "top_k", "top_p")
        return {k: getattr(self, k) if given.get(k) is None else given[k] for k in names}

    def sampling_options(self, **given: Any) -> SamplingOptions:
        """The model's sampling settings with ``given`` applied (the model contract)."""
        unknown = sorted(set(given) - self.sampling_keys)
        if unknown:
            raise ValueError(f"unknown sampling option(s) {unknown} for model=vq_prior")
        opts = self.resolve_options(given)
        scale = opts.pop("guidance_scale")
        what = "PixelCNN" if self.pixelcnn else "Transformer (KV cache)"
        return SamplingOptions(f"autoregressive {what}", guidance_scale=scale, extra=opts)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | None = None,
        *,
        n: int | None = None,
        labels: Any = None,
        generator: torch.Generator | None = None,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Draw images (N, C, H, W) in [-1, 1]: one per label of ``labels`` (a label prior; or
        ``n`` uniformly drawn labels), or ``n`` (an unconditional prior)."""
        if prompts is not None:
            raise ValueError("a VQ prior takes labels= or n=, not prompts (text: model=dalle)")
        given = {"guidance_scale": guidance_scale, "temperature": temperature}
        opts = self.resolve_options(given | {"top_k": top_k, "top_p": top_p})
        check_token_options(opts)
        classes = self.classes_for(labels, n, generator)
        guided = self.condition == "label" and opts["guidance_scale"] != 1.0
        codes = torch.cat(
            [
                self.sample_codes(part.to(self.device), generator, opts, guided, use_cache)
                for part in classes.split(self.sample_batch_size)
            ]
        )  # (N, h, w)
        images = [self.first_stage.decode_indices(c).float() for c in codes.split(256)]
        return torch.cat(images).cpu().clamp(-1, 1)

    def classes_for(self, labels: Any, n: int | None, generator) -> torch.Tensor:
        if self.condition == "none":
            if labels is not None:
                raise ValueError("labels: this VQ prior is unconditional; pass n")
            if n is None or n < 1:
                raise ValueError(f"this VQ prior is unconditional: pass n >= 1 (got n={n})")
            return torch.full((n,), self.null_class, dtype=torch.long)
        if labels is None:
            if n is None or n < 1:
                raise ValueError("this VQ prior is label-conditional: pass labels or n")
            return torch.randint(0, self.num_classes, (n,), generator=generator)
        labels = torch.as_tensor(labels).long().reshape(-1)
        if len(labels) == 0 or labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}); got {labels.tolist()}")
        return labels

    def sample_codes(self, classes, generator, opts: dict, guided: bool, use_cache: bool):
        """Codes (B, h, w) drawn one position at a time in raster order."""
        net, b, n = self.sampling_net(), len(classes), self.grid * self.grid
        if guided:  # the null class rides along in the same batch
            classes = torch.cat([classes, torch.full_like(classes, self.null_class)])
        out = torch.zeros(b, n, dtype=torch.long, device=self.device)
        if self.pixelcnn:
            for i in range(n):
                both = out.repeat(2, 1) if guided else out
                grid = both.view(-1, self.grid, self.grid)
                logits = net(grid, classes)[:, :, i // self.grid, i % self.grid]  # (B', K)
                out[:, i] = draw_token(logits.float(), generator, opts, guided)
            return out.view(b, self.grid, self.grid)
        codes = decode_stream(
            net, classes[:, None], n, self.code_offset, generator, opts, guided, use_cache
        )
        return codes.view(b, self.grid, self.grid)
