"""Image checks and grids: validate image batches in [-1, 1]; tile them into one PNG."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

RANGE_TOLERANCE = 1e-3  # bf16 rounding of values at ±1


def check_images(
    images: torch.Tensor,
    *,
    name: str = "images",
    channels: int | None = None,
    size: int | tuple[int, int] | None = None,
) -> None:
    """Check a batch of images ``(N, C, H, W)``: floating point, finite, in [-1, 1].

    Args:
        images: the batch to check.
        name: what the error message calls it.
        channels: the required number of channels, if any.
        size: the required ``H`` (= ``W``) or ``(H, W)``, if any.

    Raises:
        ValueError: naming the problem (shape, dtype, range) and the value found.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a tensor shaped (N, C, H, W), got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point in [-1, 1], got dtype {images.dtype}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels, got shape {tuple(images.shape)}")
    if size is not None:
        wanted = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(images.shape[-2:]) != wanted:
            raise ValueError(
                f"{name} must be {wanted[0]}x{wanted[1]} pixels, got {tuple(images.shape)}"
            )
    if images.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    low, high = images.min().item(), images.max().item()
    if low < -1 - RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"{name} must be in [-1, 1] (the data contract), got values in [{low:.3g}, {high:.3g}]"
            " — images in [0, 1] or [0, 255] must be rescaled first"
        )


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
