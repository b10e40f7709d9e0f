"""Draw a grid of samples for a fixed set of prompts, and for an autoencoder a grid of fixed
validation images above their reconstructions, during training and at its end."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from genlab.data.splits import split_dataset
from genlab.diffusion.samplers import Sampler
from genlab.evaluation.protocol import generates, reconstructs, weights_of
from genlab.evaluation.verdicts import verdicts
from genlab.models.contract import resolve_sampling
from genlab.utils.gallery import gallery_section, write_gallery
from genlab.utils.images import grid_to_pil, save_image_grid
from genlab.utils.rank_logging import RankedLogger
from genlab.utils.sharding import full_weights

log = RankedLogger(__name__, rank_zero_only=True)


class SampleGrid(L.Callback):
    """Save (and log) a grid of generated images every ``every_n_epochs`` and at train end.

    The conditions are fixed for the whole run (``prompts``, else the datamodule's
    ``sample_prompts(num_samples)``; labels or ``n`` for label-conditional or unconditional models,
    see :meth:`grid_inputs`), and every grid starts from a generator seeded with ``seed``, so
    grids of successive epochs differ only by the weights. Grids go to
    ``<output_dir>/samples/step_{global_step:06d}.png`` and ``samples/final.png`` (from the final
    weights), prompts (or class names) in grid order, row-major, to ``samples/prompts.txt``, and
    the grid to every logger that takes images (TensorBoard ``add_image``, W&B ``log_image``).

    A model with ``reconstruct(images)`` (the first stages: VAE, VQ-GAN, dVAE) also gets, on the
    same schedule, a grid of the first ``num_samples`` validation images and their
    reconstructions: rows of originals alternate with the rows of their reconstructions, so each
    image sits right above its reconstruction. It goes to ``samples/recon_step_{step:06d}.png``
    and ``samples/recon_final.png``, and to the loggers as ``reconstructions`` (and
    ``reconstructions/final``). A model that reconstructs but does not generate (VQ-GAN, dVAE)
    gets only this grid; the VAE gets both.

    Only global rank zero generates, saves and logs. That is safe because ``generate`` and
    ``reconstruct`` call the LightningModule directly, not the DDP wrapper, so they run no
    collective operation; the other ranks go on to the next step and wait for rank zero in the
    gradient all-reduce.

    Args:
        output_dir: the run folder; default ``trainer.default_root_dir``.
        num_samples: images per grid.
        every_n_epochs: draw a grid after every n-th validation epoch (0: only at train end).
        prompts: fixed prompts instead of the datamodule's.
        seed: seed of the generator every grid starts from.
        sampler: a ``Sampler`` for the grids; None: the model's own (``model.sampler``).
        guidance_scale: classifier-free guidance scale; None: the model's own.
        nrow: images per row of the grid; default a near-square grid (of the originals, for
            the reconstruction grid).
        cell: pixels a side of every image in the saved and logged grids, reached by an integer
            nearest-neighbour upscale, with each image's prompt (or class name) written under
            it; None: the native grid (exact pixels, no captions).
        gallery: also write ``samples/gallery.html``, a page for people with every sample grid
            of the run (newest first): each image upscaled to ``cell`` (or 128) pixels with its
            prompt and, where the run has an oracle (the shapes oracle of the generative-metrics
            callback), the oracle's verdict (:mod:`genlab.evaluation.verdicts`).
    """

    def __init__(
        self,
        *,
        output_dir: str | None = None,
        num_samples: int = 16,
        every_n_epochs: int = 1,
        prompts: list[str] | None = None,
        seed: int = 0,
        sampler: Sampler | None = None,
        guidance_scale: float | None = None,
        nrow: int | None = None,
        cell: int | None = None,
        gallery: bool = True,
    ) -> None:
        if cell is not None and cell < 1:
            raise ValueError(f"callbacks.sample_grid.cell={cell}: pixels >= 1, or null (native)")
        if num_samples < 1 or every_n_epochs < 0:
            raise ValueError(
                f"callbacks.sample_grid: num_samples={num_samples} must be >= 1 and "
                f"every_n_epochs={every_n_epochs} >= 0"
            )
        self.output_dir = output_dir
        self.num_samples, self.every_n_epochs = num_samples, every_n_epochs
        self.prompts, self.seed, self.nrow, self.cell = prompts, seed, nrow, cell
        self.sampling = {"sampler": sampler, "guidance_scale": guidance_scale}
        self.warned_no_generate = False
        self.last_grid: tuple[int, torch.Tensor] | None = None
        self.last_recon_grid: tuple[int, torch.Tensor] | None = None
        self.recon_originals: torch.Tensor | None = None
        self.inputs: dict[str, Any] | None = None
        self.grid_text: list[str] | None = None
        self.gallery = gallery
        self.gallery_sections: list[str] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        due = self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        if not (fitting and due):
            return
        with full_weights(pl_module):  # every rank (a collective under trainer=fsdp)
            if trainer.is_global_zero:
                step = trainer.global_step
                self.draw(trainer, pl_module, f"step_{step:06d}", key="samples")
                self.draw_reconstructions(
                    trainer, pl_module, f"recon_step_{step:06d}", key="reconstructions"
                )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with full_weights(pl_module):  # every rank (a collective under trainer=fsdp)
            if not trainer.is_global_zero:
                return
            self.draw(trainer, pl_module, "final", key="samples/final")
            self.draw_reconstructions(
                trainer, pl_module, "recon_final", key="reconstructions/final"
            )

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, key: str) -> None:
        """Generate (or reuse this step's) grid, save it as ``samples/<name>.png`` and log it."""
        if not generates(pl_module):
            if not self.warned_no_generate and not reconstructs(pl_module):
                log.info(f"{type(pl_module).__name__} does not generate: no sample grids")
                self.warned_no_generate = True
            return
        samples_dir = Path(self.output_dir or trainer.default_root_dir, "samples")
        step = trainer.global_step
        weights = weights_of(pl_module).replace("raw", "raw (no EMA)")
        caption = f"step {step}, {weights} weights, {self.describe(pl_module)}, seed {self.seed}"
        if self.last_grid is not None and self.last_grid[0] == step:
            grid = self.last_grid[1]  # the final weights were already drawn at this step
            grid_to_pil(grid).save(samples_dir / f"{name}.png")
        else:
            images = self.generate(trainer, pl_module, self.grid_inputs(trainer, pl_module))
            grid = save_image_grid(
                images,
                samples_dir / f"{name}.png",
                nrow=self.nrow,
                cell=self.cell,
                captions=self.grid_text,
            )
            self.last_grid = (step, grid)
            if self.gallery:
                self.add_to_gallery(trainer, samples_dir, images, f"{name}.png: {caption}")
        log.info(f"sample grid {samples_dir / name}.png: {caption}")
        log_grid(trainer, key, grid, step, caption)
        if self.grid_text and not (samples_dir / "prompts.txt").exists():
            (samples_dir / "prompts.txt").write_text("\n".join(self.grid_text) + "\n")

    def add_to_gallery(
        self, trainer: L.Trainer, samples_dir: Path, images: torch.Tensor, title: str
    ) -> None:
        """Put this grid's images on top of ``samples/gallery.html`` (with the oracle's
        verdicts when the run has an oracle and the prompts are captions it reads)."""
        prompts = self.inputs.get("prompts") if self.inputs else None
        judged = verdicts(run_oracle(trainer), images, prompts) if prompts else None
        note = "oracle verdicts by the shapes oracle" if judged else None
        section = gallery_section(
            images,
            title=title,
            captions=self.grid_text,
            verdicts=judged,
            note=note,
            cell=self.cell or 128,
        )
        self.gallery_sections.insert(0, section)
        path = write_gallery(
            samples_dir / "gallery.html", self.gallery_sections, title="genlab samples"
        )
        log.info(f"gallery {path}")

    def describe(self, pl_module: L.LightningModule) -> str:
        """How the grids are sampled, as the model resolves it (``sampling_options``: sampler
        and guidance, or e.g. DALL-E's temperature and top-k / top-p)."""
        options = resolve_sampling(pl_module, self.sampling, "callbacks.sample_grid.")
        return ", ".join(f"{k} {v}" for k, v in options.protocol().items()) or "the model's own"

    def grid_inputs(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The ``generate`` arguments shared by every grid of the run, chosen at the first one.

        A model whose ``condition`` is ``"label"`` draws labels 0, 1, ... cycling over its
        ``num_classes``; one whose ``condition`` is ``"none"``, or a datamodule without captions,
        draws ``n=num_samples``; any other model draws the fixed prompts. ``grid_text`` keeps
        what each image shows, in grid order, for ``prompts.txt``.
        """
        if self.inputs is not None:
            return self.inputs
        condition = pl_module.condition
        datamodule = trainer.datamodule
        prompts = self.prompts
        if condition == "label":
            labels = [i % pl_module.num_classes for i in range(self.num_samples)]
            names = getattr(datamodule, "class_names", None)
            self.inputs = {"labels": labels}
            self.grid_text = [names[i] if names else f"label {i}" for i in labels]
            return self.inputs
        if prompts is None and datamodule is not None and condition != "none":
            prompts = datamodule.sample_prompts(self.num_samples)
        if condition == "none" or prompts is None:
            self.inputs = {"n": self.num_samples}
        else:
            self.inputs, self.grid_text = {"prompts": list(prompts)}, list(prompts)
        return self.inputs

    def generate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, inputs: dict[str, Any]
    ) -> torch.Tensor:
        """Draw the grid's images in eval mode, at the trainer's precision, from ``seed``."""
        generator = torch.Generator().manual_seed(self.seed)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context():
                options = {k: v for k, v in self.sampling.items() if v is not None}
                resolve_sampling(pl_module, options, "callbacks.sample_grid.")  # refuse unknown
                return pl_module.generate(generator=generator, **inputs, **options)
        finally:
            pl_module.train(was_training)

    def draw_reconstructions(
        self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, key: str
    ) -> None:
        """Reconstruct the fixed validation images (or reuse this step's grid), save the grid of
        originals above reconstructions as ``samples/<name>.png`` and log it."""
        if not reconstructs(pl_module):
            return
        originals = self.reconstruction_inputs(trainer)
        if originals is None or not len(originals):
            return
        samples_dir = Path(self.output_dir or trainer.default_root_dir, "samples")
        step = trainer.global_step
        columns = self.nrow or math.ceil(math.sqrt(len(originals)))
        if self.last_recon_grid is not None and self.last_recon_grid[0] == step:
            grid = self.last_recon_grid[1]  # the final weights were already drawn at this step
            grid_to_pil(grid).save(samples_dir / f"{name}.png")
        else:
            images = interleave_rows(
                originals, self.reconstruct(trainer, pl_module, originals), columns
            )
            grid = save_image_grid(
                images, samples_dir / f"{name}.png", nrow=columns, cell=self.cell
            )
            self.last_recon_grid = (step, grid)
        weights = weights_of(pl_module).replace("raw", "raw (no EMA)")
        caption = (
            f"step {step}, {weights} weights: val items 0..{len(originals) - 1} (rows 1, 3, ...) "
            "above their reconstructions (rows 2, 4, ...)"
        )
        log.info(f"reconstruction grid {samples_dir / name}.png: {caption}")
        log_grid(trainer, key, grid, step, caption)

    def reconstruction_inputs(self, trainer: L.Trainer) -> torch.Tensor | None:
        """The first ``num_samples`` images of the validation split, read once for the run
        (None, said once, without a datamodule)."""
        if self.recon_originals is None:
            datamodule = trainer.datamodule
            if datamodule is None:
                log.info("no datamodule to take validation images from: no reconstruction grid")
                self.recon_originals = torch.empty(0)
                return None
            dataset = split_dataset(datamodule, "val")
            count = min(self.num_samples, len(dataset))
            self.recon_originals = torch.stack([dataset[i]["image"] for i in range(count)])
        return self.recon_originals

    def reconstruct(
        self, trainer: L.Trainer, pl_module: L.LightningModule, images: torch.Tensor
    ) -> torch.Tensor:
        """Reconstruct ``images`` in eval mode, at the trainer's precision, without gradients."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                return pl_module.reconstruct(images.to(pl_module.device)).float().cpu()
        finally:
            pl_module.train(was_training)


def run_oracle(trainer: L.Trainer):
    """The oracle a callback of this run has loaded (the generative-metrics callback's
    ``tools``), or None; nothing is loaded here."""
    for callback in trainer.callbacks:
        tools = getattr(callback, "tools", None)
        if isinstance(tools, dict) and tools.get("oracle") is not None:
            return tools["oracle"]
    return None


def interleave_rows(originals: torch.Tensor, reconstructions: torch.Tensor, columns: int):
    """Images ``(N, C, H, W)`` in the order of a grid of ``columns`` per row whose rows of
    originals alternate with the rows of their reconstructions; a short last row is filled
    with white images, so each reconstruction sits right below its original."""
    blank = torch.ones_like(originals[:1])  # white, like the grid's padding
    rows = []
    for start in range(0, len(originals), columns):
        for images in (originals, reconstructions):
            row = images[start : start + columns]
            rows.append(torch.cat([row, blank.expand(columns - len(row), -1, -1, -1)]))
    return torch.cat(rows)  # (2 * columns * ceil(N / columns), C, H, W)


def log_grid(trainer: L.Trainer, key: str, grid: torch.Tensor, step: int, caption: str) -> None:
    """Send a uint8 ``(3, H, W)`` grid to every logger of ``trainer`` that takes images."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, global_step=step)
            logger.experiment.add_text(f"{key}/caption", caption, global_step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[grid_to_pil(grid)], caption=[caption], step=step)
