"""Glow (Kingma & Dhariwal 2018): a multi-scale normalizing flow trained by exact log-likelihood.

The flow f (``genlab.nn.flows.MultiScaleFlow``: ActNorm, invertible 1×1 convolutions, affine
couplings, squeeze and split) maps an image y to standard normal latents ε = f(y), so that

    log p(y) = log N(f(y); 0, I) + log|det ∂f/∂y|                    (Glow Eq. 2–3)

**Dequantization and the change of variables.** A batch holds images x ∈ [-1, 1] (the data
contract); their 8-bit values are k = round((x + 1) · 127.5) ∈ {0, ..., 255}^D, D = C·H·W.
Training and evaluation model the dequantized y = (k + u) / 256 − 1/2 ∈ [−1/2, 1/2)^D with
u ~ U[0, 1)^D (uniform dequantization, Theis et al. 2016; Glow §5 and its code's ``x / 256 − .5``).
The density of v = k + u ∈ [0, 256)^D is p_v(v) = p(y) · 256^{−D}, and Jensen's inequality gives a
lower bound on the probability of the 8-bit image (Theis et al. 2016, Eq. 11; Ho et al. 2019 §3.1):

    log P(k) ≥ E_u [log p(y)] − D · log 256.

So the change-of-variables constant of the scaling y = v / 256 − 1/2 is −D · log 256, and

    bits/dim = −(log p(y) − D · log 256) / (D · log 2) = −log p(y) / (D · log 2) + 8,

bits per 8-bit sub-pixel, the figure Glow reports (3.35 on CIFAR-10): a model that spreads its
mass uniformly over [−1/2, 1/2)^D scores exactly 8. ``train/bpd`` is this figure on the batch with
fresh noise u (the global torch generator, which ``StepSeeds`` reseeds per rank and step), and is
the loss; ``val/bpd`` (= ``val/loss``, which the checkpoints monitor) and ``test/bpd`` draw u of
item i from a generator seeded with i (``batch["index"]``), so they do not depend on batching,
ranks or what ran before. They are single-sample estimates of the bound, i.e. upper bounds on
the true bits/dim in expectation.

**Sampling** (Glow §5.3): ε ~ N(0, T² I) at a temperature T (``temperature``, 0.7 by default as
in the paper's figures: lower T trades diversity for cleaner images), y = f⁻¹(ε), and the image
x = 256 · y / 127.5 ∈ [−1, 1] (the inverse of the scaling above at the dequantization noise's mean
u = 1/2), clamped.

**Class-conditional prior** (``condition: label``, Glow §5.2 "ycond"): every prior of the flow, the
top one and the splits', takes a learned per-class shift of its mean and log-scale; ``generate``
then draws the given ``labels`` (or ``n`` uniformly drawn ones).

**Numerics.** The flow always runs in float32 with autocast off, whatever the trainer's
precision: bf16 keeps 8 bits of mantissa, so under autocast the couplings' scales, the
log-determinants (sums of ~D terms) and hence the likelihood would be coarse, and the inverse
would no longer undo the forward pass to float precision — a flow under bf16 is unstable (not
measured here; Glow's code trains in fp32). ``trainer.precision: bf16-mixed`` thus buys nothing:
the recipe uses 32-true. Clip gradients with the trainer's ``gradient_clip_val``; the first
training batch initialises every ActNorm (data-dependent initialization, Glow §3.1). On data with
flat backgrounds (shapes) the couplings learn scales near 0, so far in the prior's tails the
inverse can overflow: ``generate`` returns such samples finite (±1, NaN → 0) and warns with their
count.

An exponential moving average of the weights (``ema_decay``, off by default; Glow's code calls it
Polyak averaging) is used for evaluation and sampling when on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch

from genlab.models.contract import SamplingOptions, check_no_prompts
from genlab.nn.ema import EMA
from genlab.nn.flows import MultiScaleFlow, standard_normal_log_prob
from genlab.utils.lr_schedule import optimizers
from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__)
LOG_256 = math.log(256.0)


def to_flow_space(images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """y = (k + u) / 256 − 1/2: images in [-1, 1] → their 8-bit values k, dequantized by ``noise``
    u ∈ [0, 1), scaled to [−1/2, 1/2)."""
    k = ((images.to(noise.dtype) + 1) * 127.5).round().clamp(0, 255)
    return (k + noise) / 256 - 0.5


def to_images(y: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from flow-space values y: x = (256 (y + 1/2) − 1/2) / 127.5 − 1 =
    256 y / 127.5 (the 8-bit value at the dequantization noise's mean), clamped."""
    return (y * (256 / 127.5)).clamp(-1, 1)


class Glow(L.LightningModule):
    """Glow trained by maximum likelihood; reports bits per dimension; samples at a temperature.

    Args:
        flow: the multi-scale flow (``genlab.nn.flows.MultiScaleFlow``).
        optimizer: partial optimizer, called with the parameters.
        lr_scheduler: partial scheduler called with ``(optimizer, total_steps=...)``, or None.
        condition: ``"none"`` or ``"label"`` (class-conditional prior; the batches need labels).
        num_classes: classes of ``condition="label"`` (the flow's ``num_classes`` too).
        image_size, channels: the images' shape.
        temperature: the default sampling temperature T of ``generate``.
        ema_decay: EMA decay of the weights used for evaluation and sampling, or None (no EMA).
        sample_batch_size: most images drawn at once by ``generate``.
    """

    capabilities = frozenset({"generate"})  # the model contract (genlab.models.contract)
    sampling_keys = frozenset({"temperature"})

    def __init__(
        self,
        *,
        flow: MultiScaleFlow,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        condition: Literal["none", "label"] = "none",
        num_classes: int | None = None,
        image_size: int = 32,
        channels: int = 3,
        temperature: float = 0.7,
        ema_decay: float | None = None,
        sample_batch_size: int = 256,
    ):
        super().__init__()
        self.check_config(flow, condition, num_classes, image_size, channels, temperature)
        self.condition, self.num_classes = condition, num_classes
        self.image_size, self.channels = image_size, channels
        self.temperature, self.sample_batch_size = temperature, sample_batch_size
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.flow = flow
        self.ema = None if ema_decay is None else EMA(flow, decay=ema_decay)

    @staticmethod
    def check_config(flow, condition, num_classes, image_size, channels, temperature) -> None:
        """ValueErrors that name the config key of an inconsistent setting."""
        if condition not in ("none", "label"):
            raise ValueError(f"model.condition={condition!r} must be none or label")
        if condition == "label" and not num_classes:
            raise ValueError("model.condition=label needs model.num_classes")
        wanted = num_classes if condition == "label" else None
        if flow.num_classes != wanted:
            raise ValueError(
                f"model.flow.num_classes={flow.num_classes} must be {wanted} for "
                f"model.condition={condition} (model.num_classes={num_classes})"
            )
        if flow.in_channels != channels:
            raise ValueError(
                f"model.flow.in_channels={flow.in_channels} must equal model.channels={channels}"
            )
        if image_size % 2**flow.num_levels:
            raise ValueError(
                f"model.image_size={image_size} must be divisible by 2^levels = "
                f"{2**flow.num_levels} (model.flow.levels={flow.num_levels})"
            )
        if temperature < 0:
            raise ValueError(f"model.temperature={temperature} must be >= 0")

    # ------------------------------------------------------------------------------------------
    # likelihood
    @property
    def uses_ema(self) -> bool:
        """Whether sampling and evaluation use the EMA weights."""
        return self.ema is not None

    def eval_flow(self) -> MultiScaleFlow:
        """The EMA weights when there are any, else the trained ones."""
        return self.ema.module if self.ema is not None else self.flow

    def labels_of(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The batch's class labels for a class-conditional model, else None."""
        if self.condition != "label":
            return None
        if "label" not in batch:
            raise ValueError(
                "model.condition=label needs class labels, but the batches have no 'label' "
                "(use a labelled dataset such as data=digits, mnist or cifar10)"
            )
        return batch["label"]

    def bits_per_dim(
        self,
        images: torch.Tensor,
        noise: torch.Tensor,
        labels: torch.Tensor | None = None,
        flow: MultiScaleFlow | None = None,
    ) -> torch.Tensor:
        """−(log p(y) − D log 256) / (D log 2) per image (B,) for images in [-1, 1] dequantized
        by ``noise`` u ∈ [0, 1) (see the module docstring), in the flow's dtype (float32)."""
        flow = self.flow if flow is None else flow
        dtype = next(flow.parameters()).dtype  # float32 even under autocast (float64 in tests)
        y = to_flow_space(images, noise.to(dtype))
        dims = y[0].numel()  # D = C·H·W
        with torch.autocast(device_type=y.device.type, enabled=False):
            latents, logdet = flow(y, labels)
            log_p = standard_normal_log_prob(latents) + logdet
        return -(log_p - dims * LOG_256) / (dims * math.log(2))

    # ------------------------------------------------------------------------------------------
    # training and evaluation
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        noise = torch.rand(images.shape, device=images.device)  # the global generator: StepSeeds
        fresh = not self.flow.initialized  # this batch initialises the ActNorms
        bpd = self.bits_per_dim(images, noise, self.labels_of(batch)).mean()
        if fresh and self.ema is not None:  # the average starts from the initialised weights
            self.ema.module.load_state_dict(self.flow.state_dict())
        self.log("train/loss", bpd, prog_bar=True)
        self.log("train/bpd", bpd)
        return bpd

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # here, so that a checkpoint written after the batch has it
            self.ema.update(self.flow)

    def evaluation_bpd(self, batch: dict[str, Any]) -> torch.Tensor:
        """Bits/dim per item with the dequantization noise of item i drawn from a generator seeded
        with i: identical however the split is sharded over ranks or batched."""
        images = batch["image"]
        generators = [torch.Generator().manual_seed(int(i)) for i in batch["index"]]
        noise = torch.stack([torch.rand(images.shape[1:], generator=g) for g in generators])
        return self.bits_per_dim(
            images, noise.to(images.device), self.labels_of(batch), self.eval_flow()
        )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        bpd = self.evaluation_bpd(batch).mean()
        size = len(batch["image"])
        self.log("val/bpd", bpd, batch_size=size, sync_dist=True)
        self.log("val/loss", bpd, batch_size=size, sync_dist=True, prog_bar=True)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        bpd = self.evaluation_bpd(batch).mean()
        size = len(batch["image"])
        self.log("test/bpd", bpd, batch_size=size, sync_dist=True)
        self.log("test/loss", bpd, batch_size=size, sync_dist=True)

    def configure_optimizers(self):
        return optimizers(
            self.optimizer_factory, self.lr_scheduler_factory, self.flow.parameters(), self.trainer
        )

    # ------------------------------------------------------------------------------------------
    # sampling
    def sampling_options(self, *, temperature: float | None = None) -> SamplingOptions:
        """The model's temperature, or the given one (the model contract)."""
        temperature = self.temperature if temperature is None else temperature
        return SamplingOptions("flow inverse", extra={"temperature": temperature})

    def sample_labels(self, n, labels, generator) -> torch.Tensor | None:
        """The labels to draw (class-conditional), or None; checks what the caller passed."""
        if self.condition != "label":
            if labels is not None:
                raise ValueError("this Glow is unconditional (model.condition=none): pass n")
            if n is None or n < 1:
                raise ValueError(f"Glow draws n >= 1 images (got n={n})")
            return None
        if labels is None:
            if n is None or n < 1:
                raise ValueError("this Glow is class-conditional: pass labels or n >= 1")
            return torch.randint(0, self.num_classes, (n,), generator=generator)
        labels = torch.as_tensor(labels).long().reshape(-1)
        if len(labels) == 0 or labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}); got {labels.tolist()}")
        return labels

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | None = None,
        *,
        n: int | None = None,
        labels: torch.Tensor | list[int] | None = None,
        generator: torch.Generator | None = None,
        temperature: float | None = None,
        **unused: Any,
    ) -> torch.Tensor:
        """Draw images (N, C, H, W) in [-1, 1]: ε ~ N(0, T² I), x = f⁻¹(ε) (Glow §5.3).

        Unconditional models draw ``n`` images; class-conditional ones draw one per entry of
        ``labels`` (or ``n`` uniformly drawn labels). ``temperature`` T defaults to the model's
        (0.7 in the config, as in the paper's samples). With the EMA weights when there are any.
        Sampling options of other models (sampler, guidance scale, ...) are ignored.
        """
        check_no_prompts(prompts, "Glow")
        chosen = self.sample_labels(n, labels, generator)
        count = n if chosen is None else len(chosen)
        temperature = self.temperature if temperature is None else float(temperature)
        device = "cpu" if generator is None else generator.device
        shapes = self.eval_flow().latent_shapes(self.image_size)
        latents = [
            torch.randn((count, *shape), generator=generator, device=device) * temperature
            for shape in shapes
        ]
        chunks = []
        for start in range(0, count, self.sample_batch_size):
            part = slice(start, start + self.sample_batch_size)
            part_labels = None if chosen is None else chosen[part].to(self.device)
            eps = [z[part].to(self.device) for z in latents]
            with torch.autocast(device_type=self.device.type, enabled=False):
                y = self.eval_flow().inverse(eps, part_labels)
            chunks.append(self.finite_images(y, temperature))
        return torch.cat(chunks)

    def finite_images(self, y: torch.Tensor, temperature: float) -> torch.Tensor:
        """Images from flow samples y, on the CPU, with overflowed values replaced.

        A coupling's inverse divides by its scale σ(ŝ + 2), which a flow trained on flat
        backgrounds drives close to 0: far in the tails of the prior (high T) the inverse can
        overflow. Such values become ±1 (NaN: 0) and a warning counts the images affected, so
        that metrics see, and count against the model, the broken images instead of failing.
        """
        broken = int((~torch.isfinite(y)).flatten(1).any(1).sum())
        if broken:
            log.warning(
                f"Glow: {broken} of {len(y)} samples overflowed in the inverse flow at "
                f"temperature {temperature} (their non-finite pixels are set to +-1 or 0)"
            )
        return to_images(torch.nan_to_num(y.float(), nan=0.0)).cpu()
