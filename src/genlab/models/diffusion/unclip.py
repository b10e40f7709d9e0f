"""unCLIP (DALL·E 2, Ramesh et al. 2022): text → CLIP image embedding → image, on a frozen genlab
CLIP.

* **The prior** (:class:`UnCLIPPrior`, ``model=unclip_prior``) is a diffusion model over CLIP image
  embeddings z_i given a caption y (§2.1, "Diffusion prior"). Its denoiser
  (``genlab.nn.unclip.PriorTransformer``) reads the caption's CLIP token features and CLIP text
  embedding z_t, the timestep and the noised z_i, and predicts the clean z_i directly (x0
  prediction, with the MSE on it). The text is dropped with probability ``cond_drop_prob`` (all
  its tokens masked, z_t replaced by a learned null) for classifier-free guidance. At sampling,
  ``candidates`` embeddings are drawn per caption and the one with the highest dot product with
  z_t is kept ("we generate two samples of z_i and choose the one with a higher dot product").

  Norm convention. CLIP's embeddings are unit vectors in R^d. The diffusion runs on
  x0 = √d · z_i (unit variance per component, like the images in [-1, 1] of the pixel models);
  :meth:`UnCLIPPrior.sample_embeddings` returns unit vectors again (x̂0 / ‖x̂0‖), exactly what
  ``CLIP.encode_images`` returns for real images. Validation reports ``val/loss`` (the MSE of
  x̂0 at index-seeded t and noise), ``val/embed_cosine`` (the mean cosine of a sampled embedding
  with the item's true image embedding over the items with index below ``eval_samples``) and
  ``val/text_cosine`` (the same for z_t itself: the baseline of a prior that returns z_t).
* **The decoder** (``model=unclip_decoder``) is a config of the diffusion system: pixel space, the
  caption (optional) and the CLIP image embedding
  (``genlab.models.diffusion.conditioners.ImageEmbedConditioner``); its ``variations`` and
  ``interpolate`` decode an image's embedding, or a slerp between two, from one shared x_T.
* **The pair** (:class:`UnCLIP`, ``model=unclip``) chains a prior's and a decoder's checkpoints:
  ``generate(prompts)`` draws z_i with the prior and decodes it (with the caption when the decoder
  reads one). Like the Imagen cascade it does not train; ``eval.py`` and ``sample.py`` take it.

The prior holds the frozen CLIP outside its ``state_dict`` (``clip_ckpt``, rebuilt from that file
on load, its SHA-256 checked), like LDM's first stage. A missing CLIP is built by the entry point
(``_recipe_`` in its config, ``genlab.utils.frozen_parts``), never by the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from genlab.diffusion.denoiser import broadcast, from_network
from genlab.diffusion.guidance import classifier_free_guidance
from genlab.diffusion.losses import mse_per_sample
from genlab.diffusion.parametrization import Prediction, q_sample, target
from genlab.diffusion.samplers import Sampler, resolve_sampler
from genlab.diffusion.schedules import Schedule, ScheduleName
from genlab.models.contract import (
    SamplingOptions,
    StageOptions,
    capabilities,
    captions_of,
    check_prompts,
)
from genlab.models.diffusion.conditioners import (
    CLIP_KEY,
    Shared,
    check_clip_version,
    clip_image_embeddings,
    load_clip,
)
from genlab.nn.ema import EMA
from genlab.utils.checkpoint import load_frozen
from genlab.utils.io import file_version
from genlab.utils.lr_schedule import optimizers


# ----------------------------------------------------------------------------------------------
# the prior
class UnCLIPPrior(L.LightningModule):
    """Diffusion prior p(z_i | y) over CLIP image embeddings (module docstring).

    Args:
        clip_ckpt: the genlab CLIP checkpoint whose embeddings it models.
        net: partial ``PriorTransformer``, completed with the CLIP's ``embed_dim``,
            ``text_width`` and ``context_length``.
        optimizer, lr_scheduler: partial optimizer; partial scheduler or None.
        schedule, num_timesteps, prediction: the diffusion (x0 prediction in the paper).
        cond_drop_prob: probability of training on the null caption.
        ema_decay: EMA decay, or None.
        sampler: the default sampler of :meth:`sample_embeddings`.
        guidance_scale: the default classifier-free guidance scale (1: none).
        candidates: embeddings drawn per caption, the one closest to z_t kept (the paper: 2).
        sample_batch_size: most embeddings denoised at once.
        eval_samples: validation and test sample embeddings (for ``embed_cosine``) only for the
            items with index below this (each costs a full run of the sampler).
    """

    condition = "text"
    capabilities = frozenset()  # draws embeddings, not images: the pair generates

    def __init__(
        self,
        *,
        clip_ckpt: str,
        net: Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        schedule: ScheduleName = "cosine",
        num_timesteps: int = 1000,
        prediction: Prediction = "x0",
        cond_drop_prob: float = 0.1,
        ema_decay: float | None = 0.999,
        sampler: Sampler | None = None,
        guidance_scale: float = 1.0,
        candidates: int = 2,
        sample_batch_size: int = 1024,
        eval_samples: int = 128,
    ):
        super().__init__()
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"model.cond_drop_prob={cond_drop_prob} must be in [0, 1)")
        if candidates < 1:
            raise ValueError(f"model.candidates={candidates} must be at least 1")
        self.frozen = Shared(load_clip(clip_ckpt))
        self.clip_ckpt, self.clip_version = str(clip_ckpt), file_version(clip_ckpt)
        self.embed_dim = self.clip.image_projection.out_features
        self.embed_scale = math.sqrt(self.embed_dim)  # unit vectors → unit variance per component
        text = self.clip.text_encoder
        self.net = net(
            embed_dim=self.embed_dim, text_width=text.width, context_length=text.context_length
        )
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.prediction, self.cond_drop_prob = prediction, cond_drop_prob
        self.schedule = Schedule(schedule, num_timesteps)
        self.ema = None if ema_decay is None else EMA(self.net, decay=ema_decay)
        self.sampler = sampler or Sampler()
        self.guidance_scale, self.candidates = guidance_scale, candidates
        self.sample_batch_size, self.eval_samples = sample_batch_size, eval_samples
        self.metrics = nn.ModuleDict(
            {f"{s}_{m}": MeanMetric() for s in ("val", "test") for m in ("embed", "text")}
        )

    @property
    def clip(self) -> nn.Module:
        return self.frozen.value

    def _apply(self, fn, recurse=True):
        self.clip._apply(fn, recurse)  # the frozen CLIP moves with the model
        return super()._apply(fn, recurse)

    @property
    def uses_ema(self) -> bool:
        return self.ema is not None

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's unit image embeddings (B, d) of images in [-1, 1] of any size."""
        return clip_image_embeddings(self.clip, images)

    def text_features(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The CLIP text tower's token features (B, L, W), their mask (B, L) and the captions'
        unit CLIP text embeddings (B, d), float32."""
        check_prompts(captions, "text")
        clip = self.clip
        with clip.inference():
            ids, mask = clip.tokenizer.encode(
                captions, context_length=clip.text_encoder.context_length
            )
            ids, mask = ids.to(clip.device), mask.to(clip.device)
            tokens, pooled = clip.text_encoder(ids, mask)
            embed = F.normalize(clip.text_projection(pooled).float(), dim=-1)
        return {"text_tokens": tokens.float(), "text_mask": mask, "text_embed": embed}

    def eval_net(self) -> nn.Module:
        """The EMA network when there is one, else the trained one."""
        return self.ema.module if self.ema is not None else self.net

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CLIP_KEY] = {"path": self.clip_ckpt, "version": self.clip_version}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_clip_version(checkpoint, self.clip_ckpt, self.clip_version)

    # ------------------------------------------------------------------------------------------
    # the denoiser
    def conditioning(self, text: dict[str, torch.Tensor], drop: torch.Tensor) -> dict:
        """The network's keywords from :meth:`text_features` (z_t scaled like x0); rows where
        ``drop`` is True get the null condition."""
        scaled = text["text_embed"] * self.embed_scale
        return text | {"text_embed": scaled, "drop": drop.to(scaled.device)}

    def loss(self, z: torch.Tensor, t, eps, text: dict, net: nn.Module) -> torch.Tensor:
        """Per-sample MSE of the prediction at times t with noise eps; z (B, d) unit vectors."""
        x0 = z * self.embed_scale
        alpha_bar = broadcast(self.schedule.alpha_bar(t), x0)
        x_t = q_sample(x0, eps, alpha_bar)
        out = net(x_t, t, **text).float()
        return mse_per_sample(out, target(self.prediction, x0, eps, alpha_bar))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        captions = captions_of(batch)
        z = self.image_embeddings(batch["image"])
        b = len(z)  # the global generators: reseeded per rank and step (StepSeeds)
        t = self.schedule.sample_t(b, device=self.device)
        eps = torch.randn(z.shape, device=self.device)
        drop = torch.rand(b, device=self.device) < self.cond_drop_prob
        text = self.conditioning(self.text_features(captions), drop)
        loss = self.loss(z, t, eps, text, self.net).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # here, so that a checkpoint written after the batch has it
            self.ema.update(self.net)

    def configure_optimizers(self):
        return optimizers(
            self.optimizer_factory,
            self.lr_scheduler_factory,
            self.net.parameters(),
            self.trainer,
        )

    # ------------------------------------------------------------------------------------------
    # evaluation: every draw seeded by the item's index, so ranks and batching do not matter
    def evaluation_step(self, batch: dict[str, Any], stage: str) -> None:
        captions = captions_of(batch)
        z = self.image_embeddings(batch["image"])
        gens = [torch.Generator().manual_seed(int(i)) for i in batch["index"]]
        t = torch.cat([self.schedule.sample_t(1, generator=g) for g in gens]).to(self.device)
        eps = torch.stack([torch.randn(z.shape[1:], generator=g) for g in gens]).to(self.device)
        no_drop = torch.zeros(len(z), dtype=torch.bool)
        features = self.text_features(captions)
        loss = self.loss(z, t, eps, self.conditioning(features, no_drop), self.eval_net())
        self.log(f"{stage}/loss", loss.mean(), batch_size=len(z), sync_dist=True, prog_bar=True)
        keep = (batch["index"] < self.eval_samples).tolist()
        if not any(keep):
            return
        kept = [c for c, k in zip(captions, keep, strict=True) if k]
        z = z[torch.tensor(keep, device=z.device)]
        z_t = features["text_embed"][torch.tensor(keep, device=features["text_embed"].device)]
        x_T = torch.stack([torch.randn(1, z.shape[1], generator=g) for g in gens])  # (B, 1, d)
        x_T = x_T[torch.tensor(keep)]  # drawn after t and ε from each item's generator
        sampled = self.draw(kept, x_T, spec=self.sampler, scale=self.guidance_scale)
        self.metrics[f"{stage}_embed"].update((sampled.to(z.device) * z).sum(-1))
        self.metrics[f"{stage}_text"].update((z_t.to(z.device) * z).sum(-1))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    def log_cosines(self, stage: str) -> None:
        if self.eval_samples <= 0:  # decided by the config, so every rank agrees
            return
        for name in ("embed", "text"):  # torchmetrics means: summed over ranks
            metric = self.metrics[f"{stage}_{name}"]
            self.log(f"{stage}/{name}_cosine", metric.compute())
            metric.reset()

    def on_validation_epoch_end(self) -> None:
        self.log_cosines("val")

    def on_test_epoch_end(self) -> None:
        self.log_cosines("test")

    # ------------------------------------------------------------------------------------------
    # sampling
    @torch.no_grad()
    def sample_embeddings(
        self,
        prompts: list[str],
        *,
        n: int | None = None,
        generator: torch.Generator | None = None,
        sampler: Sampler | str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        candidates: int | None = None,
    ) -> torch.Tensor:
        """Unit CLIP image embeddings (P · n, d), ``n`` per prompt (default 1), prompt-major,
        each the best of ``candidates`` draws by the dot product with the prompt's z_t."""
        if prompts is None or isinstance(prompts, str) or not prompts:
            raise ValueError("the unCLIP prior needs prompts: a non-empty list of str")
        check_prompts(prompts)
        k = self.candidates if candidates is None else int(candidates)
        if k < 1:
            raise ValueError(f"candidates={k} must be at least 1")
        captions = [p for p in prompts for _ in range(n or 1)]
        noise_device = "cpu" if generator is None else generator.device
        x_T = torch.randn(
            len(captions), k, self.embed_dim, generator=generator, device=noise_device
        )
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        spec = resolve_sampler(self.sampler, sampler, steps)
        return self.draw(captions, x_T, spec=spec, scale=scale, generator=generator)

    def draw(self, captions, x_T, *, spec: Sampler, scale: float, generator=None) -> torch.Tensor:
        """Denoise x_T (N, k, d) for N captions; keep each caption's candidate with the largest
        dot product with its z_t; unit vectors (N, d) on the CPU."""
        net, out = self.eval_net(), []
        per_chunk = max(1, self.sample_batch_size // x_T.shape[1])
        for start in range(0, len(captions), per_chunk):
            part = captions[start : start + per_chunk]
            noise = x_T[start : start + per_chunk].to(self.device)  # (B, k, d)
            b, k, d = noise.shape
            features = self.text_features(part)  # each caption encoded once
            rows = {key: value.repeat_interleave(k, dim=0) for key, value in features.items()}
            no_drop = torch.zeros(b * k, dtype=torch.bool)
            cond = self.conditioning(rows, no_drop)

            def denoiser_for(inputs: dict[str, torch.Tensor]):
                return from_network(
                    lambda x_t, t: net(x_t, t, **inputs), self.schedule, self.prediction
                )

            if scale != 1.0:  # the null: the same captions, dropped
                null = self.conditioning(rows, torch.ones_like(no_drop))
                denoiser = classifier_free_guidance(denoiser_for, cond, null, scale)
            else:
                denoiser = denoiser_for(cond)
            z = F.normalize(spec(denoiser, noise.reshape(b * k, d), generator=generator), dim=-1)
            z = z.float().view(b, k, d)
            z_t = features["text_embed"].to(z.device)  # (B, d)
            best = (z * z_t[:, None]).sum(-1).argmax(1)  # (B,)
            out.append(z[torch.arange(b), best].cpu())
        return torch.cat(out)

    def sampling_options(
        self,
        *,
        sampler: Sampler | str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        candidates: int | None = None,
    ) -> SamplingOptions:
        """The prior's sampling defaults with the given ones applied."""
        return SamplingOptions(
            sampler=resolve_sampler(self.sampler, sampler, steps),
            guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
            extra={"candidates": candidates or self.candidates},
        )


# ----------------------------------------------------------------------------------------------
# the pair
PRIOR_KEYS = ("sampler", "steps", "guidance_scale", "candidates")
DECODER_KEYS = ("sampler", "steps", "guidance_scale", "thresholding")


class UnCLIP(L.LightningModule):
    """A prior's and a decoder's checkpoints chained into a text-to-image generator.

    Args:
        prior_ckpt: a ``model=unclip_prior`` checkpoint.
        decoder_ckpt: a ``model=unclip_decoder`` checkpoint on the same CLIP.
        prior_options: ``{sampler, steps, guidance_scale, candidates}`` of the prior (missing or
            None: its own).
        decoder_options: ``{sampler, steps, guidance_scale, thresholding}`` of the decoder;
            ``generate``'s own options override these (a guidance sweep of the pair sweeps the
            decoder).
    """

    condition = "text"
    capabilities = frozenset({"generate", "variations"})
    sampling_keys = frozenset(DECODER_KEYS)  # the decoder's

    def __init__(
        self,
        *,
        prior_ckpt: str,
        decoder_ckpt: str,
        prior_options: dict[str, Any] | None = None,
        decoder_options: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.prior = load_frozen(
            prior_ckpt,
            key="model.prior_ckpt",
            needs=("sample_embeddings",),
            hint="use a model=unclip_prior checkpoint",
        )
        self.decoder = load_frozen(
            decoder_ckpt,
            key="model.decoder_ckpt",
            needs=("generate",),
            hint="use a model=unclip_decoder checkpoint",
        )
        if "variations" not in capabilities(self.decoder):
            raise ValueError(
                f"model.decoder_ckpt={str(decoder_ckpt)!r} holds a "
                f"{type(self.decoder).__name__} without a CLIP image embedding: use a "
                "model=unclip_decoder checkpoint"
            )
        embed = self.decoder.image_embedder()
        if self.prior.clip_version != embed.clip_version:
            raise ValueError(
                f"the prior ({prior_ckpt}) was trained on the CLIP {self.prior.clip_ckpt} "
                f"(sha256 {self.prior.clip_version}), the decoder ({decoder_ckpt}) on "
                f"{embed.clip_ckpt} ({embed.clip_version}): they must share one"
            )
        self.prior_options = StageOptions.parse(prior_options, "prior_options", PRIOR_KEYS)
        self.decoder_options = StageOptions.parse(decoder_options, "decoder_options", DECODER_KEYS)
        self.image_size, self.channels = self.decoder.image_size, self.decoder.channels

    @property
    def uses_ema(self) -> bool:
        return bool(self.prior.uses_ema and self.decoder.uses_ema)

    def train(self, mode: bool = True) -> UnCLIP:
        return super().train(False)  # the pair never trains

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Nothing per batch: the pair is measured by the metrics callback."""

    def decoder_kwargs(self, **given: Any) -> dict[str, Any]:
        return self.decoder_options.given() | {k: v for k, v in given.items() if v is not None}

    def sampling_options(self, **given: Any) -> SamplingOptions:
        """The prior's and the decoder's resolved options (``given`` applies to the decoder); the
        pair's own ``guidance_scale`` is the decoder's (the one a guidance sweep sets)."""
        prior = self.prior.sampling_options(**self.prior_options.given())
        decoder = self.decoder.sampling_options(**self.decoder_kwargs(**given))
        return SamplingOptions(
            sampler="unclip", guidance_scale=decoder.guidance_scale, stages=(prior, decoder)
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | None = None,
        *,
        n: int | None = None,
        generator: torch.Generator | None = None,
        sampler: Sampler | str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        thresholding: str | None = None,
    ) -> torch.Tensor:
        """(P · n, C, H, W) images in [-1, 1]: z_i from the prior for each prompt, decoded
        (with the prompt when the decoder reads captions). ``sampler``, ``steps``,
        ``guidance_scale`` and ``thresholding`` are the decoder's."""
        embeds = self.prior.sample_embeddings(
            prompts, n=n, generator=generator, **self.prior_options.given()
        )
        captions = None
        if self.decoder.condition == "text":
            captions = [p for p in prompts for _ in range(n or 1)]
        kwargs = self.decoder_kwargs(
            sampler=sampler, steps=steps, guidance_scale=guidance_scale, thresholding=thresholding
        )
        return self.decoder.generate(captions, image_embeds=embeds, generator=generator, **kwargs)

    def variations(self, images: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The decoder's ``variations``, with the pair's decoder options."""
        return self.decoder.variations(images, **self.decoder_kwargs(**kwargs))

    def interpolate(self, images: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The decoder's ``interpolate``, with the pair's decoder options."""
        return self.decoder.interpolate(images, **self.decoder_kwargs(**kwargs))
