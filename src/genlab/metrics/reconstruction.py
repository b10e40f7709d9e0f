"""Reconstruction metrics for autoencoders (VAE, VQ-GAN, dVAE): PSNR, SSIM and codebook usage.

* ``psnr``: 10 log₁₀(R² / MSE) per image with data range R = 2, the width of [-1, 1] — the same
  number as the PSNR of the images rescaled to [0, 1] with R = 1. Identical images give +inf
  (not capped), and so does a mean over images that contains one.
* ``ssim``: the structural similarity of Wang et al. 2004 (Eq. 13) per image, on the images
  rescaled to [0, 1]: Gaussian window 11×11 with σ = 1.5, K₁ = 0.01, K₂ = 0.03, averaged over
  the window positions inside the image ('valid' filtering, as the authors' reference code) and
  over channels. torchmetrics instead reflection-pads the images and averages over all pixels;
  on the interior positions the two maps agree.
* ``CodebookUsage``: the share of a vector quantizer's codes used at least once and the
  perplexity exp(H) of the code histogram (van den Oord et al. 2017; Esser et al. 2021
  practice), which equals K when K codes are used equally and 1 when one code is used.

rFID, the reconstruction FID, is ``genlab.metrics.fid.FID`` with the features of the
reconstructions as the generated set and those of the original images as the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from genlab.utils.images import check_images

DATA_RANGE = 2.0  # images live in [-1, 1]
WINDOW_SIZE, WINDOW_SIGMA = 11, 1.5  # Wang et al. 2004, §III.C
K1, K2 = 0.01, 0.03


def check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    """Check two batches of images in [-1, 1] with the same shape ``(B, C, H, W)``."""
    check_images(x, name="reconstructions")
    check_images(y, name="originals")
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image ``(B,)`` of images in [-1, 1] (range 2).

    +inf for identical images.
    """
    check_pair(x, y)
    mse = (x.double() - y.double()).square().flatten(1).mean(dim=1)  # (B,)
    return 10 * torch.log10(DATA_RANGE**2 / mse)


def gaussian_window(device: torch.device) -> torch.Tensor:
    """The normalized 1-D Gaussian window ``(11,)`` of σ = 1.5, float64."""
    offsets = torch.arange(WINDOW_SIZE, dtype=torch.float64, device=device) - WINDOW_SIZE // 2
    window = torch.exp(-(offsets**2) / (2 * WINDOW_SIGMA**2))
    return window / window.sum()


def local_mean(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted local means, 'valid' positions: ``(B, C, H, W) -> (B, C, H-10, W-10)``."""
    channels = images.shape[1]
    rows = window.view(1, 1, -1, 1).expand(channels, 1, -1, 1)  # separable: H, then W
    columns = window.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    return F.conv2d(F.conv2d(images, rows, groups=channels), columns, groups=channels)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image ``(B,)`` of Wang et al. 2004 (Eq. 13), images in [-1, 1].

    SSIM = (2 μ_x μ_y + C₁)(2 σ_xy + C₂) / ((μ_x² + μ_y² + C₁)(σ_x² + σ_y² + C₂)) with
    Gaussian-weighted local statistics, C₁ = (K₁ L)², C₂ = (K₂ L)², L = 1 on the [0, 1]-rescaled
    images; 1 for identical images. Needs images of at least 11×11 pixels.
    """
    check_pair(x, y)
    if min(x.shape[-2:]) < WINDOW_SIZE:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {tuple(x.shape)}")
    x, y = (x.double() + 1) / 2, (y.double() + 1) / 2
    window = gaussian_window(x.device)
    mu_x, mu_y = local_mean(x, window), local_mean(y, window)
    var_x = local_mean(x * x, window) - mu_x**2
    var_y = local_mean(y * y, window) - mu_y**2
    cov_xy = local_mean(x * y, window) - mu_x * mu_y
    c1, c2 = K1**2, K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )  # (B, C, H-10, W-10)
    return ssim_map.flatten(1).mean(dim=1)


class ReconstructionMetrics(Metric):
    """Mean PSNR and SSIM (Wang et al. 2004) of reconstructions over all images and ranks.

    ``sum`` states in float64; ``compute`` returns ``{"psnr": dB, "ssim": in [-1, 1]}``.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("psnr_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ssim_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, reconstructions: torch.Tensor, originals: torch.Tensor) -> None:
        """Add a batch of reconstructions and their originals, ``(B, C, H, W)`` in [-1, 1]."""
        reconstructions, originals = reconstructions.detach(), originals.detach()
        self.psnr_sum += psnr(reconstructions, originals).sum()
        self.ssim_sum += ssim(reconstructions, originals).sum()
        self.count += len(originals)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"psnr": mean PSNR (dB), "ssim": mean SSIM}``, float64 scalars."""
        if self.count == 0:
            raise ValueError("ReconstructionMetrics has no images: call update() before compute()")
        return {"psnr": self.psnr_sum / self.count, "ssim": self.ssim_sum / self.count}


class CodebookUsage(Metric):
    """Codebook usage of a vector quantizer: share of codes used and perplexity of their use.

    ``update`` adds code indices of any shape to a histogram (a ``sum`` state); ``compute``
    returns ``{"usage": share of the K codes used at least once, "perplexity": exp(-Σ p log p)}``
    of the normalized histogram p (van den Oord et al. 2017; Esser et al. 2021 practice).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_codes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_codes < 1:
            raise ValueError(f"num_codes must be at least 1, got {num_codes}")
        self.num_codes = num_codes
        self.add_state("counts", torch.zeros(num_codes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, indices: torch.Tensor) -> None:
        """Add code indices (integers in [0, num_codes), any shape)."""
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"code indices must be integers, got dtype {indices.dtype}")
        indices = indices.detach().flatten()
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_codes):
            raise ValueError(
                f"code indices must be in [0, {self.num_codes}), got values in"
                f" [{indices.min().item()}, {indices.max().item()}]"
            )
        self.counts += torch.bincount(indices, minlength=self.num_codes)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"usage": in [0, 1], "perplexity": in [1, num_codes]}``, float64 scalars."""
        total = self.counts.sum()
        if total == 0:
            raise ValueError("CodebookUsage has no code indices: call update() before compute()")
        p = self.counts.double() / total
        entropy = -torch.xlogy(p, p).sum()
        return {"usage": (self.counts > 0).double().mean(), "perplexity": entropy.exp()}
