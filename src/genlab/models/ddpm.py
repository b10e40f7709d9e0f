"""DDPM: denoising diffusion probabilistic models in pixel space (Ho et al. 2020).

The whole method in one file: a UNet (``genlab.nn.unet``) learns to predict ε (or v, x0) from
x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε at a uniformly drawn t (Alg. 1); sampling runs DDPM ancestral steps
(Alg. 2) or DDIM (Song et al. 2021) on any number of respaced steps. Conditioning is on a
caption (a small Transformer over a BPE tokenizer trained on the dataset's captions, its tokens
read by cross-attention and its pooled vector added to the timestep embedding), on a class
label, or on nothing. Classifier-free guidance (Ho & Salimans 2022): the condition is dropped
with probability ``cond_drop_prob`` in training and the two predictions are mixed at sampling.
An exponential moving average of the weights is kept and used for sampling and evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from genlab.data.tokenizer import BPETokenizer
from genlab.diffusion.guidance import classifier_free_guidance
from genlab.diffusion.losses import mse_per_sample
from genlab.diffusion.parametrization import Prediction, q_sample, target, to_x0_eps
from genlab.diffusion.samplers import ddim_sample, ddpm_sample
from genlab.diffusion.schedules import (
    ScheduleName,
    alpha_bar_from_betas,
    make_betas,
    spaced_timesteps,
)
from genlab.nn.ema import EMA

log = logging.getLogger(__name__)

TOKENIZER_KEY = "genlab_tokenizer"


class DDPM(L.LightningModule):
    """Text-, label- or un-conditional DDPM with classifier-free guidance and EMA.

    Args:
        net: the denoising network, called as ``net(x_t, t, context=, context_mask=, cond=,
            labels=)``.
        text_encoder: maps token ids to (tokens, pooled); required when ``condition="text"``.
        optimizer: partial optimizer, called with the parameters.
        lr_scheduler: partial scheduler called with ``(optimizer, total_steps=...)``, or None.
        condition: ``"text"`` (captions), ``"label"`` (class labels) or ``"none"``.
        num_classes: labels for ``condition="label"``.
        image_size, channels: the generated images' shape.
        schedule, num_timesteps: the noise schedule of training (``diffusion.schedules``).
        prediction: what the network predicts: ``"eps"``, ``"v"`` or ``"x0"``.
        cond_drop_prob: probability of training on the null condition (for guidance).
        tokenizer_vocab_size: BPE vocabulary size, at most the text encoder's embedding rows.
        ema_decay: EMA decay (warmed up with the step count), or None for no EMA.
        channels_last: run the network in channels-last memory format (slower on CPU here,
            bench/train_throughput.py; may pay off on GPU).
        sampler, sample_steps, guidance_scale, eta: default sampling settings of ``generate``.
        sample_batch_size: most images denoised at once by ``generate``.
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        text_encoder: nn.Module | None = None,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        condition: Literal["text", "label", "none"] = "text",
        num_classes: int | None = None,
        image_size: int = 32,
        channels: int = 3,
        schedule: ScheduleName = "cosine",
        num_timesteps: int = 1000,
        prediction: Prediction = "eps",
        cond_drop_prob: float = 0.1,
        tokenizer_vocab_size: int = 512,
        ema_decay: float | None = 0.999,
        channels_last: bool = False,
        sampler: Literal["ddpm", "ddim"] = "ddim",
        sample_steps: int = 50,
        guidance_scale: float = 3.0,
        eta: float = 0.0,
        sample_batch_size: int = 256,
    ):
        super().__init__()
        if condition == "text" and text_encoder is None:
            raise ValueError("model.condition='text' needs a model.text_encoder")
        if condition == "label" and not num_classes:
            raise ValueError("model.condition='label' needs model.num_classes")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"model.cond_drop_prob={cond_drop_prob} must be in [0, 1)")
        self.condition, self.num_classes = condition, num_classes
        self.image_size, self.channels = image_size, channels
        self.prediction, self.cond_drop_prob = prediction, cond_drop_prob
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.channels_last = channels_last
        self.sampling_defaults = {
            "sampler": sampler,
            "steps": sample_steps,
            "guidance_scale": guidance_scale,
            "eta": eta,
        }
        self.sample_batch_size = sample_batch_size
        self.num_timesteps = num_timesteps
        alpha_bar = alpha_bar_from_betas(make_betas(schedule, num_timesteps))
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)  # float64
        modules = {"net": net} if text_encoder is None else {"net": net, "text": text_encoder}
        self.denoiser = nn.ModuleDict(modules)
        if channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        self.ema = None if ema_decay is None else EMA(self.denoiser, decay=ema_decay)
        self.tokenizer: BPETokenizer | None = None
        self.noise_generator: torch.Generator | None = None

    # ----------------------------------------------------------------------------------------
    # conditioning
    @property
    def uses_ema(self) -> bool:
        """Whether sampling and evaluation use the EMA weights."""
        return self.ema is not None

    def setup(self, stage: str) -> None:
        """Train the BPE tokenizer on the training captions (once; rank 0's copy wins)."""
        if self.condition != "text" or self.tokenizer is not None:
            return
        captions = self.trainer.datamodule.train_captions()
        tokenizer_json = BPETokenizer.train(
            captions, vocab_size=self.tokenizer_vocab_size
        ).to_json()
        self.tokenizer = BPETokenizer.from_json(self.trainer.strategy.broadcast(tokenizer_json, 0))
        if self.tokenizer.vocab_size > self.denoiser["text"].vocab_size:
            raise ValueError(
                f"tokenizer vocabulary {self.tokenizer.vocab_size} exceeds the text encoder's "
                f"model.text_encoder.vocab_size={self.denoiser['text'].vocab_size}"
            )
        log.info("trained a BPE tokenizer of %d tokens", self.tokenizer.vocab_size)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint[TOKENIZER_KEY] = self.tokenizer.to_json()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if TOKENIZER_KEY in checkpoint:
            self.tokenizer = BPETokenizer.from_json(checkpoint[TOKENIZER_KEY])

    def condition_inputs(self, denoiser, captions=None, labels=None) -> dict[str, torch.Tensor]:
        """The network's condition keywords for captions (empty string = null) or labels
        (``num_classes`` = null)."""
        if self.condition == "text":
            if self.tokenizer is None:
                raise RuntimeError("the text tokenizer is not trained: call setup() or load a ckpt")
            ids, mask = self.tokenizer.encode(
                captions, context_length=denoiser["text"].context_length
            )
            tokens, pooled = denoiser["text"](ids.to(self.device), mask.to(self.device))
            return {"context": tokens, "context_mask": mask.to(self.device), "cond": pooled}
        if self.condition == "label":
            return {"labels": labels}
        return {}

    def drop_condition(self, batch: dict[str, Any], drop: torch.Tensor) -> dict[str, Any]:
        """Replace the condition of the samples where ``drop`` is True by the null condition."""
        if self.condition == "text":
            captions = [
                "" if d else c for c, d in zip(batch["caption"], drop.tolist(), strict=True)
            ]
            return {"captions": captions}
        if self.condition == "label":
            return {"labels": torch.where(drop, self.num_classes, batch["label"])}
        return {}

    # ----------------------------------------------------------------------------------------
    # training
    def forward_loss(self, x0, t, eps, cond_kwargs, denoiser) -> torch.Tensor:
        """Per-sample regression loss at timesteps t with noise eps (Ho et al. Alg. 1)."""
        alpha_bar = self.alpha_bar[t].float()[:, None, None, None]  # (B, 1, 1, 1)
        x_t = q_sample(x0, eps, alpha_bar)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        out = denoiser["net"](x_t, t, **self.condition_inputs(denoiser, **cond_kwargs))
        return mse_per_sample(out, target(self.prediction, x0, eps, alpha_bar))

    def on_fit_start(self) -> None:
        # each rank draws its own noise and timesteps (a shared seed would repeat them)
        seed = torch.initial_seed() + 1_000_003 * self.global_rank
        self.noise_generator = torch.Generator(self.device).manual_seed(seed % 2**63)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = batch["image"]
        b, gen = x0.shape[0], self.noise_generator
        t = torch.randint(0, self.num_timesteps, (b,), device=self.device, generator=gen)
        eps = torch.randn(x0.shape, device=self.device, generator=gen)
        drop = torch.rand(b, device=self.device, generator=gen) < self.cond_drop_prob
        loss = self.forward_loss(x0, t, eps, self.drop_condition(batch, drop), self.denoiser).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at step {self.global_step}"
            )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(self.denoiser)
            self.log("train/ema_decay", self.ema.current_decay())

    def evaluation_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per-sample loss with t and ε drawn from each item's ``index``: identical however the
        split is sharded over ranks or batched, so DDP and single-process evaluation agree."""
        gens = [torch.Generator().manual_seed(int(i)) for i in batch["index"]]
        t = torch.stack([torch.randint(0, self.num_timesteps, (), generator=g) for g in gens])
        eps = torch.stack([torch.randn(batch["image"].shape[1:], generator=g) for g in gens])
        cond = self.drop_condition(
            batch, torch.zeros(len(gens), dtype=torch.bool, device=self.device)
        )
        denoiser = self.ema.module if self.ema is not None else self.denoiser
        return self.forward_loss(
            batch["image"], t.to(self.device), eps.to(self.device), cond, denoiser
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.evaluation_loss(batch)
        self.log("val/loss", loss.mean(), batch_size=len(loss), sync_dist=True, prog_bar=True)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.evaluation_loss(batch)
        self.log("test/loss", loss.mean(), batch_size=len(loss), sync_dist=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.denoiser.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = self.lr_scheduler_factory(optimizer, total_steps=total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ----------------------------------------------------------------------------------------
    # sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | None = None,
        *,
        n: int | None = None,
        labels: torch.Tensor | list[int] | None = None,
        generator: torch.Generator | None = None,
        sampler: Literal["ddpm", "ddim"] | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
    ) -> torch.Tensor:
        """Draw images in [-1, 1], shaped (N, C, H, W), with the EMA weights when there are any.

        Text models take ``prompts`` and draw ``n`` images per prompt (default 1), prompt-major;
        label models take ``labels`` (or ``n`` uniformly drawn labels); unconditional models take
        ``n``. Unset sampling options take the model's defaults.
        """
        given = {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale, "eta": eta}
        opts = {**self.sampling_defaults, **{k: v for k, v in given.items() if v is not None}}
        conds = self.generation_conditions(prompts, n, labels, generator)
        shape = (len(conds), self.channels, self.image_size, self.image_size)
        noise_device = "cpu" if generator is None else generator.device
        noise = torch.randn(shape, generator=generator, device=noise_device)  # x_T, (N, C, H, W)
        chunks = []
        for start in range(0, len(conds), self.sample_batch_size):
            part = conds[start : start + self.sample_batch_size]
            x_T = noise[start : start + self.sample_batch_size].to(self.device)
            chunks.append(self.sample_chunk(x_T, part, generator=generator, **opts).cpu())
        return torch.cat(chunks).clamp(-1, 1)

    def generation_conditions(self, prompts, n, labels, generator) -> list:
        """One condition per image to draw: a caption, a label, or None."""
        if self.condition == "text":
            if prompts is None or isinstance(prompts, str):
                raise ValueError("this model is text-conditional: pass prompts as a list of str")
            empty = [i for i, p in enumerate(prompts) if not p.strip()]
            if empty:
                raise ValueError(f"prompt {empty[0]} is empty: every prompt needs some text")
            return [p for p in prompts for _ in range(n or 1)]
        if self.condition == "label":
            if labels is None:
                if n is None:
                    raise ValueError("this model is label-conditional: pass labels or n")
                labels = torch.randint(0, self.num_classes, (n,), generator=generator)
            labels = torch.as_tensor(labels).long()
            if labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(
                    f"labels must be in [0, {self.num_classes}); got {labels.tolist()}"
                )
            return labels.tolist()
        if n is None or n < 1:
            raise ValueError(f"this model is unconditional: pass n >= 1 (got n={n})")
        return [None] * n

    def sample_chunk(self, x_T, conds, *, generator, sampler, steps, guidance_scale, eta):
        """Run one sampler over a batch of starting noise with classifier-free guidance."""
        denoiser = self.ema.module if self.ema is not None else self.denoiser
        timesteps = spaced_timesteps(self.num_timesteps, steps)
        guided = self.condition != "none" and guidance_scale != 1.0
        eps_fn = self.eps_function(denoiser, conds, with_null=guided)
        if guided:
            eps_fn = classifier_free_guidance(eps_fn, guidance_scale)
        if sampler == "ddim":
            return ddim_sample(eps_fn, x_T, self.alpha_bar, timesteps, eta=eta, generator=generator)
        if sampler == "ddpm":
            return ddpm_sample(eps_fn, x_T, self.alpha_bar, timesteps, generator=generator)
        raise ValueError(f"sampler={sampler!r} is not one of ['ddim', 'ddpm']")

    def eps_function(self, denoiser, conds: list, *, with_null: bool):
        """ε̂(x_t, t) for the given conditions; with ``with_null`` the batch is [cond; null]."""
        if self.condition == "text":
            kwargs = {"captions": conds + ([""] * len(conds) if with_null else [])}
        elif self.condition == "label":
            labels = conds + ([self.num_classes] * len(conds) if with_null else [])
            kwargs = {"labels": torch.tensor(labels, device=self.device)}
        else:
            kwargs = {}
        net_kwargs = self.condition_inputs(denoiser, **kwargs)

        def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            alpha_bar = self.alpha_bar[t].float()[:, None, None, None]
            if self.channels_last:
                x_t = x_t.contiguous(memory_format=torch.channels_last)
            out = denoiser["net"](x_t, t, **net_kwargs).float()
            return to_x0_eps(self.prediction, out, x_t, alpha_bar)[1]

        return eps_fn
