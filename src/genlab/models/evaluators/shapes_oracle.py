"""The shapes oracle: an offline evaluator that parses a shapes image into its objects.

The whole method in one file. A small CNN (``genlab.nn.shapes_parser``) reads a 32 px image of
the embedded ``shapes`` dataset and predicts, for each of the 9 cells of the 3×3 grid, whether an
object sits there and its shape, colour and size. It is trained on real shapes images with the
per-cell targets of ``genlab.data.shapes.cells_from_attributes``:

    loss = Σ_cells [ CE(occupancy) + 1[occupied] · (CE(shape) + CE(colour) + CE(size)) ] / 9

per image. The evaluation code (metrics callback, ``eval.py``) uses three views of it, on images
``(B, 3, H, W)`` in [-1, 1] that it resizes to ``image_size``:

* ``parse(images)``: per cell (shape, colour, size) indices, -1 for an empty cell, the format of
  ``genlab.data.shapes.cell_attributes`` and ``caption_cells`` (caption accuracy);
* ``features(images)``: a ``whiten_dim``-vector for FID, KID and precision/recall: the network's
  ``feature_dim``-vector before the heads, projected on its ``whiten_dim`` principal components
  and scaled to unit variance, ``(f - μ) V_k Λ_k^{-1/2}``, with μ, V, Λ the mean and the
  eigen-decomposition of the covariance of real *training* images' features (``fit_whitening``,
  run at the end of training on the first ``whiten_images`` train items and stored in the
  checkpoint). On real data the features are then centred with identity covariance, so a
  Fréchet distance or a kernel on them weighs every retained direction alike and has a small,
  known bias at small N (about d²/2N for real-vs-real FID on independent sets);
* ``class_probs(images)``: p(y | x) over the 45 (shape, colour) classes (Inception Score).

The output tables are always the full ones (``SHAPES``, ``COLOR_NAMES``, ``SIZE_NAMES``, ``CELLS``),
whatever subset the training data uses, so the output format never depends on the config. These
methods run without gradients, in eval mode and in float32 with autocast off, so what they return
does not depend on the caller's mode or precision. Validation and test log the loss, the share
of images parsed exactly (all 9 cells), the occupancy accuracy per cell and the shape, colour and
size accuracies on occupied cells.

Versions: an evaluator checkpoint records ``genlab_evaluator = {"name": "shapes_oracle",
"version": 2}``. Version 1 (before the whitening) offered the raw 256-d features, whose FID
could not tell a trained model from real images at N = 256; the metrics refuse it
(``genlab.evaluation.tools``). The project ships the version-2 evaluator
(``WEIGHTS``), trained by ``experiment=shapes_oracle``, so every machine measures with the same
weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from genlab.data.shapes import (
    CELLS,
    COLOR_NAMES,
    SHAPES,
    SIZE_NAMES,
    caption_cells,
    cells_from_attributes,
)
from genlab.utils.images import check_images
from genlab.utils.lr_schedule import optimizers
from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)

ATTRIBUTES = ("shape", "color", "size")  # the columns of parse() and cell_attributes()
TABLES = {"cells": CELLS, "shape": SHAPES, "color": COLOR_NAMES, "size": SIZE_NAMES}
METRICS = ("loss", "exact", "acc_occupancy", "acc_shape", "acc_color", "acc_size")
VERSION = 2  # of the evaluator: what its features are (module docstring)
EVALUATOR_KEY = "genlab_evaluator"  # the checkpoint entry that names the evaluator and version
WEIGHTS = Path(__file__).parent / "weights" / f"shapes_oracle_v{VERSION}.ckpt"  # shipped


class ShapesOracle(L.LightningModule):
    """A parser of shapes images into per-cell (shape, colour, size), used as an evaluator.

    Args:
        net: called as ``net(images) -> (features (B, D), logits)``, ``logits`` a dict of
            ``(B, 9, K)`` tensors for ``occupancy`` (K = 2), ``shape``, ``color`` and ``size``
            over the full tables; it has a ``feature_dim`` attribute (``ShapesParserNet``).
        optimizer: partial optimizer, called with the parameters.
        lr_scheduler: partial scheduler called with ``(optimizer, total_steps=...)``, or None.
        image_size: the resolution the network reads; other inputs are resized to it.
        whiten_dim: k, the dimension of :meth:`features` (principal components kept).
        whiten_images: how many train images the whitening is fitted on.
    """

    capabilities = frozenset()  # the model contract (genlab.models.contract)

    def __init__(
        self,
        *,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        image_size: int = 32,
        whiten_dim: int = 32,
        whiten_images: int = 8192,
    ):
        super().__init__()
        check_net(net, image_size)
        if not 1 <= whiten_dim <= net.feature_dim:
            raise ValueError(
                f"model.whiten_dim={whiten_dim} must be in [1, model.net.feature_dim="
                f"{net.feature_dim}]"
            )
        if whiten_images <= whiten_dim:
            raise ValueError(
                f"model.whiten_images={whiten_images} must exceed model.whiten_dim={whiten_dim}"
            )
        self.net = net
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.image_size = image_size
        self.feature_dim: int = whiten_dim
        self.whiten_images = whiten_images
        # the whitening (fit_whitening): zeros until fitted at the end of training
        self.register_buffer("feature_mean", torch.zeros(net.feature_dim))
        self.register_buffer("feature_projection", torch.zeros(net.feature_dim, whiten_dim))
        self.register_buffer("whitened", torch.tensor(False))
        self.version = VERSION  # 1 for a checkpoint from before the whitening (on_load)
        self.num_classes = len(SHAPES) * len(COLOR_NAMES)  # (shape, colour) classes for the IS
        # epoch means synced over ranks
        self.metrics = nn.ModuleDict(
            {s: nn.ModuleDict({n: MeanMetric() for n in METRICS}) for s in ("val", "test")}
        )
        self.warned_upsampling = False

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Features (B, D) and per-cell logits of images (B, 3, image_size, image_size)."""
        return self.net(images)

    # ----------------------------------------------------------------------------------------
    # training
    def setup(self, stage: str) -> None:
        """Check that the datamodule is the shapes dataset at ``image_size``."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        name = getattr(datamodule, "name", type(datamodule).__name__)
        if name != "shapes":
            raise ValueError(
                f"model=shapes_oracle trains on the shapes dataset (data=shapes), whose items "
                f"carry per-object attributes; got data {name!r}"
            )
        if datamodule.resolution != self.image_size:
            raise ValueError(
                f"model.image_size={self.image_size} must equal data.resolution="
                f"{datamodule.resolution}"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        _, logits = self.net(batch["image"])
        loss = parse_loss(logits, targets_of(batch)).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_end(self) -> None:
        """Fit the feature whitening on the first ``whiten_images`` train images, then rewrite
        ``last.ckpt`` so the evaluator checkpoint holds it (checkpoints written earlier in the
        run do not, and the metrics refuse them)."""
        from genlab.data.splits import split_dataset

        if self.trainer.datamodule is None:
            log.warning("no datamodule: the feature whitening is not fitted")
            return
        dataset = split_dataset(self.trainer.datamodule, "train")
        n = min(self.whiten_images, len(dataset))
        if n <= self.feature_dim:
            raise ValueError(
                f"the feature whitening needs more than whiten_dim={self.feature_dim} train "
                f"images; the train split has {len(dataset)}"
            )
        batches = (
            torch.stack([dataset[i]["image"] for i in range(s, min(s + 256, n))])
            for s in range(0, n, 256)
        )
        with self.inference():
            raw = torch.cat([self.net(x.to(self.device))[0].float() for x in batches])
        self.fit_whitening(raw)
        log.info(f"feature whitening fitted on {n} train images ({self.feature_dim} components)")
        folders = {c.dirpath for c in self.trainer.checkpoint_callbacks if c.dirpath}
        for last in sorted(Path(f) / "last.ckpt" for f in folders):
            if last.is_file():
                self.trainer.save_checkpoint(last)

    def fit_whitening(self, raw: torch.Tensor) -> None:
        """Set the whitening from raw features ``(N, feature_dim)`` of real train images: μ, and
        the top ``whiten_dim`` eigenvectors of their covariance scaled by 1/√eigenvalue, in
        float64 (module docstring). The whitened train features have mean 0, covariance I."""
        raw = raw.double()
        mean = raw.mean(dim=0)
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov((raw - mean).T))
        top = eigenvalues.argsort(descending=True)[: self.feature_dim]
        if eigenvalues[top[-1]] <= 1e-12 * eigenvalues[top[0]].clamp(min=1e-30):
            raise ValueError(
                f"the train features span fewer than whiten_dim={self.feature_dim} directions: "
                "lower model.whiten_dim"
            )
        projection = eigenvectors[:, top] / eigenvalues[top].sqrt()
        self.feature_mean.copy_(mean.float())
        self.feature_projection.copy_(projection.float())
        self.whitened.fill_(True)

    def check_evaluator(self, path: str | Path) -> None:
        """Refuse a checkpoint of another evaluator version, or one without the whitening, as
        the metrics' evaluator (``genlab.evaluation.tools``), with the way out."""
        if self.version == VERSION and bool(self.whitened):
            return
        raise ValueError(
            f"the shapes oracle at {str(path)!r} is version {self.version}"
            f"{'' if bool(self.whitened) else ', without feature whitening'}; the metrics need "
            f"version {VERSION}. Use the shipped evaluator ({WEIGHTS}, the default of "
            "callbacks.generative_metrics.oracle_checkpoint), or rebuild yours with `python "
            "src/train.py experiment=shapes_oracle` (its checkpoints/last.ckpt)"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[EVALUATOR_KEY] = {"name": "shapes_oracle", "version": VERSION}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint from before the whitening (version 1) loads with an unfitted one."""
        self.version = checkpoint.get(EVALUATOR_KEY, {}).get("version", 1)
        state = checkpoint["state_dict"]
        for name in ("feature_mean", "feature_projection", "whitened"):
            state.setdefault(name, getattr(self, name).clone())

    def configure_optimizers(self):
        return optimizers(
            self.optimizer_factory, self.lr_scheduler_factory, self.net.parameters(), self.trainer
        )

    # ----------------------------------------------------------------------------------------
    # evaluation
    def update_metrics(self, stage: str, batch: dict[str, Any]) -> None:
        """Update and log the stage's per-image loss and exact-parse rate and the per-cell
        occupancy and (on occupied cells) attribute accuracies."""
        cells = targets_of(batch)  # (B, 9, 3)
        _, logits = self.net(batch["image"])
        predicted, metrics = decode(logits), self.metrics[stage]
        occupied = (cells[..., 0] >= 0).float()  # (B, 9)
        metrics["loss"].update(parse_loss(logits, cells))
        metrics["exact"].update((predicted == cells).all(dim=2).all(dim=1).float())
        metrics["acc_occupancy"].update(((predicted[..., 0] >= 0).float() == occupied).float())
        for k, name in enumerate(ATTRIBUTES):
            correct = (predicted[..., k] == cells[..., k]).float()  # (B, 9)
            metrics[f"acc_{name}"].update(correct, weight=occupied)
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}", metric, prog_bar=name in ("loss", "exact"))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.update_metrics("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.update_metrics("test", batch)

    # ----------------------------------------------------------------------------------------
    # the evaluator's interface
    def parse(self, images: torch.Tensor) -> torch.Tensor:
        """Parse images (B, 3, H, W) in [-1, 1] into per-cell labels (B, 9, 3) long: the argmax
        (shape, colour, size) indices into the full tables of a cell predicted occupied, all -1
        for a cell predicted empty (the format of ``genlab.data.shapes.cell_attributes``)."""
        with self.inference():
            _, logits = self.net(self.prepare(images))
        return decode(logits)

    @staticmethod
    def caption_cells(caption: str) -> np.ndarray:
        """The per-cell labels ``(9, 3)`` a shapes caption asks for, in the format of
        :meth:`parse` (``genlab.data.shapes.caption_cells``): what caption accuracy compares
        the parsed images with. Raises ValueError for a caption that does not parse."""
        return caption_cells(caption)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Whitened features (B, whiten_dim) of images (B, 3, H, W) in [-1, 1], for FID, KID and
        precision/recall (module docstring)."""
        if not bool(self.whitened):
            raise ValueError(
                "this shapes oracle has no feature whitening (a version-1 evaluator, or a "
                "checkpoint written before its training ended): use the shipped evaluator "
                f"{WEIGHTS} or the last.ckpt of `python src/train.py experiment=shapes_oracle`"
            )
        raw = self.raw_features(images)
        with self.inference():
            return (raw - self.feature_mean) @ self.feature_projection

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        """The network's penultimate representation (B, net.feature_dim), before whitening."""
        with self.inference():
            features, _ = self.net(self.prepare(images))
        return features

    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        """p(y | x) over the 45 (shape, colour) classes, for the Inception Score.

        Class ``y = shape * len(COLOR_NAMES) + color``. Each cell c contributes its object's
        class distribution p_c(y) = p_c(shape) · p_c(colour), weighted by its presence
        probability w_c = p_c(occupied):

            p(y | x) = [Σ_c w_c p_c(y) + max(0, 1 - Σ_c w_c) / 45] / max(1, Σ_c w_c)

        i.e. the presence-weighted mixture over cells, normalised; when less than one object is
        expected, the missing mass is spread uniformly, so an image with no object gets the
        uniform distribution. Rows sum to 1.

        Returns:
            (B, 45) float32 on the module's device.
        """
        with self.inference():
            _, logits = self.net(self.prepare(images))
        presence = logits["occupancy"].softmax(dim=-1)[..., 1]  # (B, 9)
        shape, color = logits["shape"].softmax(dim=-1), logits["color"].softmax(dim=-1)
        joint = (shape[..., :, None] * color[..., None, :]).flatten(2)  # (B, 9, 45)
        mass = presence.sum(dim=1, keepdim=True)  # (B, 1): the expected number of objects
        mixture = (presence[..., None] * joint).sum(dim=1)  # (B, 45)
        uniform = (1 - mass).clamp(min=0) / self.num_classes
        return (mixture + uniform) / mass.clamp(min=1)

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Eval mode (the previous mode restored after), no gradients, autocast off."""
        was_training = self.training
        self.eval()
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.no_grad())
                for device_type in {"cpu", self.device.type}:
                    stack.enter_context(torch.autocast(device_type, enabled=False))
                yield
        finally:
            self.train(was_training)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Check images (B, 3, H, W) in [-1, 1]; float32 on the module's device, resized to
        ``image_size``: area averaging for an integer down-scaling, else antialiased bilinear
        (upsampling works but warns once: the oracle cannot see detail that is not there)."""
        check_images(images, name="oracle input", channels=3)
        x = images.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        size = self.image_size
        if (h, w) == (size, size):
            return x
        if h % size == 0 and w % size == 0:
            return F.interpolate(x, size=(size, size), mode="area")  # (B, 3, size, size)
        if (h < size or w < size) and not self.warned_upsampling:
            log.warning(
                f"the shapes oracle reads {size} px images; upsampling {h}x{w} px inputs, "
                "which it never saw in training"
            )
            self.warned_upsampling = True
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)


def check_net(net: nn.Module, image_size: int) -> None:
    """The network must read ``image_size`` and predict over the full tables."""
    net_size = getattr(net, "image_size", image_size)
    if net_size != image_size:
        raise ValueError(
            f"model.net.image_size={net_size} must equal model.image_size={image_size}"
        )
    wanted = {"cells": len(CELLS), "shape": len(SHAPES), "color": len(COLOR_NAMES)}
    wanted["size"] = len(SIZE_NAMES)
    sizes = {"cells": getattr(net, "num_cells", len(CELLS)), **getattr(net, "sizes", {})}
    wrong = [
        f"{k}: {sizes[k]} (the table has {n})" for k, n in wanted.items() if sizes.get(k, n) != n
    ]
    if wrong:
        raise ValueError(
            "the oracle's network must predict over the full tables of genlab.data.shapes, "
            "whatever subset the data uses; got " + ", ".join(wrong)
        )


def targets_of(batch: dict[str, Any]) -> torch.Tensor:
    """Per-cell targets (B, 9, 3) of a shapes batch, or a ValueError for another dataset."""
    if "attributes" not in batch:
        raise ValueError(
            "model=shapes_oracle needs the shapes dataset's per-object attributes: the batches "
            "have no 'attributes' (use data=shapes)"
        )
    return cells_from_attributes(batch["attributes"])


def parse_loss(logits: dict[str, torch.Tensor], cells: torch.Tensor) -> torch.Tensor:
    """Per-image loss (B,): the mean over cells of the occupancy cross-entropy plus, on occupied
    cells, the cross-entropies of shape, colour and size. ``cells``: (B, 9, 3), -1 if empty."""
    occupied = cells[..., 0] >= 0  # (B, 9)
    loss = cross_entropy(logits["occupancy"], occupied.long())  # (B, 9)
    for k, name in enumerate(ATTRIBUTES):
        loss = loss + cross_entropy(logits[name], cells[..., k].clamp(min=0)) * occupied
    return loss.mean(dim=1)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in float32 of logits (B, N, K) against targets (B, N) → (B, N)."""
    return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none").view(
        target.shape
    )


def decode(logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-cell labels (B, 9, 3): argmax (shape, colour, size) where the occupancy argmax says
    occupied, else -1."""
    labels = torch.stack([logits[name].argmax(dim=-1) for name in ATTRIBUTES], dim=-1)
    occupied = logits["occupancy"].argmax(dim=-1) == 1  # (B, 9)
    return labels.masked_fill(~occupied[..., None], -1)
