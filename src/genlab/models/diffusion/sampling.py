"""Small pieces of sampling that the diffusion models share: the starting noise, inpainting
inputs and the spherical interpolation of embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def initial_noise(
    shape: tuple[int, ...], x_T: torch.Tensor | None, generator: torch.Generator | None
) -> torch.Tensor:
    """x_T ~ N(0, I) of ``shape`` drawn from ``generator`` (on its device), or the given ``x_T``
    (1 or N rows) expanded to it."""
    if x_T is None:
        noise_device = "cpu" if generator is None else generator.device
        return torch.randn(shape, generator=generator, device=noise_device)  # (N, C, H, W)
    if x_T.dim() != len(shape) or x_T.shape[1:] != shape[1:] or len(x_T) not in (1, shape[0]):
        raise ValueError(
            f"x_T of shape {tuple(x_T.shape)} must be (1 or {shape[0]}, "
            f"{', '.join(map(str, shape[1:]))})"
        )
    return x_T.float().expand(shape)


def check_inpainting(known, mask, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """``known`` and ``mask`` as float tensors that broadcast to the images drawn."""
    if mask is None:
        raise ValueError("inpainting needs a mask (1 = keep the known pixels) with known")
    known, mask = torch.as_tensor(known).float(), torch.as_tensor(mask).float()
    if known.dim() != 4 or known.shape[1:] != shape[1:] or len(known) not in (1, shape[0]):
        raise ValueError(
            f"known image shape {tuple(known.shape)} must be (1 or {shape[0]}, {shape[1]}, "
            f"{shape[2]}, {shape[3]})"
        )
    try:
        torch.broadcast_shapes(mask.shape, known.shape)
    except RuntimeError as err:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not fit {tuple(known.shape)}"
        ) from err
    return known, mask


def slerp(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of unit vectors a, b (d,) at ``weights`` (n,) in [0, 1] → (n, d)
    unit vectors; linear (then normalised) when a and b are (anti)parallel."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    w = weights.float()[:, None]
    theta = torch.arccos((a * b).sum().clamp(-1.0, 1.0))
    if torch.sin(theta).abs() < 1e-6:
        return F.normalize((1 - w) * a + w * b, dim=-1)
    mixed = (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)
    return F.normalize(mixed, dim=-1)
