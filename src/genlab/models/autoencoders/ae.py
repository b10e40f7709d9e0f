"""The plain autoencoder and the denoising autoencoder (Vincent et al. 2008) of the lineage.

Both map x to a deterministic latent z = E(x) of ``latent_channels × H/f × W/f`` and back,
x̂ = D(z), and minimise the reconstruction loss of ``models/first_stage`` (L1 or L2, optionally
LPIPS and a PatchGAN adversary) with no regulariser. The **denoising** autoencoder
(``denoising=True``) encodes a corrupted input x̃ ~ C(x̃ | x) in training and is asked for the
clean x, so the code must capture what survives the corruption rather than copy pixels:

* ``gaussian``: x̃ = x + σ ε (``noise_std``, in the [-1, 1] units of the images);
* ``mask``: each pixel (all its channels) set to 0, mid-grey, with probability ``mask_prob`` (the
  masking noise of Vincent et al. 2008).

Corruption is applied in training only. Validation and test report the usual losses and PSNR /
SSIM on clean inputs, and ``psnr_corrupted`` / ``ssim_corrupted``: the reconstruction of the
corrupted input against the clean image, with each item's corruption seeded by its ``index``
(so the figure does not depend on batching or ranks). The plain AE (``model=ae``) reports the same
pair with the same corruption, so the two are compared on equal terms (README, "Autoencoders").
A deterministic latent is also a first stage that ``model=ldm`` can diffuse.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from genlab.metrics.reconstruction import ReconstructionMetrics
from genlab.models.autoencoders.first_stage import AutoencoderOutput, FirstStage

Corruption = Literal["gaussian", "mask"]


def corrupt(
    images: torch.Tensor,
    kind: Corruption,
    *,
    noise_std: float,
    mask_prob: float,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """x̃ of images (B, C, H, W): Gaussian noise or pixel masking, drawn from the global RNG or
    from one generator per image."""

    def draw(shape: tuple[int, ...], fn) -> torch.Tensor:
        if generators is None:
            return fn(shape, device=images.device)
        return torch.stack([fn(shape[1:], generator=g) for g in generators]).to(images.device)

    b, c, h, w = images.shape
    if kind == "gaussian":
        return images + noise_std * draw((b, c, h, w), torch.randn).to(images.dtype)
    keep = draw((b, 1, h, w), torch.rand) >= mask_prob
    return images * keep.to(images.dtype)


class Autoencoder(FirstStage):
    """Convolutional AE / DAE with a configurable downsampling factor and latent channels.

    Args:
        encoder: a ``genlab.nn.autoencoder.Encoder`` with ``double_latent=False``.
        decoder: the matching ``Decoder``.
        denoising: train on corrupted inputs (the DAE).
        corruption: ``gaussian`` | ``mask``: the corruption of training (DAE) and of the
            ``*_corrupted`` metrics (both).
        noise_std: σ of the Gaussian corruption.
        mask_prob: share of pixels masked.
        **kwargs: the losses and optimizers of :class:`FirstStage`.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        decoder: nn.Module,
        denoising: bool = False,
        corruption: Corruption = "gaussian",
        noise_std: float = 0.5,
        mask_prob: float = 0.5,
        **kwargs: Any,
    ):
        super().__init__(decoder=decoder, **kwargs)
        latent = decoder.conv_in.in_channels
        if encoder.out_channels != latent:
            raise ValueError(
                f"model.encoder gives {encoder.out_channels} channels but the decoder reads "
                f"{latent}: an autoencoder needs double_latent: false"
            )
        if encoder.downsample_factor != decoder.downsample_factor:
            raise ValueError("model.encoder and model.decoder have different downsampling factors")
        if corruption not in ("gaussian", "mask"):
            raise ValueError(f"model.corruption={corruption!r} must be gaussian or mask")
        if noise_std < 0 or not 0.0 <= mask_prob < 1.0:
            raise ValueError(
                f"model.noise_std={noise_std} must be >= 0 and model.mask_prob={mask_prob} in [0, 1)"
            )
        self.encoder = encoder
        self.latent_channels = latent
        self.denoising, self.corruption = denoising, corruption
        self.noise_std, self.mask_prob = noise_std, mask_prob
        for stage in ("val", "test"):
            self.metrics[f"{stage}_corrupted"] = ReconstructionMetrics()

    def corrupt(self, images: torch.Tensor, generators=None) -> torch.Tensor:
        return corrupt(
            images,
            self.corruption,
            noise_std=self.noise_std,
            mask_prob=self.mask_prob,
            generators=generators,
        )

    # ------------------------------------------------------------------------------------------
    # the first-stage interface
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) → latents (B, latent_channels, H/f, W/f)."""
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images (B, C, h·f, w·f), unclamped."""
        return self.decoder(latents)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """x̂ = D(E(x)) in [-1, 1] (a DAE given a corrupted x denoises it)."""
        return self.decode(self.encode(images)).float().clamp(-1, 1)

    # ------------------------------------------------------------------------------------------
    # training and evaluation
    def forward_train(self, images: torch.Tensor) -> AutoencoderOutput:
        inputs = self.corrupt(images) if self.training and self.denoising else images
        zero = torch.zeros((), device=images.device)
        return AutoencoderOutput(self.decode(self.encode(inputs)), zero)

    def evaluation_step(self, batch: dict[str, Any], stage: str) -> None:
        """The clean-input losses and metrics, and the reconstruction of the corrupted input
        against the clean image (corruption seeded by each item's index)."""
        super().evaluation_step(batch, stage)
        images = batch["image"]
        generators = [torch.Generator().manual_seed(int(i) + 104729) for i in batch["index"]]
        denoised = self.reconstruct(self.corrupt(images, generators))
        self.metrics[f"{stage}_corrupted"].update(denoised, images.float())

    def log_epoch_metrics(self, stage: str) -> None:
        super().log_epoch_metrics(stage)
        found = self.metrics[f"{stage}_corrupted"]
        if found.update_count == 0:
            return
        values = found.compute()
        found.reset()
        for name, value in values.items():
            self.log(f"{stage}/{name}_corrupted", value.float(), sync_dist=False)

    def describe_losses(self) -> str:
        what = super().describe_losses()
        if not self.denoising:
            return what
        level = f"std {self.noise_std}" if self.corruption == "gaussian" else f"p {self.mask_prob}"
        return f"{what}; denoising: {self.corruption} corruption ({level}) of the inputs"
