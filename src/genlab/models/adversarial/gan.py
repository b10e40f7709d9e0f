"""Generative adversarial network: a DCGAN (Radford et al. 2016) generator G and discriminator D,
unconditional or conditioned on a class label or a caption through a projection discriminator
(Miyato & Koyama 2018).

The game (Goodfellow et al. 2014). G maps z ~ N(0, I) (and a condition y) to an image; D scores
images (logits), and the two minimise, with the losses of ``genlab.nn.adversarial``:

| ``loss`` | L_D | L_G |
| --- | --- | --- |
| ``non_saturating`` (Goodfellow et al. 2014, §3) | ½ (E softplus(−D(x)) + E softplus(D(G(z)))) | E softplus(−D(G(z))) |
| ``hinge`` (Lim & Ye 2017; Miyato et al. 2018) | ½ (E relu(1 − D(x)) + E relu(1 + D(G(z)))) | −E D(G(z)) |

plus, for D, the R1 penalty γ/2 · E‖∇ₓ D(x)‖² on real images (Mescheder et al. 2018, Eq. 9),
computed every ``r1_interval`` steps and then multiplied by the interval (lazy regularization,
Karras et al. 2020, StyleGAN2 §3.1). The ½ in L_D (taming-transformers' convention) makes a given
γ weigh twice as much against L_D as in papers that write L_D without it.

One training step on a batch (x, y), with manual optimization (Lightning 2 has no
``optimizer_idx``) and the global random generator, which ``StepSeeds`` reseeds per rank and
step so that a resumed run draws the same z:

1. **Generator**: z ~ N(0, I); x̂ = G(z, y); L_G from D(x̂, y); one step of G's optimizer with D's
   parameters switched off (``toggle_optimizer``); then the EMA of G moves one step, so that a
   checkpoint written after the batch holds it.
2. **Discriminator**: L_D (+ R1) from D(x, y) and D(sg[x̂], y); one step of D's optimizer. It is
   not counted in ``global_step``, which thus counts batches (``step_uncounted``).

Conditioning. The condition vector y is a caption's pooled text features — the masked mean of
a text encoder's token features (``conf/model/text_encoder/``: the small Transformer over a BPE
tokenizer trained on the training captions at setup and saved in checkpoints, or a frozen
pretrained encoder) — or a learned class embedding. G concatenates y to z and predicts the
scale and shift of its normalisations from it (conditional batch normalisation, de Vries et al.
2017, as Miyato & Koyama's generator does); D adds the projection ⟨V y, φ(x)⟩ to its score. G
and D each own their encoder (two copies of the configured one; a frozen one is shared): each is
trained by its own network's loss, and G's is averaged with it in the EMA.

Monitoring. ``train/d_real`` and ``train/d_fake`` are D's mean logits on the batch's real and
generated images, ``train/diversity`` the fakes' per-pixel standard deviation across the batch
over the reals': a collapsing G shows as d_fake falling away from d_real and diversity sinking
towards 0. Validation (and test) scores the split's real images against as many images of the
(EMA) generator drawn from z seeded by each item's ``index`` with the item's condition, so the
numbers do not depend on batching or ranks: ``val/loss`` is D's loss L_D (without R1) there,
with ``val/d_real``, ``val/d_fake`` and ``val/g_loss``. A GAN's losses do not measure sample
quality — lower ``val/loss`` means a D that separates better, not a better G — so
``experiment=gan_shapes`` keeps the latest checkpoint rather than the lowest val/loss; FID and
caption accuracy come from the generative-metrics callback. A ``val/d_real`` well below
``train/d_real`` shows D overfitting its training images (Karras et al. 2020, ADA, §3).

Sampling draws z ~ N(0, I) with the EMA weights when there are any, optionally truncated (every
component beyond ±``truncation`` redrawn: the truncation trick, Brock et al. 2019, §3.1) and
scaled by ``temperature``; one pass of G, no guidance.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from genlab.data.tokenizer import TOKENIZER_KEY, BPETokenizer, train_for_datamodule
from genlab.models.contract import SamplingOptions, check_prompts
from genlab.nn.adversarial import AdversarialLoss, discriminator_loss, generator_loss
from genlab.nn.ema import EMA
from genlab.nn.gan import r1_penalty
from genlab.utils.lr_schedule import optimizers, step_uncounted
from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

Condition = Literal["text", "label", "none"]


def sample_latents(
    n: int,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    truncation: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """z ~ N(0, I) of shape (n, dim) on the generator's device; with ``truncation``, every
    component beyond ±truncation is redrawn until none is (Brock et al. 2019, §3.1); then scaled
    by ``temperature``."""
    device = "cpu" if generator is None else generator.device
    z = torch.randn(n, dim, generator=generator, device=device)
    if truncation is not None:
        outside = z.abs() > truncation
        while outside.any():
            z[outside] = torch.randn(int(outside.sum()), generator=generator, device=device)
            outside = z.abs() > truncation
    return z * temperature


class GAN(L.LightningModule):
    """DCGAN with a projection discriminator, R1 and an EMA generator (see the module docstring).

    Args:
        generator: a partial ``genlab.nn.gan.DCGANGenerator``; the model fills in
            ``image_size``, ``out_channels`` and ``cond_dim``.
        discriminator: a partial ``genlab.nn.gan.DCGANDiscriminator``; the model fills in
            ``image_size``, ``in_channels`` and ``cond_dim``.
        optimizer: partial optimizer of G (and its condition encoder).
        disc_optimizer: partial optimizer of D (default: ``optimizer``'s).
        lr_scheduler: partial scheduler ``(optimizer, total_steps=)`` for both, or None.
        text_encoder: maps captions to features; required when ``condition="text"``.
        condition: ``"text"`` (captions), ``"label"`` (class labels) or ``"none"``.
        num_classes: labels for ``condition="label"``.
        label_dim: size of the class embeddings y for ``condition="label"``.
        image_size, channels: the images generated.
        loss: ``"non_saturating"`` or ``"hinge"``.
        r1_gamma: γ of the R1 penalty (0: off).
        r1_interval: compute R1 every this many steps, weighted by it (1: every step).
        ema_decay: EMA decay of G's weights (warmed up with the step count), or None: no EMA.
        grad_clip: clip each optimizer's gradients to this norm (None or 0: no clipping).
        tokenizer_vocab_size: BPE vocabulary size, at most the text encoder's embedding rows.
        truncation: default truncation of z in ``generate`` (None: none).
        temperature: default scale of z in ``generate``.
        sample_batch_size: most images drawn at once by ``generate``.
    """

    capabilities = frozenset({"generate"})  # the model contract (genlab.models.contract)
    sampling_keys = frozenset({"truncation", "temperature"})

    config_name = "gan"  # the model config, for error messages

    def __init__(
        self,
        *,
        generator: Callable[..., nn.Module],
        discriminator: Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer],
        disc_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        text_encoder: nn.Module | None = None,
        condition: Condition = "text",
        num_classes: int | None = None,
        label_dim: int = 128,
        image_size: int = 32,
        channels: int = 3,
        loss: AdversarialLoss = "non_saturating",
        r1_gamma: float = 0.0,
        r1_interval: int = 1,
        ema_decay: float | None = 0.999,
        grad_clip: float | None = None,
        tokenizer_vocab_size: int | None = 512,
        truncation: float | None = None,
        temperature: float = 1.0,
        sample_batch_size: int = 256,
    ):
        super().__init__()
        self.check_options(condition, text_encoder, num_classes, loss, r1_gamma, r1_interval)
        self.check_sampling_options(truncation, temperature, prefix="model.")
        for key, network in (("generator", generator), ("discriminator", discriminator)):
            if isinstance(network, nn.Module):
                raise ValueError(
                    f"model.{key} must be a partial config (_partial_: true): the model fills in "
                    "image_size, channels and cond_dim"
                )
        self.automatic_optimization = False
        self.condition, self.num_classes = condition, num_classes
        self.image_size, self.channels = image_size, channels
        self.loss, self.r1_gamma, self.r1_interval = loss, r1_gamma, r1_interval
        self.grad_clip, self.tokenizer_vocab_size = grad_clip, tokenizer_vocab_size
        self.truncation, self.temperature = truncation, temperature
        self.sample_batch_size = sample_batch_size
        self.optimizer_factory = optimizer
        self.disc_optimizer_factory = disc_optimizer or optimizer
        self.lr_scheduler_factory = lr_scheduler
        g_cond, d_cond = self.condition_encoders(text_encoder, label_dim)
        cond_dim = {"text": getattr(text_encoder, "width", 0), "label": label_dim}.get(condition, 0)
        g_net = generator(image_size=image_size, out_channels=channels, cond_dim=cond_dim)
        d_net = discriminator(image_size=image_size, in_channels=channels, cond_dim=cond_dim)
        self.generator = nn.ModuleDict({"net": g_net, **g_cond})
        self.discriminator = nn.ModuleDict({"net": d_net, **d_cond})
        self.z_dim = g_net.z_dim
        self.ema = None if ema_decay is None else EMA(self.generator, decay=ema_decay)
        self.tokenizer: BPETokenizer | None = None
        if r1_gamma > 0 and getattr(d_net, "norm", None) == "batch":
            log.warning(
                "model.r1_gamma > 0 with model.discriminator.norm=batch: batch statistics mix the "
                "samples, so R1 no longer penalises each image's own gradient; use group or none"
            )

    @staticmethod
    def check_options(condition, text_encoder, num_classes, loss, r1_gamma, r1_interval) -> None:
        """Refuse a bad config with the key, the value and what is allowed."""
        if condition not in ("text", "label", "none"):
            raise ValueError(f"model.condition={condition!r} must be text, label or none")
        if condition == "text" and text_encoder is None:
            raise ValueError("model.condition='text' needs a model.text_encoder")
        if condition == "label" and not num_classes:
            raise ValueError("model.condition='label' needs model.num_classes >= 1")
        if loss not in ("hinge", "non_saturating"):
            raise ValueError(f"model.loss={loss!r} must be hinge or non_saturating")
        if r1_gamma < 0 or r1_interval < 1:
            raise ValueError(
                f"model.r1_gamma={r1_gamma} must be >= 0 and model.r1_interval={r1_interval} >= 1"
            )

    @staticmethod
    def check_sampling_options(truncation: float | None, temperature: float, prefix="") -> None:
        if truncation is not None and truncation <= 0:
            raise ValueError(f"{prefix}truncation={truncation} must be > 0 (or null: none)")
        if temperature < 0:
            raise ValueError(f"{prefix}temperature={temperature} must be >= 0")

    def condition_encoders(self, text_encoder, label_dim: int) -> tuple[dict, dict]:
        """G's and D's own condition encoders: a text encoder and its copy, or two class
        embeddings, or none."""
        if self.condition == "text":
            return {"text": text_encoder}, {"text": copy.deepcopy(text_encoder)}
        if self.condition == "label":
            return (
                {"label": nn.Embedding(self.num_classes, label_dim)},
                {"label": nn.Embedding(self.num_classes, label_dim)},
            )
        return {}, {}

    # ----------------------------------------------------------------------------------------
    # conditioning
    @property
    def uses_ema(self) -> bool:
        """Whether sampling and evaluation use the EMA weights of G."""
        return self.ema is not None

    def eval_generator(self) -> nn.ModuleDict:
        """G (and its condition encoder) with the EMA weights when there are any."""
        return self.ema.module if self.ema is not None else self.generator

    @property
    def pretrained_text(self) -> bool:
        """Whether the text encoder is a frozen pretrained one that tokenizes for itself
        (``genlab.nn.pretrained_text``) rather than the trainable one over our BPE tokenizer."""
        return self.condition == "text" and callable(
            getattr(self.generator["text"], "encode", None)
        )

    def setup(self, stage: str) -> None:
        """Train the BPE tokenizer on the training captions (once; rank 0's copy wins)."""
        if stage == "fit":
            log.info(f"GAN: {self.describe()}")
        if self.condition != "text" or self.tokenizer is not None or self.pretrained_text:
            return
        self.tokenizer = train_for_datamodule(
            self.trainer.datamodule,
            self.trainer.strategy,
            vocab_size=self.tokenizer_vocab_size,
            max_vocab_size=self.generator["text"].vocab_size,
            model=self.config_name,
        )

    def describe(self) -> str:
        parts = [f"{self.loss} loss", f"condition {self.condition}"]
        if self.r1_gamma > 0:
            parts.append(f"R1 gamma={self.r1_gamma} every {self.r1_interval} step(s)")
        parts.append(f"EMA {self.ema.decay}" if self.ema is not None else "no EMA")
        return ", ".join(parts)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint[TOKENIZER_KEY] = self.tokenizer.to_json()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if TOKENIZER_KEY in checkpoint:
            self.tokenizer = BPETokenizer.from_json(checkpoint[TOKENIZER_KEY])

    def batch_condition(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The :meth:`condition_vector` keywords of a batch: its captions or labels."""
        key = {"text": "caption", "label": "label"}.get(self.condition)
        if key is None:
            return {}
        if key not in batch:
            raise ValueError(
                f"model.condition={self.condition!r} needs a {key!r} in every batch, but the "
                f"data gives only {sorted(batch)}"
            )
        return {"captions": list(batch[key])} if key == "caption" else {"labels": batch[key]}

    def condition_vector(self, modules: nn.ModuleDict, captions=None, labels=None):
        """y (B, cond_dim) from ``modules``' encoder (G's, D's or the EMA's), or None."""
        if self.condition == "text":
            encoder = modules["text"]
            if self.pretrained_text:
                return encoder.encode(captions).pooled.to(self.device)
            if self.tokenizer is None:
                raise RuntimeError("the text tokenizer is not trained: call setup() or load a ckpt")
            ids, mask = self.tokenizer.encode(captions, context_length=encoder.context_length)
            length = int(mask.sum(1).max())  # the key mask hides padding: dropping it is exact
            ids, mask = ids[:, :length].to(self.device), mask[:, :length].to(self.device)
            return encoder(ids, mask)[1]  # the masked mean of the token features (B, width)
        if self.condition == "label":
            return modules["label"](torch.as_tensor(labels, device=self.device).long())
        return None

    # ----------------------------------------------------------------------------------------
    # training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        images = batch["image"]
        step = self.global_step  # batches so far: D's steps are not counted
        opt_g, opt_d = self.optimizers()
        cond = self.batch_condition(batch)
        z = torch.randn(len(images), self.z_dim, device=self.device)  # global RNG (StepSeeds)
        fake, logs = self.generator_step(opt_g, z, cond)
        logs |= self.discriminator_step(opt_d, images, fake.detach(), cond, step)
        logs["diversity"] = fake.detach().float().std(0).mean() / images.float().std(0).mean()
        if self.ema is not None:
            logs["ema_decay"] = torch.tensor(self.ema.current_decay())
        self.step_schedulers()
        self.log_dict({f"train/{k}": v.detach().float() for k, v in logs.items()})
        self.log_dict(
            {"d_loss": logs["d_loss"], "g_loss": logs["g_loss"]}, prog_bar=True, logger=False
        )

    def generator_step(self, opt_g, z: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict]:
        """One step of G on L_G, then one EMA update; returns the fakes x̂ and the logs."""
        self.toggle_optimizer(opt_g)
        fake = self.generator["net"](z, self.condition_vector(self.generator, **cond))
        fake_logits = self.discriminator["net"](
            fake, self.condition_vector(self.discriminator, **cond)
        )
        g_loss = generator_loss(fake_logits, self.loss)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        self.clip_and_step(opt_g, counted=True)
        self.untoggle_optimizer(opt_g)
        if self.ema is not None:  # here, so that a checkpoint written after the batch has it
            self.ema.update(self.generator)
        return fake, {"g_loss": g_loss}

    def discriminator_step(self, opt_d, images, fake, cond: dict, step: int) -> dict:
        """One step of D on L_D, plus the lazy R1 penalty when ``step`` is due; returns the logs."""
        self.toggle_optimizer(opt_d)
        regularize = self.r1_gamma > 0 and step % self.r1_interval == 0
        loss, logs = self.discriminator_objective(images, fake, cond, regularize=regularize)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_and_step(opt_d, counted=False)
        self.untoggle_optimizer(opt_d)
        return logs

    def discriminator_objective(
        self, images: torch.Tensor, fake: torch.Tensor, cond: dict, *, regularize: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """D's objective L_D [+ γ/2 · r1_interval · R1] on real ``images`` and detached ``fake``
        ones, and its logs: ``d_loss`` (L_D), ``d_real``, ``d_fake`` (mean logits) and ``r1``
        (E‖∇ₓ D(x)‖², when ``regularize``)."""
        real = images.detach().requires_grad_(regularize)
        d_cond = self.condition_vector(self.discriminator, **cond)
        real_logits = self.discriminator["net"](real, d_cond)  # (B,)
        fake_logits = self.discriminator["net"](fake.detach(), d_cond)
        d_loss = discriminator_loss(real_logits, fake_logits, self.loss)
        logs = {"d_loss": d_loss, "d_real": real_logits.mean(), "d_fake": fake_logits.mean()}
        if not regularize:
            return d_loss, logs
        logs["r1"] = r1_penalty(real_logits, real).mean()
        return d_loss + 0.5 * self.r1_gamma * self.r1_interval * logs["r1"], logs  # lazy: × k

    def clip_and_step(self, optimizer: Any, *, counted: bool) -> None:
        """Clip the gradients (``grad_clip``), then step, counted in ``global_step`` or not."""
        if self.grad_clip:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm"
            )
        if counted:
            optimizer.step()
        else:
            step_uncounted(optimizer)

    def step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()

    def configure_optimizers(self):
        generator = optimizers(
            self.optimizer_factory,
            self.lr_scheduler_factory,
            self.generator.parameters(),
            self.trainer,
        )
        discriminator = optimizers(
            self.disc_optimizer_factory,
            self.lr_scheduler_factory,
            self.discriminator.parameters(),
            self.trainer,
        )
        return [generator, discriminator]

    # ----------------------------------------------------------------------------------------
    # evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluation_step(batch, "test")

    def evaluation_scores(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """D's logits (B,) on the batch's real images and on as many images of the (EMA) G, each
        drawn from z seeded by the item's ``index`` with the item's condition."""
        images = batch["image"]
        generators = [torch.Generator().manual_seed(int(i)) for i in batch["index"]]
        z = torch.stack([torch.randn(self.z_dim, generator=g) for g in generators])
        cond = self.batch_condition(batch)
        weights = self.eval_generator()
        fake = weights["net"](z.to(self.device), self.condition_vector(weights, **cond))
        d_cond = self.condition_vector(self.discriminator, **cond)
        return self.discriminator["net"](images, d_cond), self.discriminator["net"](fake, d_cond)

    def evaluation_step(self, batch: dict[str, Any], stage: str) -> None:
        """Log ``<stage>/loss`` (L_D), ``d_real``, ``d_fake`` and ``g_loss`` (synced means)."""
        real, fake = self.evaluation_scores(batch)
        values = {
            "loss": discriminator_loss(real, fake, self.loss),
            "g_loss": generator_loss(fake, self.loss),
            "d_real": real.float().mean(),
            "d_fake": fake.float().mean(),
        }
        for name, value in values.items():
            self.log(
                f"{stage}/{name}",
                value,
                batch_size=len(real),
                sync_dist=True,
                prog_bar=name == "loss" and stage == "val",
            )

    # ----------------------------------------------------------------------------------------
    # sampling
    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``truncation`` and ``temperature``: those of ``options`` where given, else the
        model's."""
        opts = {
            name: getattr(self, name) if options.get(name) is None else options[name]
            for name in ("truncation", "temperature")
        }
        self.check_sampling_options(**opts)
        return opts

    def sampling_options(self, **given: Any) -> SamplingOptions:
        """The model's truncation and temperature with ``given`` applied (the model contract)."""
        return SamplingOptions("generator (one pass)", extra=self.resolve_options(given))

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | None = None,
        *,
        n: int | None = None,
        labels: torch.Tensor | list[int] | None = None,
        generator: torch.Generator | None = None,
        truncation: float | None = None,
        temperature: float | None = None,
    ) -> torch.Tensor:
        """Draw images (N, C, H, W) in [-1, 1] in one pass of G, with the EMA weights when there
        are any.

        Text models take ``prompts`` and draw ``n`` images per prompt (default 1), prompt-major;
        label models take ``labels`` (or ``n`` labels drawn uniformly); unconditional models
        take ``n``. z ~ N(0, I) comes from ``generator``, truncated at ``truncation`` and scaled
        by ``temperature`` (default: the model's).
        """
        options = self.resolve_options({"truncation": truncation, "temperature": temperature})
        conds = self.generation_conditions(prompts, n, labels, generator)
        z = sample_latents(len(conds), self.z_dim, generator=generator, **options)  # (N, z_dim)
        weights = self.eval_generator()
        chunks = []
        for start in range(0, len(conds), self.sample_batch_size):
            part = conds[start : start + self.sample_batch_size]
            y = self.condition_vector(weights, **self.condition_kwargs(part))
            x = weights["net"](z[start : start + len(part)].to(self.device), y)
            chunks.append(x.float().cpu())
        return torch.cat(chunks).clamp(-1, 1)

    def generation_conditions(self, prompts, n, labels, generator) -> list:
        """One condition per image to draw: a caption, a label, or None."""
        if self.condition == "text":
            if prompts is None or isinstance(prompts, str) or labels is not None:
                raise ValueError("this GAN is text-conditional: pass prompts as a list of str")
            check_prompts(prompts)
            if n is not None and n < 1:
                raise ValueError(f"n={n}: draw at least one image per prompt")
            return [p for p in prompts for _ in range(n or 1)]
        if prompts is not None:
            raise ValueError(f"this GAN is {self.condition}-conditional: it takes no prompts")
        if self.condition == "label":
            if labels is None:
                if n is None or n < 1:
                    raise ValueError(
                        f"this GAN is label-conditional: pass labels or n >= 1 (n={n})"
                    )
                labels = torch.randint(0, self.num_classes, (n,), generator=generator)
            labels = torch.as_tensor(labels).long().reshape(-1)
            if len(labels) == 0 or labels.min() < 0 or labels.max() >= self.num_classes:
                raise ValueError(
                    f"labels must be a non-empty list in [0, {self.num_classes}); got "
                    f"{labels.tolist()}"
                )
            return labels.tolist()
        if labels is not None or n is None or n < 1:
            raise ValueError(f"this GAN is unconditional: pass n >= 1 and no labels (n={n})")
        return [None] * n

    def condition_kwargs(self, conds: list) -> dict[str, Any]:
        """The :meth:`condition_vector` keywords of a list of conditions."""
        if self.condition == "text":
            return {"captions": conds}
        if self.condition == "label":
            return {"labels": conds}
        return {}
