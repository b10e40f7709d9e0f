"""A diffusers autoencoder (``AutoencoderKL``, ``VQModel``) as a frozen first stage of latent
diffusion, e.g. the Stable Diffusion VAE (f = 8, 4 latent channels).

:func:`load_diffusers_first_stage` reads a folder written by diffusers' ``save_pretrained`` (its
``config.json`` names the class), or a pipeline folder whose ``vae/`` holds one, offline
(``local_files_only``). :class:`DiffusersFirstStage` gives it the interface genlab's own first
stages give latent diffusion (``genlab.models.diffusion.spaces.LatentSpace``):

* ``encode(images)``: a :class:`~genlab.nn.distributions.DiagonalGaussian` over the *unscaled*
  latents z for an ``AutoencoderKL`` (the same moments as diffusers' ``latent_dist``; its
  ``mode()`` is ``latent_dist.mean``), the latent before quantization for a ``VQModel``;
* ``decode(z)``: images (a ``VQModel`` quantizes first, as diffusers' ``decode`` does);
* ``scaling_factor`` and ``shift_factor`` from the model's config: the space's x0 is
  ``(z - shift_factor) · scaling_factor`` as in diffusers' pipelines, unless
  ``model.space.scale_factor`` is given;
* ``latent_channels``, ``downsample_factor``, ``channels``; ``image_size`` is None: the network
  is convolutional and takes any multiple of f.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genlab.nn.distributions import DiagonalGaussian

CLASSES = ("AutoencoderKL", "VQModel")
CONFIG_FILE = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def diffusers_folder(path: str | Path) -> tuple[Path, str] | None:
    """(folder, class name) of the diffusers autoencoder at ``path`` (a ``save_pretrained`` folder
    or a pipeline folder with a ``vae/`` one), or None when ``path`` is not one."""
    path = Path(path).expanduser()
    for folder in (path, path / "vae"):
        config = folder / CONFIG_FILE
        if not config.is_file():
            continue
        try:
            name = json.loads(config.read_text()).get("_class_name")
        except (OSError, ValueError):
            continue
        if name in CLASSES:
            return folder, name
    return None


def folder_version(path: str | Path) -> str:
    """The first 12 hex digits of the SHA-256 of a folder's config and weight files (names and
    contents, in name order): a pretrained folder's version, as ``file_version`` is a file's."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES) or p.suffix == ".json")
    )
    for file in files:
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


class DiffusersFirstStage(nn.Module):
    """A diffusers ``AutoencoderKL`` or ``VQModel`` behind genlab's first-stage interface (module
    docstring). Frozen: no gradients, eval mode.

    Args:
        model: the diffusers model.
        source: where it was read from, for messages.
    """

    def __init__(self, model: nn.Module, *, source: str = ""):
        super().__init__()
        name = type(model).__name__
        if name not in CLASSES:
            raise ValueError(f"{source}: a {name}; a first stage is one of {list(CLASSES)}")
        config = model.config
        if getattr(config, "latents_mean", None) is not None:
            raise ValueError(
                f"{source}: a {name} with per-channel latents_mean / latents_std; only the "
                "scalar scaling_factor and shift_factor are supported"
            )
        if name == "VQModel" and getattr(config, "norm_type", "group") != "group":
            raise ValueError(
                f"{source}: a VQModel with norm_type={config.norm_type!r} (its decoder reads the "
                "quantized latent as well); only norm_type='group' is supported"
            )
        self.model = model.requires_grad_(False).eval()
        self.source, self.kind = source, name
        self.channels = int(config.in_channels)
        self.downsample_factor = 2 ** (len(config.block_out_channels) - 1)
        if name == "VQModel":
            self.latent_channels = int(config.vq_embed_dim or config.latent_channels)
            self.num_codes = int(config.num_vq_embeddings)
        else:
            self.latent_channels = int(config.latent_channels)
        self.image_size: int | None = None  # any multiple of downsample_factor
        self.sample_size = config.sample_size
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)

    def train(self, mode: bool = True) -> DiffusersFirstStage:
        return super().train(False)  # frozen: batch-independent, no dropout

    def encode(self, images: torch.Tensor) -> DiagonalGaussian | torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] → the posterior over unscaled latents (AutoencoderKL)
        or the latents before quantization (VQModel), (B, latent_channels, H/f, W/f)."""
        if self.kind == "VQModel":
            return self.model.encode(images).latents
        return DiagonalGaussian(self.model.encode(images).latent_dist.parameters)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents → images (B, C, h·f, w·f), unclamped."""
        return self.model.decode(latents.to(self.dtype)).sample

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def extra_repr(self) -> str:
        return f"{self.kind} from {self.source!r}"


def load_diffusers_first_stage(
    path: str | Path, *, key: str = "first_stage"
) -> DiffusersFirstStage:
    """The diffusers autoencoder at ``path``, read offline and frozen.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: the folder holds no diffusers ``AutoencoderKL`` / ``VQModel``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{key}={str(path)!r}: no such folder")
    found = diffusers_folder(path)
    if found is None:
        raise ValueError(
            f"{key}={str(path)!r} is not a diffusers autoencoder folder: it needs a config.json "
            f"whose _class_name is one of {list(CLASSES)} (written by save_pretrained), in the "
            "folder or in its vae/ subfolder"
        )
    folder, name = found
    import diffusers

    model = getattr(diffusers, name).from_pretrained(
        str(folder), local_files_only=True, low_cpu_mem_usage=False
    )
    return DiffusersFirstStage(model, source=str(folder))


def config_of(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of the diffusers autoencoder at ``path`` (see :func:`diffusers_folder`)."""
    found = diffusers_folder(path)
    if found is None:
        raise ValueError(f"{path}: not a diffusers autoencoder folder")
    return json.loads((found[0] / CONFIG_FILE).read_text())
