"""What a W&B user expects from a run besides scalars: tables of prompts, samples and the
oracle's verdicts, the metric reports attached as an artifact, and runs of a sweep grouped.

Every function here acts only on the trainer's ``WandbLogger`` s and only on global rank zero
(``rank_zero_only``); with no W&B logger it does nothing, so callers need not check. Checkpoints
as artifacts are Lightning's own ``WandbLogger(log_model=...)`` (``conf/logger/wandb.yaml``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from genlab.utils.images import upscale_factor


def wandb_loggers(loggers: Iterable[Logger] | None) -> list[WandbLogger]:
    """The W&B loggers among ``loggers`` (a trainer's ``loggers``)."""
    return [logger for logger in loggers or [] if isinstance(logger, WandbLogger)]


def picture(image: torch.Tensor, cell: int | None = 128) -> Image.Image:
    """One image ``(C, H, W)`` in [-1, 1] as a PIL image, upscaled by nearest neighbour to at
    least ``cell`` pixels a side (None: native)."""
    factor = upscale_factor(image.shape[-1], cell)
    big = torch.nn.functional.interpolate(image[None].detach().float().cpu(), scale_factor=factor)
    pixels = ((big[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


@rank_zero_only
def log_samples_table(
    loggers: Iterable[Logger] | None,
    key: str,
    images: torch.Tensor,
    texts: Sequence[str],
    verdicts: Sequence[str] | None,
    *,
    step: int,
    cell: int | None = 128,
) -> None:
    """Log a ``wandb.Table`` with one row per image: index, prompt (or label), the sample, and
    the oracle's verdict (``None`` where there is no oracle)."""
    found = wandb_loggers(loggers)
    if not found:
        return
    import wandb

    table = wandb.Table(columns=["index", "prompt", "sample", "oracle verdict"])
    for i, image in enumerate(images):
        verdict = verdicts[i] if verdicts is not None else None
        table.add_data(i, texts[i], wandb.Image(picture(image, cell)), verdict)
    for logger in found:
        logger.experiment.log({key: table, "trainer/global_step": step})


@rank_zero_only
def attach_files(
    loggers: Iterable[Logger] | None,
    paths: Iterable[str | Path],
    *,
    kind: str,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Attach the existing files among ``paths`` to the W&B run as a new version of the
    artifact ``<kind>-<run id>`` (type ``kind``), e.g. the metric reports and plots."""
    found = wandb_loggers(loggers)
    files = [Path(p) for p in paths if Path(p).is_file()]
    if not found or not files:
        return
    import wandb

    for logger in found:
        run = logger.experiment
        artifact = wandb.Artifact(f"{kind}-{run.id}", type=kind, metadata=metadata or {})
        for path in files:
            artifact.add_file(str(path), name=path.name)
        run.log_artifact(artifact)
