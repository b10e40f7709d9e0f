"""What the first-stage autoencoders (VAE, VQ-GAN / VQ-VAE, dVAE) share: the reconstruction,
perceptual and adversarial losses and their training loop, written for Lightning 2's manual
optimization (taming-transformers' ``optimizer_idx`` loop no longer exists).

One training step on a batch x (Esser et al. 2021, Eq. 5–7; Rombach et al. 2022, App. G):

1. **Generator** (encoder, regulariser, decoder): x̂ = decode(encode(x)) and
   L_G = L_rec + L_reg + λ · w_adv · L_adv(D(x̂)), where L_rec is the per-pixel L1 (or L2) error
   plus ``perceptual_weight`` × LPIPS, L_reg is what the method adds (KL, codebook/commitment,
   Gumbel KL), and λ = ‖∇_L L_rec‖ / (‖∇_L L_adv‖ + δ) at the decoder's last layer L.
   The adversarial term starts at step ``disc_start``; before it, only this step runs.
2. **Discriminator** (from ``disc_start`` on): L_D on D(x) and D(sg[x̂]), hinge or
   non-saturating, then its own optimizer step.

Each optimizer step toggles the other optimizer's parameters off (``toggle_optimizer``), so the
generator step gives the discriminator no gradients and the other way round. ``global_step``
counts batches: Lightning counts every optimizer step of a manually optimized module, which
would double ``trainer.max_steps``, ``disc_start`` and the schedules once the discriminator
starts, so its step is taken without being counted (:func:`step_uncounted`). Gradients are
clipped by norm here (``grad_clip``): Lightning's ``gradient_clip_val`` does not apply to manual
optimization, and ``train.py`` hands the trainer's value to such a model instead.

Validation and test log the losses and, over the whole split, PSNR, SSIM and — for quantized
models — codebook usage and perplexity (``genlab.metrics.reconstruction``), with a warning when
usage collapses. rFID and the original-vs-reconstruction grid come from the callbacks, which call
:meth:`reconstruct`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from genlab.metrics.reconstruction import CodebookUsage, ReconstructionMetrics
from genlab.nn.adversarial import (
    AdversarialLoss,
    adaptive_weight,
    discriminator_loss,
    generator_loss,
)
from genlab.utils.lr_schedule import optimizers, step_uncounted
from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)


@dataclass
class AutoencoderOutput:
    """One training forward pass of a first stage.

    Attributes:
        reconstruction: x̂ (B, C, H, W).
        regularization: the weighted method-specific loss L_reg (scalar).
        logs: named scalars to log under ``<stage>/`` (unweighted parts, temperatures, ...).
        indices: code indices (B, h, w) of a quantized model, else None.
    """

    reconstruction: torch.Tensor
    regularization: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    indices: torch.Tensor | None = None


class FirstStage(L.LightningModule):
    """Base of the first-stage autoencoders: losses, the manual G/D loop, metrics.

    A subclass defines :meth:`forward_train` (one training forward pass), :meth:`reconstruct`
    (deterministic, eval mode) and the decoder's ``last_layer``; it sets ``num_codes`` when it
    quantizes.

    Args:
        decoder: the decoder network (its ``last_layer`` takes the adaptive weight's gradients).
        optimizer: partial optimizer of the autoencoder's parameters.
        lr_scheduler: partial scheduler ``(optimizer, total_steps=)`` for both optimizers, or None.
        discriminator: a patch discriminator, or None (no adversarial loss).
        disc_optimizer: partial optimizer of the discriminator (default: ``optimizer``'s).
        reconstruction: per-pixel error, ``"l1"`` (VQ-GAN, LDM) or ``"l2"``.
        perceptual: a perceptual distance ``(x̂, x) → (B,)`` (``genlab.nn.lpips.LPIPS``) or None.
        perceptual_weight: its weight in L_rec.
        disc_weight: w_adv, the adversarial weight on top of λ.
        disc_start: first step (batch) with the adversarial losses.
        disc_loss: ``"hinge"`` or ``"non_saturating"``.
        adaptive: scale the adversarial term by λ (Eq. 7); False: λ = 1.
        grad_clip: clip each optimizer's gradients to this norm (None or 0: no clipping).
        image_size, channels: the images the model encodes.
        usage_warning: warn when less than this share of the codes is used in a validation epoch.
    """

    capabilities = frozenset({"reconstruct"})  # the model contract (genlab.models.contract)
    condition = "none"
    uses_ema = False

    num_codes: int | None = None  # set by quantized models

    def __init__(
        self,
        *,
        decoder: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        discriminator: nn.Module | None = None,
        disc_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        reconstruction: Literal["l1", "l2"] = "l1",
        perceptual: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        disc_weight: float = 0.8,
        disc_start: int = 0,
        disc_loss: AdversarialLoss = "hinge",
        adaptive: bool = True,
        grad_clip: float | None = None,
        image_size: int = 32,
        channels: int = 3,
        usage_warning: float = 0.05,
    ):
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"model.reconstruction={reconstruction!r} must be l1 or l2")
        if disc_loss not in ("hinge", "non_saturating"):
            raise ValueError(f"model.disc_loss={disc_loss!r} must be hinge or non_saturating")
        if disc_start < 0 or disc_weight < 0 or perceptual_weight < 0:
            raise ValueError(
                f"model.disc_start={disc_start}, disc_weight={disc_weight} and perceptual_weight="
                f"{perceptual_weight} must be >= 0"
            )
        if image_size % getattr(decoder, "downsample_factor", 1):
            raise ValueError(
                f"model.image_size={image_size} is not divisible by the downsampling factor "
                f"f={decoder.downsample_factor} of the encoder/decoder"
            )
        min_size = getattr(discriminator, "min_size", 0)
        if image_size < min_size:
            raise ValueError(
                f"model.image_size={image_size} is too small for the discriminator's "
                f"layers={discriminator.layers}: it needs at least {min_size} px; lower layers"
            )
        self.automatic_optimization = False
        if perceptual_weight == 0:
            perceptual = None  # not computed: keep its 59 MB of VGG buffers out of the model
        self.decoder = decoder
        self.discriminator = discriminator
        self.perceptual = perceptual
        self.optimizer_factory = optimizer
        self.disc_optimizer_factory = disc_optimizer or optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.reconstruction, self.perceptual_weight = reconstruction, perceptual_weight
        self.disc_weight, self.disc_start, self.disc_loss = disc_weight, disc_start, disc_loss
        self.adaptive, self.grad_clip = adaptive, grad_clip
        self.image_size, self.channels = image_size, channels
        self.downsample_factor = decoder.downsample_factor
        self.latent_size = image_size // self.downsample_factor
        self.usage_warning = usage_warning
        if perceptual is not None:  # frozen, identical on every rank: DDP need not broadcast it
            self._ddp_params_and_buffers_to_ignore = [
                f"perceptual.{name}" for name, _ in perceptual.named_buffers()
            ] + [f"perceptual.{name}" for name, _ in perceptual.named_parameters()]
        self.metrics = nn.ModuleDict(
            {stage: ReconstructionMetrics() for stage in ("val_recon", "test_recon")}
        )

    def init_codebook_metrics(self) -> None:
        """Codebook usage metrics for a quantized model (call after setting ``num_codes``)."""
        for stage in ("val", "test"):
            self.metrics[f"{stage}_codes"] = CodebookUsage(self.num_codes)

    # ------------------------------------------------------------------------------------------
    # what a method defines
    def forward_train(self, images: torch.Tensor) -> AutoencoderOutput:
        raise NotImplementedError

    def forward_eval(self, images: torch.Tensor) -> AutoencoderOutput:
        """The validation pass: by default the training pass (in eval mode)."""
        return self.forward_train(images)

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """The parameters of everything but the discriminator (the perceptual net has none)."""
        skip = {id(p) for p in self.discriminator.parameters()} if self.discriminator else set()
        return [p for p in self.parameters() if id(p) not in skip]

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.last_layer

    # ------------------------------------------------------------------------------------------
    # losses
    def reconstruction_loss(self, reconstruction, images) -> dict[str, torch.Tensor]:
        """``rec`` = mean per-pixel error + perceptual_weight × mean LPIPS, and its parts."""
        x_hat, x = reconstruction.float(), images.float()
        pixel = (x_hat - x).abs().mean() if self.reconstruction == "l1" else F.mse_loss(x_hat, x)
        losses = {"pixel": pixel, "rec": pixel}
        if self.perceptual is not None and self.perceptual_weight > 0:
            perceptual = self.perceptual(x_hat, x).mean()
            losses["perceptual"] = perceptual
            losses["rec"] = pixel + self.perceptual_weight * perceptual
        return losses

    def adversarial_active(self) -> bool:
        return (
            self.discriminator is not None
            and self.disc_weight > 0
            and self.global_step >= self.disc_start
        )

    def adversarial_weight(self, rec: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        """λ of Esser et al. Eq. 7 (or 1 when ``adaptive`` is off), times ``disc_weight``."""
        if not self.adaptive:
            return torch.tensor(self.disc_weight, device=rec.device)
        return self.disc_weight * adaptive_weight(rec, adv, self.last_layer)

    # ------------------------------------------------------------------------------------------
    # training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["image"]
        opts = self.optimizers()
        opt_g, opt_d = (opts[0], opts[1]) if isinstance(opts, list) else (opts, None)
        adversarial = self.adversarial_active()

        if opt_d is not None:
            self.toggle_optimizer(opt_g)
        out = self.forward_train(images)
        losses = self.reconstruction_loss(out.reconstruction, images)
        loss = losses["rec"] + out.regularization
        logs = {f"train/{k}": v for k, v in {**losses, **out.logs}.items()}
        if adversarial:
            adv = generator_loss(self.discriminator(out.reconstruction), self.disc_loss)
            weight = self.adversarial_weight(losses["rec"], adv)
            loss = loss + weight * adv
            logs |= {"train/g_adv": adv, "train/adv_weight": weight}
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_and_step(opt_g, counted=True)
        if opt_d is not None:
            self.untoggle_optimizer(opt_g)

        if adversarial:
            self.toggle_optimizer(opt_d)
            real = self.discriminator(images.detach())
            fake = self.discriminator(out.reconstruction.detach())
            d_loss = discriminator_loss(real, fake, self.disc_loss)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            self.clip_and_step(opt_d, counted=False)
            self.untoggle_optimizer(opt_d)
            logs |= {
                "train/d_loss": d_loss,
                "train/d_real": real.float().mean(),
                "train/d_fake": fake.float().mean(),
            }
        self.step_schedulers(adversarial)
        logs["train/loss"] = loss
        self.log_dict({k: v.detach().float() for k, v in logs.items()}, prog_bar=False)
        self.log("loss", loss.detach(), prog_bar=True, logger=False)

    def clip_and_step(self, optimizer: Any, *, counted: bool) -> None:
        if self.grad_clip:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm"
            )
        if counted:
            optimizer.step()
        else:
            step_uncounted(optimizer)

    def step_schedulers(self, adversarial: bool) -> None:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        schedulers[0].step()
        if adversarial and len(schedulers) > 1:
            schedulers[1].step()

    def configure_optimizers(self):
        generator = optimizers(
            self.optimizer_factory,
            self.lr_scheduler_factory,
            self.autoencoder_parameters(),
            self.trainer,
        )
        if self.discriminator is None:
            return generator
        discriminator = optimizers(
            self.disc_optimizer_factory,
            self.lr_scheduler_factory,
            self.discriminator.parameters(),
            self.trainer,
        )
        return [generator, discriminator]

    # ------------------------------------------------------------------------------------------
    # evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    def evaluation_step(self, batch: dict[str, Any], stage: str) -> None:
        """Losses of the deterministic reconstruction, PSNR/SSIM and code usage (synced)."""
        images = batch["image"]
        out = self.forward_eval(images)
        losses = self.reconstruction_loss(out.reconstruction, images)
        values = {**losses, **out.logs, "loss": losses["rec"] + out.regularization}
        n = len(images)
        for name, value in values.items():
            self.log(f"{stage}/{name}", value.float(), batch_size=n, sync_dist=True)
        reconstruction = out.reconstruction.float().clamp(-1, 1)
        self.metrics[f"{stage}_recon"].update(reconstruction, images.float())
        if out.indices is not None and f"{stage}_codes" in self.metrics:
            self.metrics[f"{stage}_codes"].update(out.indices)

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")

    def log_epoch_metrics(self, stage: str) -> None:
        """PSNR, SSIM and codebook usage over the split (computed on every rank, synced)."""
        recon = self.metrics[f"{stage}_recon"]
        if recon.update_count == 0:
            return
        values = recon.compute()
        recon.reset()
        key = f"{stage}_codes"
        if key in self.metrics and self.metrics[key].update_count:
            codes = self.metrics[key]
            usage = codes.compute()
            codes.reset()
            values |= {"codebook_usage": usage["usage"], "perplexity": usage["perplexity"]}
            if stage == "val" and not self.trainer.sanity_checking:
                self.warn_collapse(float(usage["usage"]), float(usage["perplexity"]))
        for name, value in values.items():
            self.log(f"{stage}/{name}", value.float(), sync_dist=False)

    def warn_collapse(self, usage: float, perplexity: float) -> None:
        if usage < self.usage_warning:
            log.warning(
                f"codebook collapse: only {usage:.1%} of the {self.num_codes} codes were used in "
                f"validation (perplexity {perplexity:.1f}) at step {self.global_step}. Try "
                "kmeans_init, dead_code_threshold > 0, l2-normalised codes or a lower lr."
            )

    def describe_losses(self) -> str:
        parts = [f"{self.reconstruction} pixel loss"]
        if self.perceptual is not None and self.perceptual_weight > 0:
            describe = getattr(self.perceptual, "describe", None)
            what = describe() if callable(describe) else type(self.perceptual).__name__
            parts.append(f"perceptual x{self.perceptual_weight}: {what}")
        if self.discriminator is not None and self.disc_weight > 0:
            parts.append(
                f"{self.disc_loss} adversarial x{self.disc_weight} from step {self.disc_start}"
                + (" (adaptive weight)" if self.adaptive else "")
            )
        return "; ".join(parts)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            log.info(f"{type(self).__name__} losses: {self.describe_losses()}")
