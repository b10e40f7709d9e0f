"""The diffusion system: one LightningModule for every diffusion model of genlab.

DDPM (Ho et al. 2020), latent diffusion (Rombach et al. 2022), each Imagen stage (Saharia et al.
2022) and the unCLIP decoder (Ramesh et al. 2022) are configs of :class:`DiffusionModel`; what
differs between them is injected, never subclassed:

* a **space** (``spaces.py``): the pixels, or the scaled latents of a frozen first stage;
* **conditioners** (``conditioners.py``): the caption through any text encoder, or a class label
  (``condition``), plus e.g. the low-resolution image of a super-resolution stage or the CLIP
  image embedding of the unCLIP decoder (``conditioners``), each producing the network's inputs
  and its own null condition.

Training (Alg. 1): a network predicts ε (or v, x0) from x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε at a uniformly
drawn t, optionally with min-SNR weighting (Hang et al. 2023) and, with a learned variance, the
hybrid loss of Nichol & Dhariwal 2021; the condition is dropped with probability
``cond_drop_prob`` for classifier-free guidance (Ho & Salimans 2022). Sampling runs any sampler of
``genlab.diffusion.samplers`` with guidance, thresholding, classifier guidance and inpainting
(``genlab.diffusion.guidance``, which alone builds the [cond; null] pair of classifier-free
guidance). An EMA of the weights is used for sampling and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from genlab.data.tokenizer import BPETokenizer
from genlab.diffusion.denoiser import Denoiser, broadcast, from_network
from genlab.diffusion.guidance import (
    Thresholding,
    classifier_free_guidance,
    classifier_guidance,
    inpainting,
    thresholded,
)
from genlab.diffusion.losses import bits_per_dim, min_snr_weight, mse_per_sample, vlb_term_bits
from genlab.diffusion.parametrization import Prediction, q_sample, target, to_x0_eps
from genlab.diffusion.samplers import Sampler, resolve_sampler
from genlab.diffusion.schedules import Schedule, ScheduleName
from genlab.models.contract import SamplingOptions
from genlab.models.diffusion.conditioners import (
    Conditioner,
    Conditions,
    ImageEmbedConditioner,
    LowResConditioner,
    TextConditioner,
    build_conditioners,
    merge_inputs,
    take,
)
from genlab.models.diffusion.sampling import (
    DEFAULT_STRENGTH,
    check_arguments,
    check_clip_guidance,
    check_edit,
    check_inpainting,
    edit_start,
    generation_conditions,
    initial_noise,
    interpolation_embeddings,
    negative_captions,
)
from genlab.models.diffusion.spaces import PixelSpace
from genlab.nn.ema import EMA
from genlab.utils.legacy import upgrade_state_dict_if_legacy
from genlab.utils.lr_schedule import optimizers


class DiffusionModel(L.LightningModule):
    """A diffusion model in any space with any conditioners, classifier-free guidance and EMA.

    Args (each also commented in ``conf/model/ddpm.yaml``):
        net: the denoising network, ``net(x_t, t, **inputs)`` with the conditioners' inputs.
        text_encoder: the caption's encoder, for ``condition="text"``.
        optimizer, lr_scheduler: partial optimizer; partial scheduler ``(opt, total_steps=)``.
        condition, num_classes: what ``generate`` is asked with: ``"text"``, ``"label"`` (with
            ``num_classes``) or ``"none"``.
        conditioners: further conditioners by name (``low_res``, ``image_embed``).
        space: where x0 lives (:class:`PixelSpace` when None).
        image_size, channels: the generated images' size; the diffusion space's channels.
        schedule, num_timesteps, continuous_time, log_snr_shift: the noise schedule
            (``diffusion.schedules``; continuous log-SNR, Kingma et al. 2021; shift, Hoogeboom
            et al. 2023).
        prediction: ``"eps"``, ``"v"`` or ``"x0"``.
        loss_weighting, min_snr_gamma: ``"none"`` (L_simple) or ``"min_snr"`` (Hang et al. 2023).
        learned_variance, vlb_weight: the hybrid loss (Nichol & Dhariwal 2021, §3.1).
        offset_noise: std of a per-channel constant added to the noise (Guttenberg 2023).
        cond_drop_prob: probability of training on the null caption or label.
        tokenizer_vocab_size: BPE vocabulary size, at most the text encoder's embedding rows.
        text_cache: the text-embedding cache of a frozen text encoder (``enabled``, ``dir``,
            ``dtype``, ``chunk_mb``, ``batch_size``: ``genlab.data.text_cache``); None: off.
        ema_decay: EMA decay (warmed up with the step count), or None for no EMA.
        channels_last: run the network in channels-last memory format.
        sampler, guidance_scale, thresholding, threshold_percentile: sampling defaults.
        sample_batch_size: most images denoised at once by ``generate``.
        bpd_images: in testing, test/bpd of the test items with index below this (pixels).
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
        conditioners: dict[str, Conditioner] | None = None,
        space: PixelSpace | None = None,
        image_size: int = 32,
        channels: int = 3,
        schedule: ScheduleName = "cosine",
        num_timesteps: int = 1000,
        continuous_time: bool = False,
        log_snr_shift: float = 0.0,
        prediction: Prediction = "eps",
        loss_weighting: Literal["none", "min_snr"] = "none",
        min_snr_gamma: float = 5.0,
        learned_variance: bool = False,
        vlb_weight: float = 0.001,
        offset_noise: float = 0.0,
        cond_drop_prob: float = 0.1,
        tokenizer_vocab_size: int | None = 512,
        text_cache: dict[str, Any] | None = None,
        ema_decay: float | None = 0.999,
        channels_last: bool = False,
        sampler: Sampler | None = None,
        guidance_scale: float = 3.0,
        thresholding: Thresholding = "static",
        threshold_percentile: float = 0.995,
        sample_batch_size: int = 256,
        bpd_images: int = 0,
    ):
        super().__init__()
        space = space or PixelSpace()
        check_arguments(condition, text_encoder, num_classes, cond_drop_prob, space, bpd_images)
        if learned_variance and continuous_time:
            raise ValueError("model.learned_variance=true needs a discrete schedule")
        space.check(image_size, channels)
        out_channels = getattr(net, "out_channels", None)
        if out_channels is not None and out_channels != channels * (1 + learned_variance):
            raise ValueError(
                f"model.net.out_channels={out_channels} must be {channels * (1 + learned_variance)}"
                f" for channels={channels} and learned_variance={learned_variance}"
            )
        self.space = space
        self.condition, self.num_classes = condition, num_classes
        self.pixel_size = image_size
        self.image_size = image_size // space.downsample_factor
        self.channels = channels
        self.prediction, self.cond_drop_prob = prediction, cond_drop_prob
        self.loss_weighting, self.min_snr_gamma = loss_weighting, min_snr_gamma
        self.learned_variance, self.vlb_weight = learned_variance, vlb_weight
        self.offset_noise = offset_noise
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.channels_last = channels_last
        self.sampler = sampler or Sampler()
        self.guidance_scale = guidance_scale
        self.thresholding, self.threshold_percentile = thresholding, threshold_percentile
        self.sample_batch_size, self.bpd_images = sample_batch_size, bpd_images
        self.num_timesteps = num_timesteps
        self.schedule = Schedule(
            schedule, num_timesteps, continuous=continuous_time, log_snr_shift=log_snr_shift
        )
        self.alpha_bar_table = self.schedule.alpha_bar(torch.arange(num_timesteps))  # float64
        self.test_bpd = MeanMetric()
        built = build_conditioners(
            condition, text_encoder, num_classes, tokenizer_vocab_size, text_cache
        )
        modules = {"net": net, **built, **(conditioners or {})}
        self.denoiser = nn.ModuleDict(modules)
        if channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        self.ema = None if ema_decay is None else EMA(self.denoiser, decay=ema_decay)
        for conditioner in self.conditioners.values():
            conditioner.check(self)

    # ----------------------------------------------------------------------------------------
    # the parts
    @property
    def conditioners(self) -> dict[str, Conditioner]:
        """The conditioners by name, in the order they are applied."""
        return {k: m for k, m in self.denoiser.items() if isinstance(m, Conditioner)}

    def conditioner(self, kind: type[Conditioner]) -> Conditioner | None:
        """The conditioner of this kind, or None."""
        return next((c for c in self.conditioners.values() if isinstance(c, kind)), None)

    @property
    def capabilities(self) -> frozenset[str]:
        """What it can do (the model contract): inpainting and SDEdit in any space (not for a
        super-resolution stage), classifier guidance in pixel space, variations with a CLIP image
        embedding, negative prompts with a caption."""
        low_res, embed = (
            self.conditioner(LowResConditioner),
            self.conditioner(ImageEmbedConditioner),
        )
        found = {"generate"}
        if low_res is None:
            found |= {"inpaint", "img2img"}
            if self.space.pixel_space and self.condition != "text" and embed is None:
                found.add("classifier_guidance")
            if self.space.pixel_space and self.condition == "text" and embed is None:
                found.add("clip_guidance")
        if embed is not None:
            found.add("variations")
        if self.condition == "text" and embed is None:
            found.add("negative_prompt")
        return frozenset(found)

    @property
    def sampling_keys(self) -> frozenset[str]:
        keys = {"sampler", "steps", "guidance_scale", "thresholding"}
        if self.conditioner(LowResConditioner) is not None:
            keys.add("aug_level")
        return frozenset(keys)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape (C, H, W) of one image drawn (in pixels, also for latent diffusion)."""
        return (self.space.image_channels(self.channels), self.pixel_size, self.pixel_size)

    @property
    def uses_ema(self) -> bool:
        """Whether sampling and evaluation use the EMA weights."""
        return self.ema is not None

    @property
    def tokenizer(self) -> BPETokenizer | None:
        text = self.conditioner(TextConditioner)
        return None if text is None else text.tokenizer

    @tokenizer.setter
    def tokenizer(self, value: BPETokenizer | None) -> None:
        self.conditioner(TextConditioner).tokenizer = value

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The shape (C, H, W) of one sample of the diffusion space."""
        return (self.channels, self.image_size, self.image_size)

    def setup(self, stage: str) -> None:
        for conditioner in self.conditioners.values():
            conditioner.setup(self.trainer, self.config_name)

    @property
    def config_name(self) -> str:
        """The model config this is, for messages."""
        if self.conditioner(LowResConditioner) is not None:
            return "imagen_sr"
        if self.conditioner(ImageEmbedConditioner) is not None:
            return "unclip_decoder"
        return "ddpm" if self.space.pixel_space else "ldm"

    def on_fit_start(self) -> None:
        self.space.on_fit_start(self.trainer)
        for conditioner in self.conditioners.values():
            conditioner.on_fit_start(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for part in (self.space, *self.conditioners.values()):
            checkpoint.update(part.checkpoint_entries())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upgrade_state_dict_if_legacy(checkpoint)
        for part in (self.space, *self.conditioners.values()):
            part.check_checkpoint(checkpoint)

    # ----------------------------------------------------------------------------------------
    # conditions → network inputs
    def batch_conditions(self, batch: dict[str, Any], drop: torch.Tensor | None) -> Conditions:
        """Every conditioner's conditions of a batch; where ``drop`` is True the caption or
        label is the null one (conditioners with their own drop draw it here, in training)."""
        conditions: Conditions = {}
        for conditioner in self.conditioners.values():
            found = conditioner.from_batch(batch, training=self.training)
            if drop is not None and conditioner.shares_drop:
                found = conditioner.drop(found, drop)
            conditions |= found
        return conditions

    def null_conditions(self, conditions: Conditions) -> Conditions:
        """The null condition of classifier-free guidance for every row of ``conditions``."""
        null = dict(conditions)
        for conditioner in self.conditioners.values():
            null |= conditioner.null({k: conditions[k] for k in conditioner.keys})
        return null

    def network_inputs(self, denoiser: nn.ModuleDict, conditions: Conditions) -> dict[str, Any]:
        """The network's keyword inputs for ``conditions``, computed by ``denoiser``'s
        conditioners (the trained ones or their EMA copies)."""
        parts = [
            denoiser[name]({k: conditions[k] for k in conditioner.keys}, self.device)
            for name, conditioner in self.conditioners.items()
        ]
        return merge_inputs(parts)

    # ----------------------------------------------------------------------------------------
    # training
    def forward_loss(self, x0, t, eps, conditions, denoiser) -> dict[str, torch.Tensor]:
        """Per-sample losses at times t with noise eps (Ho et al. Alg. 1): ``loss`` to minimise,
        and its parts ``mse`` (as weighted) and, with a learned variance, ``vlb`` (bits/dim)."""
        alpha_bar_t = self.schedule.alpha_bar(t)  # (B,) float64
        alpha_bar = broadcast(alpha_bar_t, x0)  # (B, 1, 1, 1)
        x_t = q_sample(x0, eps, alpha_bar)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        inputs = self.network_inputs(denoiser, conditions)
        out = denoiser["net"](x_t, t, **inputs).float()
        if self.learned_variance:
            out, v = out.chunk(2, dim=1)
        mse = mse_per_sample(out, target(self.prediction, x0, eps, alpha_bar))
        if self.loss_weighting == "min_snr":
            weight = min_snr_weight(alpha_bar_t, self.prediction, self.min_snr_gamma)
            mse = mse * weight.to(mse.device)
        losses = {"loss": mse, "mse": mse}
        if self.learned_variance:
            # the bound trains only the variance: the mean comes from the detached prediction
            x0_hat = to_x0_eps(self.prediction, out.detach(), x_t.float(), alpha_bar)[0]
            vlb = vlb_term_bits(
                x0, x_t.float(), t, x0_hat, self.alpha_bar_table, var_frac=(v + 1) / 2
            )
            losses["vlb"] = vlb
            losses["loss"] = mse + self.vlb_weight * self.num_timesteps * vlb
        return losses

    def training_noise(self, x0: torch.Tensor) -> torch.Tensor:
        """ε ~ N(0, I), plus ``offset_noise`` × a per-(sample, channel) constant (Guttenberg 2023)."""
        eps = torch.randn(x0.shape, device=self.device)
        if self.offset_noise:
            offset = torch.randn((*x0.shape[:2], 1, 1), device=self.device)
            eps = eps + self.offset_noise * offset
        return eps

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = self.space.training_x0(batch, training=True)
        b = x0.shape[0]  # the global generators: reseeded per rank and step (StepSeeds)
        t = self.schedule.sample_t(b, device=self.device)
        eps = self.training_noise(x0)
        drop = torch.rand(b, device=self.device) < self.cond_drop_prob
        conditions = self.batch_conditions(batch, drop)
        losses = self.forward_loss(x0, t, eps, conditions, self.denoiser)
        loss = losses["loss"].mean()
        self.log("train/loss", loss, prog_bar=True)
        if self.learned_variance:
            self.log_dict({"train/mse": losses["mse"].mean(), "train/vlb": losses["vlb"].mean()})
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # here, so that a checkpoint written after the batch has it
            self.ema.update(self.denoiser)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.log("train/ema_decay", self.ema.current_decay())

    def evaluation_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per-sample loss with t and ε drawn from each item's ``index``: identical however the
        split is sharded over ranks or batched, so DDP and single-process evaluation agree."""
        x0 = self.space.encode(batch["image"], training=False)
        gens = [torch.Generator().manual_seed(int(i)) for i in batch["index"]]
        t = torch.cat([self.schedule.sample_t(1, generator=g) for g in gens])
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
        conditions = self.batch_conditions(batch, None)
        losses = self.forward_loss(
            x0, t.to(self.device), eps.to(self.device), conditions, self.eval_weights()
        )
        return losses["loss"]

    def eval_weights(self) -> nn.ModuleDict:
        """The EMA weights when there are any, else the trained ones."""
        return self.ema.module if self.ema is not None else self.denoiser

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.evaluation_loss(batch)
        self.log("val/loss", loss.mean(), batch_size=len(loss), sync_dist=True, prog_bar=True)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.evaluation_loss(batch)
        self.log("test/loss", loss.mean(), batch_size=len(loss), sync_dist=True)
        keep = batch["index"] < self.bpd_images
        if keep.any():
            self.test_bpd.update(self.bits_per_dim(batch, keep))

    def on_test_epoch_end(self) -> None:
        if self.bpd_images > 0:  # a torchmetrics mean: summed over ranks, however sharded
            self.log("test/bpd", self.test_bpd.compute())
            self.test_bpd.reset()

    def bits_per_dim(self, batch: dict[str, Any], keep: torch.Tensor) -> torch.Tensor:
        """The variational bound (bits/dim) of the kept items, with noise seeded by their index
        (so the figure does not depend on batching or ranks)."""
        images, indices = batch["image"][keep], batch["index"][keep].tolist()
        rows = keep.nonzero().flatten().tolist()
        conditions = take(self.batch_conditions(batch, None), rows)
        denoiser = self.sampling_denoiser(conditions, guidance_scale=1.0, thresholding="static")
        generators = [torch.Generator().manual_seed(int(i)) for i in indices]
        return bits_per_dim(denoiser, images, generator=generators)

    def configure_optimizers(self):
        return optimizers(
            self.optimizer_factory,
            self.lr_scheduler_factory,
            self.denoiser.parameters(),
            self.trainer,
        )

    # ----------------------------------------------------------------------------------------
    # sampling
    def sampling_options(
        self,
        *,
        sampler: Sampler | str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        thresholding: Thresholding | None = None,
        **extra: Any,
    ) -> SamplingOptions:
        """The model's sampling defaults with the given ones applied (None: the default)."""
        low_res = self.conditioner(LowResConditioner)
        found = {}
        if low_res is not None:
            level = extra.pop("aug_level", None)
            found["aug_level"] = low_res.sample_aug_level if level is None else float(level)
        unknown = sorted(k for k, v in extra.items() if v is not None)
        if unknown:
            raise ValueError(f"unknown sampling option(s) {unknown} for model={self.config_name}")
        spec = resolve_sampler(self.sampler, sampler, steps)
        return SamplingOptions(
            sampler=spec,
            guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
            thresholding=thresholding or self.thresholding,
            extra={"steps": spec.steps, **found},
        )

    def guided(self, guidance_scale: float) -> bool:
        """Whether sampling at this scale runs classifier-free guidance (a conditioner with a
        null and a scale other than 1)."""
        has_null = any(c.guided for c in self.conditioners.values())
        return has_null and guidance_scale != 1.0

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | None = None,
        *,
        n: int | None = None,
        labels: torch.Tensor | list[int] | None = None,
        low_res: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        sampler: Sampler | str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        thresholding: Thresholding | None = None,
        aug_level: float | None = None,
        classifier: Any = None,
        classifier_scale: float = 1.0,
        known: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        x_T: torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        init_image: torch.Tensor | None = None,
        strength: float | None = None,
        clip: Any = None,
        clip_guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Draw images in [-1, 1], shaped (N, C, H, W), with the EMA weights when there are any.

        Text models take ``prompts`` and draw ``n`` images per prompt (default 1), prompt-major;
        label models take ``labels`` (or ``n`` uniformly drawn labels); unconditional models take
        ``n``. A super-resolution stage also takes ``low_res`` (N, C, low, low), one per image
        to draw, at augmentation level ``aug_level``; the unCLIP decoder takes ``image_embeds``
        (E, d), draws ``n`` per embedding, and reads ``prompts`` (one per embedding) if given.
        Unset options take the model's defaults (:meth:`sampling_options`).

        ``classifier`` (a ``NoisyClassifier`` on the same schedule) guides towards ``labels``
        with ``classifier_scale`` (Dhariwal & Nichol 2021); an unconditional model then draws
        one image per label. ``known`` (N or 1, C, H, W) with ``mask`` (1 = keep) inpaints, in
        pixels (given in pixels for latent diffusion too: the known region is re-imposed in latents
        at every step, on the latent cells whose pixels are all known, and the known pixels are
        pasted over the decoded image). ``init_image`` (N or 1, C, H, W) with ``strength`` in
        [0, 1] (default 0.75) edits an image (SDEdit, Meng et al. 2022): it is noised to the time
        of the sampler's last round(strength · steps) grid times and denoised from there; strength
        0 returns it (through the first stage, for latent diffusion) and strength 1 is sampling
        from noise. ``x_T`` (N or 1, *sample_shape) replaces the starting noise drawn from
        ``generator``. ``clip`` (a noise-aware CLIP on the same schedule) with
        ``clip_guidance_scale`` s guides each image towards its prompt (GLIDE's CLIP guidance,
        Nichol et al. 2022, §2.3: the mean shifted by s Σ ∇ f(x_t) · g(c), here as the
        equivalent shift of ε̂ for every sampler); usually with ``guidance_scale=1``.
        ``negative_prompt`` (one for all, or one per prompt) replaces the empty caption of
        classifier-free guidance, so guidance steers away from it (Stable Diffusion's negative
        prompts); it needs a guidance scale other than 1.
        """
        options = self.sampling_options(
            sampler=sampler,
            steps=steps,
            guidance_scale=guidance_scale,
            thresholding=thresholding,
            aug_level=aug_level,
        )
        request = {"prompts": prompts, "n": n, "labels": labels, "low_res": low_res}
        request["aug_level"] = options.extra.get("aug_level")
        conditions, rows = generation_conditions(
            self, request | {"image_embeds": image_embeds, "classifier": classifier}, generator
        )
        negatives = None
        if negative_prompt is not None:
            negatives = negative_captions(self, negative_prompt, prompts, n, options.guidance_scale)
        targets = torch.as_tensor(labels).long() if classifier is not None else None
        clip_captions = check_clip_guidance(self, clip, clip_guidance_scale, conditions)
        shape, image_shape = (rows, *self.sample_shape), (rows, *self.image_shape)
        if known is not None:
            if "inpaint" not in self.capabilities:
                raise ValueError(
                    f"known= (inpainting) is not available for model={self.config_name}: "
                    "a super-resolution stage draws from its low-resolution input"
                )
            known, mask = check_inpainting(known, mask, image_shape)
            known, mask = known.to(self.device), mask.to(self.device)
            known_x0 = self.space.encode(known, training=False)
            known_mask = self.space.latent_mask(mask)
        init = check_edit(self, init_image, strength, image_shape)
        init_x0 = None if init is None else self.space.encode(init.to(self.device), training=False)
        if strength is None:
            strength = 1.0 if init is None else DEFAULT_STRENGTH
        ts = options.sampler.timesteps(self.schedule, strength)
        noise = initial_noise(shape, x_T, generator)
        chunks = []
        for start in range(0, rows, self.sample_batch_size):
            part = slice(start, start + self.sample_batch_size)
            # classifier-free guidance, a gradient guide, thresholding (of the guided x̂0), inpainting
            gradient_guided = classifier is not None or clip_captions is not None
            denoiser = self.sampling_denoiser(
                take(conditions, part),
                guidance_scale=options.guidance_scale,
                thresholding="none" if gradient_guided else options.thresholding,
                negative=None if negatives is None else negatives[part],
            )
            if classifier is not None:
                guide = classifier.log_prob_grad(targets[part].to(self.device))
                denoiser = classifier_guidance(denoiser, guide, classifier_scale)
            if clip_captions is not None:
                guide = clip.guidance_grad(clip_captions[part])
                denoiser = classifier_guidance(denoiser, guide, clip_guidance_scale)
            if gradient_guided:
                denoiser = thresholded(denoiser, options.thresholding, self.threshold_percentile)
            if known is not None:
                part_known = known_x0[part] if len(known_x0) > 1 else known_x0
                denoiser = inpainting(denoiser, part_known, known_mask)
            x = noise[part].to(self.device)
            if init_x0 is not None and len(ts) < options.sampler.steps:  # strength < 1
                x0 = init_x0[part] if len(init_x0) > 1 else init_x0.expand_as(x)
                x = x0 if len(ts) == 0 else edit_start(x0, x, self.schedule.alpha_bar(ts[:1]))
            x = options.sampler(denoiser, x, generator=generator, timesteps=ts)
            images = self.space.decode(x).float()
            if known is not None:  # the known pixels exactly (a first stage only nears them)
                part_known = known[part] if len(known) > 1 else known
                images = mask * part_known + (1 - mask) * images
            chunks.append(images.cpu())
        return torch.cat(chunks).clamp(-1, 1)

    def sampling_denoiser(
        self,
        conditions: Conditions,
        *,
        guidance_scale: float,
        thresholding: Thresholding,
        negative: list[str] | None = None,
    ) -> Denoiser:
        """The (EMA) network as a ``Denoiser`` for ``conditions``, with classifier-free guidance
        against their null (or the ``negative`` captions, one per row) when the scale is not 1,
        then thresholding."""
        weights = self.eval_weights()

        def denoiser_for(inputs: dict[str, Any]) -> Denoiser:
            def net_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                if self.channels_last:
                    x_t = x_t.contiguous(memory_format=torch.channels_last)
                return weights["net"](x_t, t, **inputs)

            return from_network(
                net_fn, self.schedule, self.prediction, learned_variance=self.learned_variance
            )

        cond = self.network_inputs(weights, conditions)
        if self.guided(guidance_scale):
            null_conditions = self.null_conditions(conditions)
            if negative is not None:
                null_conditions["caption"] = list(negative)
            null = self.network_inputs(weights, null_conditions)
            denoiser = classifier_free_guidance(denoiser_for, cond, null, guidance_scale)
        else:
            denoiser = denoiser_for(cond)
        return thresholded(denoiser, thresholding, self.threshold_percentile)

    # ----------------------------------------------------------------------------------------
    # what a CLIP image embedding allows (the unCLIP decoder, Ramesh et al. 2022, §3.1-3.2)
    def image_embedder(self) -> ImageEmbedConditioner:
        embed = self.conditioner(ImageEmbedConditioner)
        if embed is None:
            raise ValueError(f"model={self.config_name} reads no CLIP image embedding")
        return embed

    @torch.no_grad()
    def variations(self, images: torch.Tensor, *, n: int | None = None, **kwargs) -> torch.Tensor:
        """``n`` decodings (default 1) of each image's CLIP embedding, image-major: images
        (B, C, H, W) in [-1, 1] of any size → (B · n, C, H, W) at the decoder's size."""
        images = torch.as_tensor(images).float().to(self.device)
        embeds = self.image_embedder().embed_images(images)
        return self.generate(None, image_embeds=embeds, n=n, **kwargs)

    @torch.no_grad()
    def interpolate(
        self, images: torch.Tensor, *, n: int | None = None, generator=None, **kwargs
    ) -> torch.Tensor:
        """Decodings of ``n`` (default 8, at least 2) embeddings along the slerp from the first
        image's CLIP embedding to the second's, all from one shared x_T: images (2, C, H, W) →
        (n, C, H, W)."""
        embeds = interpolation_embeddings(self.image_embedder(), images, n, self.device)
        x_T = initial_noise((1, *self.sample_shape), None, generator)
        return self.generate(None, image_embeds=embeds, generator=generator, x_T=x_T, **kwargs)
