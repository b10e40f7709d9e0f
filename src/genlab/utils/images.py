"""Image grids: tile generated images in [-1, 1] into one picture and save it as a PNG."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid


def image_grid(images: torch.Tensor, *, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """Tile images ``(N, C, H, W)`` in [-1, 1] row-major into a uint8 grid ``(3, H', W')``.

    Args:
        images: a batch of 1- or 3-channel images in [-1, 1].
        nrow: images per row; default ``ceil(sqrt(N))``, a near-square grid.
        padding: white pixels between images.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images shaped (N, 1 or 3, H, W), got {tuple(images.shape)}")
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    unit = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    grid = make_grid(unit, nrow=nrow, padding=padding, pad_value=1.0)  # (3, H', W')
    return (grid * 255).round().to(torch.uint8)


def grid_to_pil(grid: torch.Tensor) -> Image.Image:
    """Turn a uint8 ``(3, H, W)`` grid into a PIL image."""
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def save_image_grid(
    images: torch.Tensor, path: str | Path, *, nrow: int | None = None
) -> torch.Tensor:
    """Save images ``(N, C, H, W)`` in [-1, 1] as one PNG grid at ``path``; return the grid.

    The parent folder is created if needed. See :func:`image_grid` for the layout.
    """
    grid = image_grid(images, nrow=nrow)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_to_pil(grid).save(path)
    return grid
