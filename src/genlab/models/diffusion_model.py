"""What every diffusion model of genlab shares: DDPM in pixel space (``models/ddpm.py``) and
latent diffusion on a frozen first stage (``models/ldm.py``).

One class, :class:`DiffusionModel`, holds the method of Ho et al. 2020 in whatever space a
subclass chooses (:meth:`DiffusionModel.to_diffusion_space` / :meth:`DiffusionModel.to_images`,
the identity here): a network learns to predict ε (or v, x0) from x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε at a
uniformly drawn t (Alg. 1), optionally with min-SNR weighting and, with a learned variance, the
hybrid loss of Nichol & Dhariwal 2021; sampling runs any sampler of
``genlab.diffusion.samplers`` (DDPM ancestral, DDIM, DPM-Solver++, Euler, Heun) on any number of
steps, with thresholding, classifier guidance and inpainting. Conditioning is on a caption — a
small Transformer over a BPE tokenizer trained on the dataset's captions, or a frozen pretrained
encoder (``genlab.nn.pretrained_text``: MiniLM, T5, a genlab CLIP's text tower) — its tokens read
by cross-attention and its pooled vector added to the timestep embedding; on a class label; or on
nothing. Classifier-free guidance (Ho & Salimans 2022): the condition is dropped with probability
``cond_drop_prob`` in training and the two predictions are mixed at sampling. An exponential
moving average of the weights is kept and used for sampling and evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from genlab.data.tokenizer import TOKENIZER_KEY, BPETokenizer, train_for_datamodule
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
from genlab.nn.ema import EMA
from genlab.utils.lr_schedule import optimizers


class DiffusionModel(L.LightningModule):
    """Text-, label- or un-conditional diffusion model with classifier-free guidance and EMA.

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
        continuous_time: train at real times with the schedule's continuous log-SNR (Kingma et
            al. 2021) instead of its T-step β table.
        log_snr_shift: added to the schedule's log-SNR (Hoogeboom et al. 2023).
        prediction: what the network predicts: ``"eps"``, ``"v"`` or ``"x0"``.
        loss_weighting: ``"none"`` (L_simple of the target, Ho et al. Eq. 14) or ``"min_snr"``
            (min(SNR, γ) in x0 terms, Hang et al. 2023, with γ = ``min_snr_gamma``).
        learned_variance: the network also outputs the variance interpolation (its
            ``out_channels`` must be twice ``channels``), trained by the hybrid loss
            L_simple + ``vlb_weight`` · L_vlb with a stop-gradient on the mean (Nichol &
            Dhariwal 2021, §3.1; L_vlb = T · L_t in bits/dim, so λ = 0.001 is the paper's).
        offset_noise: std of a per-channel constant added to the training noise (Guttenberg
            2023), which lets the model change an image's mean brightness.
        cond_drop_prob: probability of training on the null condition (for guidance).
        tokenizer_vocab_size: BPE vocabulary size, at most the text encoder's embedding rows.
        ema_decay: EMA decay (warmed up with the step count), or None for no EMA.
        channels_last: run the network in channels-last memory format (slower on CPU here,
            bench/train_throughput.py; may pay off on GPU).
        sampler: the default sampler of ``generate`` (``conf/sampler/``).
        guidance_scale: the default classifier-free guidance scale w (1: none).
        thresholding, threshold_percentile: x̂0 thresholding while sampling (``static`` for
            pixels in [-1, 1]; ``dynamic`` with a percentile, Saharia et al. 2022).
        sample_batch_size: most images denoised at once by ``generate``.
        bpd_images: in testing, also report the variational bound test/bpd (bits per
            dimension, T network evaluations per image) on the test items with index below this.
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
        if condition == "text" and text_encoder is None:
            raise ValueError("model.condition='text' needs a model.text_encoder")
        if condition == "label" and not num_classes:
            raise ValueError("model.condition='label' needs model.num_classes")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"model.cond_drop_prob={cond_drop_prob} must be in [0, 1)")
        if learned_variance and continuous_time:
            raise ValueError("model.learned_variance=true needs a discrete schedule")
        out_channels = getattr(net, "out_channels", None)
        if out_channels is not None and out_channels != channels * (1 + learned_variance):
            raise ValueError(
                f"model.net.out_channels={out_channels} must be {channels * (1 + learned_variance)}"
                f" for channels={channels} and learned_variance={learned_variance}"
            )
        self.condition, self.num_classes = condition, num_classes
        self.image_size, self.channels = image_size, channels
        self.prediction, self.cond_drop_prob = prediction, cond_drop_prob
        self.loss_weighting, self.min_snr_gamma = loss_weighting, min_snr_gamma
        self.learned_variance, self.vlb_weight = learned_variance, vlb_weight
        self.offset_noise = offset_noise
        self.tokenizer_vocab_size = tokenizer_vocab_size
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
        modules = {"net": net} if text_encoder is None else {"net": net, "text": text_encoder}
        self.denoiser = nn.ModuleDict(modules)
        if channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
        self.ema = None if ema_decay is None else EMA(self.denoiser, decay=ema_decay)
        self.tokenizer: BPETokenizer | None = None

    # ----------------------------------------------------------------------------------------
    # conditioning
    @property
    def uses_ema(self) -> bool:
        """Whether sampling and evaluation use the EMA weights."""
        return self.ema is not None

    @property
    def pretrained_text(self) -> bool:
        """Whether the text encoder is a frozen pretrained one that tokenizes for itself
        (``genlab.nn.pretrained_text``) rather than the trainable one over our BPE tokenizer."""
        return self.condition == "text" and callable(getattr(self.denoiser["text"], "encode", None))

    def setup(self, stage: str) -> None:
        """Train the BPE tokenizer on the training captions (once; rank 0's copy wins)."""
        if self.condition != "text" or self.tokenizer is not None or self.pretrained_text:
            return
        self.tokenizer = train_for_datamodule(
            self.trainer.datamodule,
            self.trainer.strategy,
            vocab_size=self.tokenizer_vocab_size,
            max_vocab_size=self.denoiser["text"].vocab_size,
            model=self.config_name,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint[TOKENIZER_KEY] = self.tokenizer.to_json()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if TOKENIZER_KEY in checkpoint:
            self.tokenizer = BPETokenizer.from_json(checkpoint[TOKENIZER_KEY])

    def condition_inputs(self, denoiser, captions=None, labels=None) -> dict[str, torch.Tensor]:
        """The network's condition keywords for captions (empty string = null) or labels
        (``num_classes`` = null)."""
        if self.condition == "text" and self.pretrained_text:
            encoding = denoiser["text"].encode(captions)
            mask = encoding.mask.to(self.device)
            return {"context": encoding.tokens, "context_mask": mask, "cond": encoding.pooled}
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
    # the space the diffusion runs in: pixels here, a first stage's latents in LDM
    config_name = "ddpm"  # the model config, for error messages

    def to_diffusion_space(self, images: torch.Tensor) -> torch.Tensor:
        """The data x0 the diffusion models, from a batch of images in [-1, 1]."""
        return images

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """Images from samples of the diffusion space."""
        return x0

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """The shape (C, H, W) of one sample of the diffusion space."""
        return (self.channels, self.image_size, self.image_size)

    # ----------------------------------------------------------------------------------------
    # training
    def forward_loss(self, x0, t, eps, cond_kwargs, denoiser) -> dict[str, torch.Tensor]:
        """Per-sample losses at times t with noise eps (Ho et al. Alg. 1): ``loss`` to minimise,
        and its parts ``mse`` (as weighted) and, with a learned variance, ``vlb`` (bits/dim)."""
        alpha_bar_t = self.schedule.alpha_bar(t)  # (B,) float64
        alpha_bar = broadcast(alpha_bar_t, x0)  # (B, 1, 1, 1)
        x_t = q_sample(x0, eps, alpha_bar)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        out = denoiser["net"](x_t, t, **self.condition_inputs(denoiser, **cond_kwargs)).float()
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
            shape = (*x0.shape[:2], 1, 1)
            offset = torch.randn(shape, device=self.device)
            eps = eps + self.offset_noise * offset
        return eps

    def training_data(self, batch: dict[str, Any]) -> torch.Tensor:
        """x0 of a training batch: its images in the diffusion space (LDM may read cached
        latents instead)."""
        return self.to_diffusion_space(batch["image"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = self.training_data(batch)
        b = x0.shape[0]  # the global generators: reseeded per rank and step (StepSeeds)
        t = self.schedule.sample_t(b, device=self.device)
        eps = self.training_noise(x0)
        drop = torch.rand(b, device=self.device) < self.cond_drop_prob
        losses = self.forward_loss(x0, t, eps, self.drop_condition(batch, drop), self.denoiser)
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
        x0 = self.to_diffusion_space(batch["image"])
        gens = [torch.Generator().manual_seed(int(i)) for i in batch["index"]]
        t = torch.cat([self.schedule.sample_t(1, generator=g) for g in gens])
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
        cond = self.drop_condition(
            batch, torch.zeros(len(gens), dtype=torch.bool, device=self.device)
        )
        losses = self.forward_loss(
            x0, t.to(self.device), eps.to(self.device), cond, self.eval_weights()
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
        if self.condition == "text":
            conds = [c for c, k in zip(batch["caption"], keep.tolist(), strict=True) if k]
        elif self.condition == "label":
            conds = batch["label"][keep].tolist()
        else:
            conds = [None] * len(images)
        denoiser = self.sampling_denoiser(conds, guidance_scale=1.0, thresholding="static")
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
    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | None = None,
        *,
        n: int | None = None,
        labels: torch.Tensor | list[int] | None = None,
        generator: torch.Generator | None = None,
        sampler: Sampler | str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        thresholding: Thresholding | None = None,
        classifier: Any = None,
        classifier_scale: float = 1.0,
        known: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        x_T: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw images in [-1, 1], shaped (N, C, H, W), with the EMA weights when there are any.

        Text models take ``prompts`` and draw ``n`` images per prompt (default 1), prompt-major;
        label models take ``labels`` (or ``n`` uniformly drawn labels); unconditional models take
        ``n``. Unset options take the model's defaults; ``sampler`` may be a ``Sampler`` or a
        name (that sampler's defaults), ``steps`` overrides its steps.

        ``classifier`` (a ``NoisyClassifier`` trained on the same schedule) guides towards
        ``labels`` with ``classifier_scale`` (Dhariwal & Nichol 2021); an unconditional model
        then draws one image per label. ``known`` (N or 1, C, H, W) with ``mask`` (1 = keep,
        broadcastable to it) inpaints: the masked region of the output equals ``known``.
        ``x_T`` (N or 1, *sample_shape) replaces the starting noise drawn from ``generator``
        (e.g. one x_T for every image of an interpolation).
        """
        spec = self.resolve_sampler(sampler, steps)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        thresholding = thresholding or self.thresholding
        conds = self.generation_conditions(prompts, n, labels, generator, classifier)
        targets = torch.as_tensor(labels).long().tolist() if classifier is not None else None
        shape = (len(conds), *self.sample_shape)
        if known is not None:
            known, mask = self.check_inpainting(known, mask, shape)
        if x_T is None:
            noise_device = "cpu" if generator is None else generator.device
            noise = torch.randn(shape, generator=generator, device=noise_device)  # (N, C, H, W)
        elif x_T.dim() != len(shape) or x_T.shape[1:] != shape[1:] or len(x_T) not in (1, shape[0]):
            raise ValueError(
                f"x_T of shape {tuple(x_T.shape)} must be (1 or {shape[0]}, "
                f"{', '.join(map(str, shape[1:]))})"
            )
        else:
            noise = x_T.float().expand(shape)
        chunks = []
        for start in range(0, len(conds), self.sample_batch_size):
            part = slice(start, start + self.sample_batch_size)
            denoiser = self.sampling_denoiser(
                conds[part], guidance_scale=scale, thresholding=thresholding
            )
            if classifier is not None:
                guide = classifier.log_prob_grad(torch.tensor(targets[part], device=self.device))
                denoiser = classifier_guidance(denoiser, guide, classifier_scale)
            if known is not None:
                part_known = known[part] if len(known) > 1 else known
                denoiser = inpainting(denoiser, part_known.to(self.device), mask.to(self.device))
            x_start = noise[part].to(self.device)
            chunks.append(
                self.to_images(spec(denoiser, x_start, generator=generator)).float().cpu()
            )
        return torch.cat(chunks).clamp(-1, 1)

    def resolve_sampler(self, sampler: Sampler | str | None, steps: int | None) -> Sampler:
        """The model's sampler, another one, or one by name; with ``steps`` replaced if given."""
        return resolve_sampler(self.sampler, sampler, steps)

    def check_inpainting(self, known, mask, shape):
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

    def generation_conditions(self, prompts, n, labels, generator, classifier=None) -> list:
        """One condition per image to draw: a caption, a label, or None."""
        if classifier is not None:
            if self.condition == "text":
                raise ValueError(
                    "classifier guidance needs a label-conditional or unconditional model"
                )
            if labels is None:
                raise ValueError("classifier guidance needs labels: the classes to guide towards")
            classifier.check_schedule(self.schedule)
            wanted = torch.as_tensor(labels).long()
            if wanted.min() < 0 or wanted.max() >= classifier.num_classes:
                raise ValueError(
                    f"labels must be in [0, {classifier.num_classes}) for the classifier; "
                    f"got {wanted.tolist()}"
                )
            if self.condition == "none":
                return [None] * len(torch.as_tensor(labels).reshape(-1))
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

    def condition_kwargs(self, conds: list, guided: bool) -> dict[str, Any]:
        """The :meth:`condition_inputs` keywords of the conditions to sample, followed by as many
        null conditions when ``guided`` (the unconditional half of classifier-free guidance)."""
        if self.condition == "text":
            return {"captions": conds + ([""] * len(conds) if guided else [])}
        if self.condition == "label":
            labels = conds + ([self.num_classes] * len(conds) if guided else [])
            return {"labels": torch.tensor(labels, device=self.device)}
        return {}

    def guided(self, guidance_scale: float) -> bool:
        """Whether sampling at this scale runs classifier-free guidance (a conditional model
        and a scale other than 1)."""
        return self.condition != "none" and guidance_scale != 1.0

    def sampling_denoiser(
        self, conds: list, *, guidance_scale: float, thresholding: Thresholding
    ) -> Denoiser:
        """The (EMA) network as a ``Denoiser`` for the given conditions, with classifier-free
        guidance when the scale is not 1 and the model is conditional, then thresholding."""
        weights = self.eval_weights()
        guided = self.guided(guidance_scale)
        net_kwargs = self.condition_inputs(weights, **self.condition_kwargs(conds, guided))

        def net_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if self.channels_last:
                x_t = x_t.contiguous(memory_format=torch.channels_last)
            return weights["net"](x_t, t, **net_kwargs)

        denoiser = from_network(
            net_fn, self.schedule, self.prediction, learned_variance=self.learned_variance
        )
        if guided:
            denoiser = classifier_free_guidance(denoiser, guidance_scale)
        return thresholded(denoiser, thresholding, self.threshold_percentile)
