"""Image checks and grids: validate image batches in [-1, 1]; tile them into one PNG, upscaled
for people to look at and with each image's prompt under it."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
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


def upscale_factor(side: int, cell: int | None) -> int:
    """The integer factor that brings an image side of ``side`` pixels to at least ``cell``
    (1 when ``cell`` is None or the image is already that large)."""
    return 1 if cell is None else max(1, math.ceil(cell / side))


def view_grid(
    images: torch.Tensor,
    *,
    nrow: int | None = None,
    cell: int | None = 96,
    captions: Sequence[str] | None = None,
    padding: int = 2,
) -> torch.Tensor:
    """A grid for people: each image upscaled by nearest neighbour (an integer factor, so
    pixels stay square and sharp) to at least ``cell`` pixels a side, and, with ``captions``
    (one per image, row-major), each caption written under its image, wrapped to its width.
    ``cell=None`` gives :func:`image_grid`'s native grid (no captions). Returns uint8
    ``(3, H', W')``.
    """
    if cell is None:
        return image_grid(images, nrow=nrow, padding=padding)
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    factor = upscale_factor(images.shape[-1], cell)
    big = torch.nn.functional.interpolate(images.detach().float().cpu(), scale_factor=factor)
    grid = image_grid(big, nrow=nrow, padding=padding)
    if not captions:
        return grid
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    side_h, side_w = big.shape[-2:]
    font = ImageFont.load_default(size=11)
    chars = max(8, side_w // 6)  # about 6 px per character at size 11
    wrapped = [textwrap.fill(c, chars) for c in captions]
    text_h = 13 * max(w.count("\n") + 1 for w in wrapped) + 4
    rows = math.ceil(len(images) / nrow)
    picture = Image.new("RGB", (grid.shape[2], grid.shape[1] + rows * text_h), "white")
    source = grid_to_pil(grid)
    draw = ImageDraw.Draw(picture)
    for r in range(rows):  # a strip of captions under every row of images
        y_grid = r * (side_h + padding)
        band = source.crop((0, y_grid, grid.shape[2], y_grid + side_h + 2 * padding))
        y = r * (side_h + padding + text_h)
        picture.paste(band, (0, y))
        for k in range(r * nrow, min((r + 1) * nrow, len(images))):
            x = padding + (k % nrow) * (side_w + padding)
            draw.multiline_text(
                (x, y + side_h + 2 * padding), wrapped[k], fill="black", font=font, spacing=2
            )
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


def save_image_grid(
    images: torch.Tensor,
    path: str | Path,
    *,
    nrow: int | None = None,
    cell: int | None = None,
    captions: Sequence[str] | None = None,
) -> torch.Tensor:
    """Save images ``(N, C, H, W)`` in [-1, 1] as one PNG grid at ``path``; return the grid.

    The parent folder is created if needed. ``cell=None``: the native grid of
    :func:`image_grid`; else :func:`view_grid`, upscaled and captioned.
    """
    grid = view_grid(images, nrow=nrow, cell=cell, captions=captions)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_to_pil(grid).save(path)
    return grid
