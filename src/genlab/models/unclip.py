"""unCLIP (DALL·E 2, Ramesh et al. 2022): text → CLIP image embedding → image, on a frozen genlab
CLIP.

Three modules, each a config of its own:

* **The prior** (:class:`UnCLIPPrior`, ``model=unclip_prior``) is a diffusion model over CLIP image
  embeddings z_i given a caption y (§2.1, "Diffusion prior"). Its denoiser
  (``genlab.nn.unclip.PriorTransformer``) reads the caption's CLIP token features and CLIP text
  embedding z_t, the timestep and the noised z_i, and predicts the clean z_i directly (x0
  prediction, "we find it better to train our model to directly predict the unnoised z_i", with
  the MSE on it). The text is dropped with probability ``cond_drop_prob`` (all its tokens masked,
  z_t replaced by a learned null) for classifier-free guidance. At sampling, ``candidates``
  embeddings are drawn per caption and the one with the highest dot product with z_t is kept
  ("we generate two samples of z_i and choose the one with a higher dot product with z_t").

  Norm convention. CLIP's embeddings are unit vectors in R^d. The diffusion runs on
  x0 = √d · z_i (unit variance per component, like the images in [-1, 1] of the pixel models);
  :meth:`UnCLIPPrior.sample_embeddings` returns unit vectors again (x̂0 / ‖x̂0‖), exactly what
  ``CLIP.encode_images`` returns for real images. Validation reports ``val/loss`` (the MSE of
  x̂0 at index-seeded t and noise, on √d-scaled embeddings), ``val/embed_cosine`` (the mean
  cosine of a sampled embedding with the item's true image embedding over the items with index
  below ``eval_samples``: one candidate, index-seeded x_T, the model's sampler and guidance)
  and ``val/text_cosine`` (the same for z_t itself: the
  baseline of a prior that returns the text embedding).
* **The decoder** (:class:`UnCLIPDecoder`, ``model=unclip_decoder``) is the pixel diffusion model
  of ``models/diffusion_model.py`` conditioned on the CLIP image embedding of its training image
  (§2.1, "Decoder", after GLIDE): the embedding becomes ``embed_tokens`` extra context tokens
  (four in the paper) beside the caption's tokens, and a vector added to the timestep embedding
  (``genlab.nn.unclip.EmbeddingConditioning``). The caption is optional (``condition: text`` or
  ``none``); as in the paper, the CLIP embedding is replaced by a learned null 10% of the time
  (``embed_drop_prob``) and the caption dropped 50% of the time (``cond_drop_prob``), and
  classifier-free guidance mixes the prediction given both with the one given neither.
  :meth:`UnCLIPDecoder.variations` decodes an image's CLIP embedding with different seeds;
  :meth:`UnCLIPDecoder.interpolate` decodes the spherical interpolation (slerp) between two
  images' embeddings from one shared x_T (§3.1-3.2, Figs. 3-4).
* **The pair** (:class:`UnCLIP`, ``model=unclip``) chains a prior's and a decoder's checkpoints:
  ``generate(prompts)`` draws z_i with the prior and decodes it (with the caption when the decoder
  reads one). Like the Imagen cascade it does not train; ``eval.py`` and ``sample.py`` take it.

Both trained modules hold the frozen CLIP outside their ``state_dict`` (``clip_ckpt``, rebuilt
from that file on load, its SHA-256 checked), like LDM's first stage; with ``clip_recipe`` a
missing CLIP checkpoint is built first, as the generative-metrics callback builds its evaluators.
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
from genlab.metrics.evaluators import ensure_evaluator
from genlab.models.clip import captions_of, check_texts
from genlab.models.diffusion_model import DiffusionModel
from genlab.nn.ema import EMA
from genlab.nn.unclip import EmbeddingConditioning
from genlab.utils.checkpoint import load_frozen
from genlab.utils.io import file_version
from genlab.utils.lr_schedule import optimizers

CLIP_KEY = "genlab_unclip_clip"  # the CLIP file a checkpoint was trained with


# ----------------------------------------------------------------------------------------------
# the frozen CLIP both trained modules read
class FrozenCLIP:
    """Mixin: a frozen genlab CLIP held outside the module tree (not in ``state_dict``, not in
    ``parameters``, not reached by ``train()``), moved with the module, its file's SHA-256 saved
    in checkpoints and checked when they load."""

    clip: Any

    def attach_clip(self, clip_ckpt: str, clip_recipe: list[str] | None) -> None:
        path = ensure_evaluator(clip_ckpt, clip_recipe, name="clip_shapes")
        hint = "use a genlab CLIP checkpoint (python src/train.py experiment=clip_shapes)"
        clip = load_frozen(
            path, key="model.clip_ckpt", needs=("encode_images", "tokenizer"), hint=hint
        )
        if clip.tokenizer is None:
            raise ValueError(f"model.clip_ckpt={str(path)!r} has no trained tokenizer: {hint}")
        object.__setattr__(self, "clip", clip)  # not a submodule: see _apply
        self.clip_ckpt, self.clip_version = str(path), file_version(path)
        self.embed_dim = clip.image_projection.out_features
        self.embed_scale = math.sqrt(self.embed_dim)  # unit vectors → unit variance per component

    def _apply(self, fn, recurse=True):
        self.clip._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def save_clip_version(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CLIP_KEY] = {"path": self.clip_ckpt, "version": self.clip_version}

    def check_clip_version(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CLIP_KEY, {}).get("version")
        if saved is not None and saved != self.clip_version:
            raise ValueError(
                f"the CLIP {self.clip_ckpt} has changed since this model was trained (sha256 "
                f"{self.clip_version}, trained with {saved}): its embeddings no longer match; "
                "put the original file back"
            )

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's unit image embeddings (B, d) of images in [-1, 1] of any size (resized to
        CLIP's with area averaging or bilinear upsampling)."""
        size = self.clip.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            mode = "area" if images.shape[-1] > size else "bilinear"
            images = F.interpolate(images.float(), size=(size, size), mode=mode).clamp(-1, 1)
        return self.clip.encode_images(images).to(images.device)

    def text_features(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The CLIP text tower's token features (B, L, W), their mask (B, L) and the captions'
        unit CLIP text embeddings (B, d), float32."""
        check_texts(captions)
        clip = self.clip
        with clip.inference():
            ids, mask = clip.tokenizer.encode(
                captions, context_length=clip.text_encoder.context_length
            )
            ids, mask = ids.to(clip.device), mask.to(clip.device)
            tokens, pooled = clip.text_encoder(ids, mask)
            embed = F.normalize(clip.text_projection(pooled).float(), dim=-1)
        return {"text_tokens": tokens.float(), "text_mask": mask, "text_embed": embed}


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


# ----------------------------------------------------------------------------------------------
# the prior
class UnCLIPPrior(FrozenCLIP, L.LightningModule):
    """Diffusion prior p(z_i | y) over CLIP image embeddings (module docstring).

    Args:
        clip_ckpt: the genlab CLIP checkpoint whose embeddings it models.
        clip_recipe: ``src/train.py`` overrides that build ``clip_ckpt`` when it is missing, or
            None to fail instead.
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

    def __init__(
        self,
        *,
        clip_ckpt: str,
        clip_recipe: list[str] | None = None,
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
        self.attach_clip(clip_ckpt, clip_recipe)
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
    def uses_ema(self) -> bool:
        return self.ema is not None

    def eval_net(self) -> nn.Module:
        """The EMA network when there is one, else the trained one."""
        return self.ema.module if self.ema is not None else self.net

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.save_clip_version(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_clip_version(checkpoint)

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
        check_texts(prompts)
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
            guided = scale != 1.0
            drop = torch.zeros(b * k, dtype=torch.bool)
            if guided:  # the unconditional half: the same captions, dropped
                rows = {key: torch.cat([value, value]) for key, value in rows.items()}
                drop = torch.cat([drop, torch.ones_like(drop)])
            text = self.conditioning(rows, drop)

            def net_fn(x_t: torch.Tensor, t: torch.Tensor, text=text) -> torch.Tensor:
                return net(x_t, t, **text)

            denoiser = from_network(net_fn, self.schedule, self.prediction)
            if guided:
                denoiser = classifier_free_guidance(denoiser, scale)
            z = F.normalize(spec(denoiser, noise.reshape(b * k, d), generator=generator), dim=-1)
            z = z.float().view(b, k, d)
            z_t = features["text_embed"].to(z.device)  # (B, d)
            best = (z * z_t[:, None]).sum(-1).argmax(1)  # (B,)
            out.append(z[torch.arange(b), best].cpu())
        return torch.cat(out)

    def sampling_protocol(self, given: dict[str, Any]) -> dict[str, Any]:
        scale = given.get("guidance_scale", self.guidance_scale)
        spec = resolve_sampler(self.sampler, given.get("sampler"), given.get("steps"))
        k = given.get("candidates") or self.candidates
        return {"sampler": str(spec), "guidance_scale": scale, "candidates": k}


# ----------------------------------------------------------------------------------------------
# the decoder
class UnCLIPDecoder(FrozenCLIP, DiffusionModel):
    """Pixel diffusion conditioned on a CLIP image embedding (and optionally the caption).

    Args:
        clip_ckpt, clip_recipe: the frozen CLIP (as :class:`UnCLIPPrior`).
        embed_tokens: context tokens the embedding becomes (the paper: 4).
        embed_drop_prob: probability of training with the null embedding (the paper: 0.1).
        context_dim, cond_dim: the UNet's context-token and pooled-condition widths.
        **kwargs: :class:`DiffusionModel`'s arguments; ``cond_drop_prob`` is the caption's drop
            probability (the paper: 0.5).
    """

    config_name = "unclip_decoder"

    def __init__(
        self,
        *,
        clip_ckpt: str,
        clip_recipe: list[str] | None = None,
        embed_tokens: int = 4,
        embed_drop_prob: float = 0.1,
        context_dim: int,
        cond_dim: int,
        **kwargs: Any,
    ):
        if kwargs.get("condition") == "label":
            raise ValueError("model.condition: an unCLIP decoder reads a caption or nothing")
        if kwargs.get("bpd_images"):
            raise ValueError("model.bpd_images: bits/dim of the unCLIP decoder is not done")
        super().__init__(**kwargs)
        if not 0.0 <= embed_drop_prob < 1.0:
            raise ValueError(f"model.embed_drop_prob={embed_drop_prob} must be in [0, 1)")
        self.attach_clip(clip_ckpt, clip_recipe)
        self.embed_drop_prob = embed_drop_prob
        self.denoiser["embed"] = EmbeddingConditioning(
            embed_dim=self.embed_dim,
            tokens=embed_tokens,
            context_dim=context_dim,
            cond_dim=cond_dim,
        )
        if self.ema is not None:  # the EMA copy was taken before the new module: take it again
            self.ema = type(self.ema)(self.denoiser, decay=self.ema.decay)
        self.sampling_embeds: torch.Tensor | None = None  # set during generate

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self.save_clip_version(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.check_clip_version(checkpoint)

    # ------------------------------------------------------------------------------------------
    # conditioning
    def guided(self, guidance_scale: float) -> bool:
        return guidance_scale != 1.0  # on the embedding, with or without a caption

    def drop_condition(self, batch: dict[str, Any], drop: torch.Tensor) -> dict[str, Any]:
        """The caption dropped where ``drop``; in training the embedding is also replaced by
        the null one with probability ``embed_drop_prob``, independently."""
        embeds = self.image_embeddings(batch["image"])
        if self.training:
            embed_drop = torch.rand(len(embeds), device=self.device) < self.embed_drop_prob
        else:
            embed_drop = torch.zeros(len(embeds), dtype=torch.bool, device=self.device)
        cond = super().drop_condition(batch, drop)
        return cond | {"image_embeds": embeds, "embed_drop": embed_drop}

    def condition_inputs(
        self, denoiser, captions=None, labels=None, image_embeds=None, embed_drop=None
    ) -> dict[str, torch.Tensor]:
        """The caption's tokens followed by the embedding's, and the pooled caption plus the
        embedding's vector (only the embedding's without a caption)."""
        if image_embeds is None:
            raise ValueError("the unCLIP decoder needs CLIP image embeddings")
        inputs = super().condition_inputs(denoiser, captions, labels)
        z = image_embeds.to(self.device).float() * self.embed_scale
        tokens, vector = denoiser["embed"](z, embed_drop)
        if "context" in inputs:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            context = torch.cat([inputs["context"].to(tokens.dtype), tokens], dim=1)
            return {
                "context": context,
                "context_mask": torch.cat([inputs["context_mask"].bool(), mask], dim=1),
                "cond": inputs["cond"].to(vector.dtype) + vector,
            }
        return {"context": tokens, "context_mask": None, "cond": vector}

    # ------------------------------------------------------------------------------------------
    # sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | None = None,
        *,
        image_embeds: torch.Tensor | None = None,
        n: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Images (E · n, C, H, W) in [-1, 1] of the CLIP image embeddings ``image_embeds``
        (E, d), ``n`` per embedding (default 1), embedding-major; ``prompts`` (one per
        embedding) adds the captions for a text-conditional decoder, None decodes without
        (the null caption). Other options are :meth:`DiffusionModel.generate`'s."""
        if kwargs.get("classifier") is not None:
            raise ValueError("classifier: not available for the unCLIP decoder")
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
        if prompts is not None:
            if self.condition != "text":
                raise ValueError("this decoder reads no caption: leave prompts out")
            if isinstance(prompts, str) or len(prompts) != len(embeds):
                raise ValueError(
                    f"pass one prompt per image embedding ({len(embeds)}) as a list, or none"
                )
        self.sampling_embeds = F.normalize(embeds, dim=-1).to(self.device)
        try:
            return super().generate(prompts, n=n, generator=generator, **kwargs)
        finally:
            self.sampling_embeds = None

    def generation_conditions(self, prompts, n, labels, generator, classifier=None) -> list:
        """(caption, embedding row) per image: ``n`` per embedding; "" is the null caption."""
        if prompts is not None:
            super().generation_conditions(prompts, 1, None, generator)  # rejects empty prompts
        rows = range(len(self.sampling_embeds))
        captions = list(prompts) if prompts is not None else [""] * len(rows)
        return [(captions[e], e) for e in rows for _ in range(n or 1)]

    def condition_kwargs(self, conds: list, guided: bool) -> dict[str, Any]:
        captions = [c for c, _ in conds]
        rows = self.sampling_embeds[[e for _, e in conds]]  # (B, d)
        kwargs = super().condition_kwargs(captions, guided) if self.condition == "text" else {}
        drop = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        if guided:  # the unconditional half: null caption and null embedding
            rows, drop = torch.cat([rows, rows]), torch.cat([drop, torch.ones_like(drop)])
        return kwargs | {"image_embeds": rows, "embed_drop": drop}

    # ------------------------------------------------------------------------------------------
    # what an image embedding allows
    @torch.no_grad()
    def variations(
        self,
        images: torch.Tensor,
        *,
        n: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``n`` decodings (default 1) of each image's CLIP embedding, image-major: images
        (B, C, H, W) in [-1, 1] of any size → (B · n, C, H, W) at the decoder's size."""
        embeds = self.image_embeddings(torch.as_tensor(images).float().to(self.device))
        return self.generate(None, image_embeds=embeds, n=n, generator=generator, **kwargs)

    @torch.no_grad()
    def interpolate(
        self,
        images: torch.Tensor,
        *,
        n: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Decodings of ``n`` (default 8, at least 2) embeddings along the slerp from the first
        image's CLIP embedding to the second's, all from one shared x_T (the decoder's sampler
        is deterministic given x_T for DDIM with η = 0): images (2, C, H, W) → (n, C, H, W)."""
        images = torch.as_tensor(images).float()
        if len(images) != 2:
            raise ValueError(f"interpolation needs exactly two images, got {len(images)}")
        steps = 8 if n is None else n
        if steps < 2:
            raise ValueError(f"n={steps}: an interpolation needs at least its two ends")
        z = self.image_embeddings(images.to(self.device)).cpu()
        embeds = slerp(z[0], z[1], torch.linspace(0, 1, steps))
        noise_device = "cpu" if generator is None else generator.device
        x_T = torch.randn((1, *self.sample_shape), generator=generator, device=noise_device)
        return self.generate(None, image_embeds=embeds, generator=generator, x_T=x_T, **kwargs)


# ----------------------------------------------------------------------------------------------
# the pair
class UnCLIP(L.LightningModule):
    """A prior's and a decoder's checkpoints chained into a text-to-image generator.

    Args:
        prior_ckpt: a ``model=unclip_prior`` checkpoint.
        decoder_ckpt: a ``model=unclip_decoder`` checkpoint on the same CLIP.
        prior_options: ``{sampler, steps, guidance_scale, candidates}`` of the prior (missing or
            None: its own).
        decoder_options: ``{sampler, steps, guidance_scale, thresholding}`` of the decoder;
            ``generate``'s own ``guidance_scale`` and ``steps`` override these (a guidance
            sweep of the pair sweeps the decoder).
    """

    condition = "text"

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
            needs=("variations",),
            hint="use a model=unclip_decoder checkpoint",
        )
        if self.prior.clip_version != self.decoder.clip_version:
            raise ValueError(
                f"the prior ({prior_ckpt}) was trained on the CLIP {self.prior.clip_ckpt} "
                f"(sha256 {self.prior.clip_version}), the decoder ({decoder_ckpt}) on "
                f"{self.decoder.clip_ckpt} ({self.decoder.clip_version}): they must share one"
            )
        self.prior_options = clean_options(
            prior_options, ("sampler", "steps", "guidance_scale", "candidates"), "prior_options"
        )
        self.decoder_options = clean_options(
            decoder_options,
            ("sampler", "steps", "guidance_scale", "thresholding"),
            "decoder_options",
        )
        self.image_size, self.channels = self.decoder.image_size, self.decoder.channels

    @property
    def uses_ema(self) -> bool:
        return bool(self.prior.uses_ema and self.decoder.uses_ema)

    def train(self, mode: bool = True) -> UnCLIP:
        return super().train(False)  # the pair never trains

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Nothing per batch: the pair is measured by the metrics callback."""

    def decoder_kwargs(self, **given: Any) -> dict[str, Any]:
        return self.decoder_options | {k: v for k, v in given.items() if v is not None}

    def sampling_protocol(self, given: dict[str, Any]) -> dict[str, Any]:
        prior = self.prior.sampling_protocol(self.prior_options)
        opts = self.decoder_kwargs(**given)
        spec = self.decoder.resolve_sampler(opts.get("sampler"), opts.get("steps"))
        decoder = {
            "sampler": str(spec),
            "guidance_scale": opts.get("guidance_scale", self.decoder.guidance_scale),
            "thresholding": opts.get("thresholding") or self.decoder.thresholding,
        }
        return {"sampler": "unclip", "prior": prior, "decoder": decoder}

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
            prompts, n=n, generator=generator, **self.prior_options
        )
        captions = None
        if self.decoder.condition == "text":
            captions = [p for p in prompts for _ in range(n or 1)]
        kwargs = self.decoder_kwargs(
            sampler=sampler, steps=steps, guidance_scale=guidance_scale, thresholding=thresholding
        )
        return self.decoder.generate(captions, image_embeds=embeds, generator=generator, **kwargs)

    def variations(self, images: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The decoder's :meth:`UnCLIPDecoder.variations`, with the pair's decoder options."""
        return self.decoder.variations(images, **self.decoder_kwargs(**kwargs))

    def interpolate(self, images: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The decoder's :meth:`UnCLIPDecoder.interpolate`, with the pair's decoder options."""
        return self.decoder.interpolate(images, **self.decoder_kwargs(**kwargs))


def clean_options(options: dict[str, Any] | None, allowed: tuple[str, ...], key: str) -> dict:
    """The set (not None) entries of a stage's options; unknown keys are refused."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"model.{key}: unknown option(s) {unknown}; allowed: {list(allowed)}")
    return {k: v for k, v in options.items() if v is not None}
