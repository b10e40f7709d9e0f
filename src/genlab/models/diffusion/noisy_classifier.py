"""A noisy-image classifier p_φ(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021).

The whole method in one file. The network (``genlab.nn.classifier``, the UNet's encoder half with
attention pooling, Dhariwal & Nichol 2021, §4 and App. A) reads an image noised by the forward
process, x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε (Ho et al. 2020, Eq. 4), at a uniformly drawn model time t
of a diffusion schedule, and is trained with cross-entropy on the image's label. At sampling,
``log_prob_grad(labels)`` gives ∇_{x_t} log p_φ(y | x_t, t), which
``genlab.diffusion.guidance.classifier_guidance`` adds to a diffusion model's score (their
Alg. 1 and 2). Guide only a diffusion model trained on the same schedule (``check_schedule``):
the classifier reads t on that schedule's time axis.

Evaluation draws each item's t and ε from a generator seeded by the item's ``index``, so the
figures do not depend on batching or on how ranks shard the split. Besides the loss and the
accuracy over all t it logs the accuracy per band of t, e.g. ``val/acc_t0-100`` (the low noise
levels at which guidance decides the details of an image).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from genlab.diffusion.denoiser import broadcast
from genlab.diffusion.parametrization import q_sample
from genlab.diffusion.schedules import Schedule, ScheduleName
from genlab.utils.lr_schedule import optimizers

BAND_EDGES = (0.0, 0.1, 0.25, 0.5, 1.0)  # accuracy bands of t, as fractions of T


class NoisyClassifier(L.LightningModule):
    """A classifier of noisy images trained on a diffusion schedule, for classifier guidance.

    Args:
        net: called as ``net(x_t, t) -> logits (B, num_classes)``.
        optimizer: partial optimizer, called with the parameters.
        lr_scheduler: partial scheduler called with ``(optimizer, total_steps=...)``, or None.
        num_classes: number of classes; the dataset's labels must be in [0, num_classes).
        image_size, channels: the shape of the images it classifies.
        schedule, num_timesteps, continuous_time, log_snr_shift: the noise schedule
            (``genlab.diffusion.schedules.Schedule``); the same as the guided diffusion model's.
        max_train_t: train (and evaluate) only at t < max_train_t, where guidance matters most;
            ``log_prob_grad`` then returns a zero gradient at larger t. None: every t.
    """

    capabilities = frozenset()  # the model contract (genlab.models.contract)

    def __init__(
        self,
        *,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        num_classes: int,
        image_size: int = 32,
        channels: int = 3,
        schedule: ScheduleName = "cosine",
        num_timesteps: int = 1000,
        continuous_time: bool = False,
        log_snr_shift: float = 0.0,
        max_train_t: float | None = None,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"model.num_classes={num_classes} must be at least 2")
        net_classes = getattr(net, "num_classes", num_classes)
        if net_classes != num_classes:
            raise ValueError(
                f"model.net.num_classes={net_classes} must equal model.num_classes={num_classes}"
            )
        if max_train_t is not None and not 0 < max_train_t <= num_timesteps:
            raise ValueError(
                f"model.max_train_t={max_train_t} must be in (0, {num_timesteps}] "
                "(model.num_timesteps) or null"
            )
        self.net = net
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.num_classes, self.image_size, self.channels = num_classes, image_size, channels
        self.max_train_t = max_train_t
        self.schedule = Schedule(
            schedule, num_timesteps, continuous=continuous_time, log_snr_shift=log_snr_shift
        )
        self.bands = self.accuracy_bands()
        # epoch means synced over ranks; per band, items outside it get weight 0
        names = ["loss", "acc", *self.bands]
        self.metrics = nn.ModuleDict(
            {stage: nn.ModuleDict({n: MeanMetric() for n in names}) for stage in ("val", "test")}
        )

    def accuracy_bands(self) -> dict[str, tuple[float, float]]:
        """Bands [lo, hi) of t at ``BAND_EDGES`` × T, by name; those above max_train_t dropped."""
        T, top = self.schedule.num_timesteps, self.max_train_t
        edges = [round(f * T) for f in BAND_EDGES]
        bands = {f"acc_t{lo}-{hi}": (lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo}
        bands = {k: (lo, hi) for k, (lo, hi) in bands.items() if top is None or lo < top}
        first = next(iter(bands))
        bands[first] = (-math.inf, bands[first][1])  # continuous time starts just above t = -1
        return bands

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of noisy images x_t (B, C, H, W) at model times t (B,)."""
        return self.net(x_t, t)

    # ----------------------------------------------------------------------------------------
    # training
    def setup(self, stage: str) -> None:
        """Check that the datamodule is labelled with ``num_classes`` classes."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        classes = getattr(datamodule, "num_classes", None)
        if classes is None:
            raise ValueError(
                f"model=noisy_classifier needs a class-labelled dataset (e.g. data=digits, mnist, "
                f"cifar10); {type(datamodule).__name__} has no labels"
            )
        if classes != self.num_classes:
            raise ValueError(
                f"model.num_classes={self.num_classes} but the dataset has {classes} classes"
            )

    def draw_t(self, n: int, generator: torch.Generator | None, device=None) -> torch.Tensor:
        """Training times: the schedule's uniform t, or uniform below ``max_train_t``."""
        top = self.max_train_t
        if top is None:
            return self.schedule.sample_t(n, generator=generator, device=device)
        if self.schedule.continuous:  # uniform on (-1, top], as sample_t on (-1, T-1]
            u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
            return ((1 - u) * (top + 1) - 1).float()
        return torch.randint(0, math.ceil(top), (n,), generator=generator, device=device)

    def classify(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Logits of x_t = q_sample(x0, ε, ᾱ(t)) (Ho et al. 2020, Eq. 4)."""
        alpha_bar = broadcast(self.schedule.alpha_bar(t), x0)  # (B, 1, 1, 1)
        return self.net(q_sample(x0, eps, alpha_bar), t)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0, labels, gen = batch["image"], labels_of(batch), None  # the global generators
        t = self.draw_t(len(x0), gen, self.device)
        eps = torch.randn(x0.shape, device=self.device, generator=gen)
        logits = self.classify(x0, t, eps).float()
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", acc)
        return loss

    # ----------------------------------------------------------------------------------------
    # evaluation
    def evaluate(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per-item cross-entropy, correctness and t, with t and ε drawn from each item's
        ``index``: identical however the split is batched or sharded over ranks."""
        gens = [torch.Generator().manual_seed(int(i)) for i in batch["index"]]
        t = torch.cat([self.draw_t(1, g) for g in gens]).to(self.device)
        eps = torch.stack([torch.randn(batch["image"].shape[1:], generator=g) for g in gens])
        labels = labels_of(batch)
        logits = self.classify(batch["image"], t, eps.to(self.device)).float()
        loss = F.cross_entropy(logits, labels, reduction="none")
        return {"loss": loss, "correct": (logits.argmax(dim=1) == labels).float(), "t": t}

    def update_metrics(self, stage: str, batch: dict[str, Any]) -> None:
        out, metrics = self.evaluate(batch), self.metrics[stage]
        metrics["loss"].update(out["loss"])
        metrics["acc"].update(out["correct"])
        for name, (lo, hi) in self.bands.items():
            in_band = (out["t"] >= lo) & (out["t"] < hi)
            metrics[name].update(out["correct"], weight=in_band.float())
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}", metric, prog_bar=name in ("loss", "acc"))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.update_metrics("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.update_metrics("test", batch)

    def configure_optimizers(self):
        return optimizers(
            self.optimizer_factory, self.lr_scheduler_factory, self.net.parameters(), self.trainer
        )

    # ----------------------------------------------------------------------------------------
    # guidance
    def check_schedule(self, schedule: Schedule) -> None:
        """Raise a ``ValueError`` unless ``schedule`` (the guided diffusion model's) is the one
        this classifier was trained on."""
        self.schedule.check_same(schedule, "classifier")

    def log_prob_grad(
        self, labels: torch.Tensor | Sequence[int]
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``grad_log_prob(x_t, t)`` = ∇_{x_t} log p_φ(y | x_t, t) for the given labels, shaped
        like x_t, as ``classifier_guidance`` takes it (Dhariwal & Nichol 2021, Alg. 1 and 2).

        The module is put in eval mode. The gradient is taken with autograd enabled on a
        detached copy of x_t, so it works inside ``torch.no_grad()`` sampling loops; it is zero
        at t ≥ ``max_train_t``, where the classifier was never trained.
        """
        labels = torch.as_tensor(labels).long().reshape(-1)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}); got {labels.tolist()}")
        self.eval()

        def grad_log_prob(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            self.check_input(x_t, len(labels))
            t = torch.as_tensor(t, device=self.device).reshape(-1).expand(len(x_t))
            with torch.enable_grad():
                dtype = torch.promote_types(x_t.dtype, torch.float32)  # float32 or float64
                x = x_t.detach().to(self.device, dtype).requires_grad_(True)
                log_probs = self.net(x, t).to(dtype).log_softmax(dim=1)  # (B, num_classes)
                chosen = log_probs.gather(1, labels.to(self.device)[:, None]).sum()
                (grad,) = torch.autograd.grad(chosen, x)  # items are independent: sum is fine
            if self.max_train_t is not None:
                grad = grad * broadcast((t < self.max_train_t).float(), grad)
            return grad.to(x_t.device, x_t.dtype)

        return grad_log_prob

    def check_input(self, x_t: torch.Tensor, num_labels: int) -> None:
        """Images of the trained shape, one per label."""
        expected = (num_labels, self.channels, self.image_size, self.image_size)
        if tuple(x_t.shape) != expected:
            raise ValueError(
                f"the classifier got images shaped {tuple(x_t.shape)}; it guides {num_labels} "
                f"labels on images of {self.channels} channels at {self.image_size} px, "
                f"i.e. {expected}"
            )


def labels_of(batch: dict[str, Any]) -> torch.Tensor:
    """The batch's class labels, or a ValueError for an unlabelled dataset."""
    if "label" not in batch:
        raise ValueError(
            "model=noisy_classifier needs class labels: the batches have no 'label' "
            "(use a labelled dataset such as data=digits, mnist or cifar10)"
        )
    return batch["label"]
