"""LPIPS, the perceptual distance of Zhang et al. 2018 ("The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric"), v0.1 with VGG16, as the first-stage autoencoders add it to
their reconstruction loss (taming-transformers' VQ-GAN, latent-diffusion's autoencoders).

Method (Eq. 1 of the paper, in the form the released v0.1 weights use):

    d(x, y) = Σ_l  1/(H_l W_l)  Σ_{h,w}  Σ_c  v_lc · (ŷ^l_hwc − ŷ'^l_hwc)²

| name | meaning | shape |
| --- | --- | --- |
| ``x``, ``y`` | images in [-1, 1], after the scaling layer ``(x − shift) / scale`` | (B, 3, H, W) |
| ``l`` | the five taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of VGG16 | |
| ``ŷ^l``, ``ŷ'^l`` | the features of x and y at tap l, unit-normalised over channels | (B, C_l, H_l, W_l) |
| ``v_l`` | non-negative per-channel weights of tap l (Eq. 1's ``w_l²``) | (C_l,) |

with C_l = 64, 128, 256, 512, 512. ``v_l = 1`` for every channel is the paper's uncalibrated
baseline (Eq. 1 with ``w_l = 1``: a sum over taps of mean squared distances between unit
vectors, i.e. of 2 − 2·cosine similarity); v0.1 fits ``v_l`` to human 2AFC judgements.

Weights, never downloaded (``weights=``):

* ``"pretrained"``: the real LPIPS. The VGG16 convolutions are torchvision's ImageNet weights,
  the file ``vgg16-397923af.pth`` (:data:`VGG16_URL`) at ``vgg_path`` or in the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``, where ``torchvision.models.vgg16(weights="DEFAULT")`` puts
  it); its ``classifier.*`` keys are ignored. The linear weights ``v_l`` are the v0.1
  calibration shipped inside the PyPI package ``lpips`` (``lpips/weights/v0.1/vgg.pth``, a
  7 kB file found with ``importlib.util.find_spec`` without running the package's code) or at
  ``lin_path``. A missing file raises ``FileNotFoundError`` naming every path looked at.
* ``"offline"``: a random-feature distance that needs no file: the same VGG16 stack with weights
  drawn once from a fixed seed (He et al. 2015's uniform init, ``U(±√(6 / fan_in))``, from a
  ``torch.Generator`` seeded :data:`OFFLINE_SEED`; zero biases) and the paper's baseline
  ``v_l = 1``. Random deep features are a weaker but real perceptual signal: Zhang et al. 2018
  score randomly initialised networks above chance though below trained ones, and He, Wang &
  Hopcroft 2016 reconstruct images and synthesise textures from random-weight VGG features. The
  loss keeps the shape and cost of the real one, so a run can swap the files in later. With zero
  biases the stack is positively homogeneous, so the per-layer scale of the init does not change
  the distance; the uniform draw (random bits, no libm) gives bitwise the same weights on every
  construction and machine for a given torch version. Its values are not calibrated like v0.1's
  (whose weights average 0.07–0.11 per channel where these are 1): a run switching between the
  two may want another ``perceptual_weight``.
* ``"auto"`` (default): pretrained when both files are found, else offline with a warning.

The weights are non-persistent buffers: they follow ``.to(device / dtype)`` but are not in
``state_dict()``, so checkpoints stay small and load where the VGG file is absent. The module
has no parameters (nothing for an optimizer or weight decay); gradients reach the inputs. DDP
broadcasts every buffer (59 MB here) from rank 0 before each forward unless told to ignore it:
the first stages list these buffers in ``_ddp_params_and_buffers_to_ignore``
(``models/autoencoders/first_stage.py``); the weights are the same on every rank anyway.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genlab.utils.io import file_version

Weights = Literal["auto", "pretrained", "offline"]
WEIGHTS = ("auto", "pretrained", "offline")

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 (IMAGENET1K_V1)
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
LPIPS_PACKAGE = "lpips==0.1.4"  # ships the v0.1 linear weights, pinned in requirements.lock
OFFLINE_SEED = 0

# VGG16 (Simonyan & Zisserman 2015, configuration D) up to relu5_3: output channels of each
# 3×3 convolution (padding 1, then ReLU) and "M" for each 2×2 max-pool of stride 2.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
CHANNELS = (64, 128, 256, 512, 512)  # C_l of the taps relu1_2 … relu5_3
# The LPIPS scaling layer: ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225)
# for images in [-1, 1], i.e. 2·mean − 1 and 2·std.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # in the unit normalisation, as in the lpips package


class Conv(NamedTuple):
    """One VGG16 convolution: its name (conv{block}_{n}), its index in torchvision's
    ``vgg16().features`` and its input and output channels."""

    name: str
    index: int
    c_in: int
    c_out: int


def vgg16_convs() -> list[Conv]:
    """The 13 convolutions of :data:`VGG16_CONFIG` with torchvision's layer indices: each
    convolution is followed by a ReLU (two indices), each pool takes one."""
    convs, index, block, n, c_in = [], 0, 1, 0, 3
    for item in VGG16_CONFIG:
        if item == "M":
            index, block, n = index + 1, block + 1, 0
            continue
        n += 1
        convs.append(Conv(f"conv{block}_{n}", index, c_in, item))
        index, c_in = index + 2, item
    return convs


VGG16_CONVS = vgg16_convs()


def random_vgg16(seed: int = OFFLINE_SEED) -> dict[str, Tensor]:
    """A torchvision-format VGG16 state dict with He-uniform weights U(±√(6 / fan_in)) drawn
    from a generator seeded ``seed`` and zero biases: the offline variant's features."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for conv in VGG16_CONVS:
        bound = (6 / (9 * conv.c_in)) ** 0.5
        u = torch.rand(conv.c_out, conv.c_in, 3, 3, generator=generator)
        state[f"features.{conv.index}.weight"] = (2 * u - 1) * bound
        state[f"features.{conv.index}.bias"] = torch.zeros(conv.c_out)
    return state


class VGG16Features(nn.Module):
    """Functional VGG16 up to relu5_3 whose weights are non-persistent buffers: images
    ``(B, 3, H, W)`` → the LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, the last at
    ``H/16 × W/16``.

    Args:
        state: a torchvision VGG16 state dict (``features.{i}.weight`` / ``.bias``; other keys,
            such as ``classifier.*``, are ignored).
        source: what error messages call the state dict (e.g. its file).

    Raises:
        ValueError: a convolution's key is missing or its tensor has the wrong shape.
    """

    def __init__(self, state: dict[str, Tensor], *, source: str = "VGG16 state dict"):
        super().__init__()
        for conv in VGG16_CONVS:
            shapes = {"weight": (conv.c_out, conv.c_in, 3, 3), "bias": (conv.c_out,)}
            for kind, shape in shapes.items():
                key = f"features.{conv.index}.{kind}"
                if key not in state:
                    raise ValueError(f"{source}: no key {key!r}; expected torchvision's VGG16")
                if tuple(state[key].shape) != shape:
                    raise ValueError(
                        f"{source}: {key} has shape {tuple(state[key].shape)}, expected {shape} "
                        f"({conv.name} of torchvision's VGG16)"
                    )
                tensor = state[key].detach().to(torch.float32, copy=True)
                self.register_buffer(f"{conv.name}_{kind}", tensor, persistent=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        taps, convs = [], iter(VGG16_CONVS)
        for item in VGG16_CONFIG:
            if item == "M":  # the activation before each pool is a tap
                taps.append(x)
                x = F.max_pool2d(x, 2)
                continue
            name = next(convs).name
            weight, bias = self.get_buffer(f"{name}_weight"), self.get_buffer(f"{name}_bias")
            x = F.relu(F.conv2d(x, weight, bias, padding=1))
        return [*taps, x]  # relu1_2 … relu5_3, (B, C_l, H / 2^l, W / 2^l)


# ----------------------------------------------------------------------------------------------
# Where the pretrained weights come from


def vgg16_file(vgg_path: str | None = None) -> Path:
    """The ImageNet VGG16 weights file: ``vgg_path`` if given, else torchvision's file in the
    torch hub cache (``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``)."""
    if vgg_path:
        return Path(vgg_path).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def linear_file(lin_path: str | None = None) -> Path | None:
    """The v0.1 linear weights file: ``lin_path`` if given, else ``weights/v0.1/vgg.pth`` in the
    installed ``lpips`` package (located, not imported), or None when it is not installed."""
    if lin_path:
        return Path(lin_path).expanduser()
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"


def missing_files(vgg: Path, lin: Path | None) -> list[str]:
    """One line per pretrained file that is not there: the path looked at and how to provide it."""
    missing = []
    if not vgg.is_file():
        missing.append(
            f"VGG16 ImageNet weights: no file {vgg} (download {VGG16_URL} to that path, "
            "or pass vgg_path)"
        )
    if lin is None:
        missing.append(
            f"LPIPS v0.1 linear weights: the lpips package is not installed (pip install "
            f"{LPIPS_PACKAGE}, or pass lin_path)"
        )
    elif not lin.is_file():
        missing.append(
            f"LPIPS v0.1 linear weights: no file {lin} (pip install {LPIPS_PACKAGE}, "
            "or pass lin_path)"
        )
    return missing


def load_vgg16(path: Path) -> dict[str, Tensor]:
    """A torchvision VGG16 state dict from its file (read as tensors only, on the CPU)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a VGG16 state dict, got {type(state).__name__}")
    return state


def load_linear(path: Path) -> list[Tensor]:
    """The five non-negative v0.1 weight vectors ``v_l`` (C_l,) from the lpips package's file,
    whose keys are ``lin{l}.model.1.weight``, shaped (1, C_l, 1, 1)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    weights = []
    for tap, channels in enumerate(CHANNELS):
        key = f"lin{tap}.model.1.weight"
        w = state.get(key) if isinstance(state, dict) else None
        if w is None or tuple(w.shape) != (1, channels, 1, 1):
            found = "missing" if w is None else f"shaped {tuple(w.shape)}"
            raise ValueError(
                f"{path}: {key} is {found}, expected (1, {channels}, 1, 1) (LPIPS v0.1 VGG)"
            )
        if (w < 0).any():
            raise ValueError(f"{path}: {key} has negative weights; LPIPS weights are >= 0")
        weights.append(w.reshape(channels).to(torch.float32))
    return weights


# ----------------------------------------------------------------------------------------------
# The distance


def unit_normalize(f: Tensor) -> Tensor:
    """Each feature vector divided by its length over channels: (B, C, H, W) → same shape."""
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + EPS)


class LPIPS(nn.Module):
    """The LPIPS distance (Zhang et al. 2018, v0.1, VGG16): images ``x, y`` ``(B, 1 or 3, H, W)``
    in [-1, 1], at least 16 px a side, → per-image distances ``(B,)``; see the module docstring.

    Args:
        weights: ``"pretrained"`` (ImageNet VGG16 + v0.1 calibration, or FileNotFoundError),
            ``"offline"`` (seeded random-feature VGG16, uniform weights) or ``"auto"``
            (pretrained when both files are found, else offline with a warning).
        vgg_path: torchvision's ``vgg16-397923af.pth``; default: the torch hub cache.
        lin_path: the v0.1 ``vgg.pth`` linear weights; default: the installed lpips package's.

    Attributes:
        kind: ``"pretrained"`` or ``"offline"``: the variant in use.
    """

    def __init__(
        self,
        *,
        weights: Weights = "auto",
        vgg_path: str | None = None,
        lin_path: str | None = None,
    ):
        super().__init__()
        if weights not in WEIGHTS:
            raise ValueError(f"lpips weights={weights!r} is not one of {list(WEIGHTS)}")
        vgg, lin = vgg16_file(vgg_path), linear_file(lin_path)
        self.missing = missing_files(vgg, lin) if weights != "offline" else []
        if weights == "pretrained" and self.missing:
            raise FileNotFoundError(
                "LPIPS(weights='pretrained') needs two weights files and downloads nothing:\n  "
                + "\n  ".join(self.missing)
                + "\nweights='offline' (or 'auto') uses a random-feature VGG16 distance instead"
            )
        if weights == "auto" and self.missing:
            warnings.warn(
                "LPIPS falls back to the offline random-feature VGG16 distance: "
                + "; ".join(self.missing),
                stacklevel=2,
            )
        self.kind = "offline" if weights == "offline" or self.missing else "pretrained"
        if self.kind == "pretrained":
            self.files = (vgg, lin)
            self.vgg = VGG16Features(load_vgg16(vgg), source=str(vgg))
            linear = load_linear(lin)
        else:
            self.files = ()
            self.vgg = VGG16Features(random_vgg16(OFFLINE_SEED), source="random VGG16")
            linear = [torch.ones(channels) for channels in CHANNELS]
        for tap, v in enumerate(linear):
            self.register_buffer(f"lin{tap}", v, persistent=False)  # v_l (C_l,)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def describe(self) -> str:
        """One line: the variant in use and its weights files (hashing the VGG16 file, about a
        second for torchvision's 528 MB)."""
        if self.kind == "pretrained":
            vgg, lin = self.files
            return (
                f"LPIPS v0.1 (Zhang et al. 2018): VGG16 ImageNet weights ({vgg}, sha256 "
                f"{file_version(vgg)}) and linear weights ({lin}, sha256 {file_version(lin)})"
            )
        why = "; ".join(self.missing) if self.missing else "chosen with weights='offline'"
        return (
            f"offline: random-feature VGG16 distance (seed {OFFLINE_SEED}, uniform linear "
            f"weights), no pretrained weights ({why})"
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"

    def check(self, x: Tensor, y: Tensor) -> None:
        """ValueError unless x and y are same-shaped (B, 1 or 3, H, W) with H, W >= 16."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] not in (1, 3) or min(x.shape[2:]) < 16:
            raise ValueError(
                f"LPIPS compares two batches of the same shape (B, 1 or 3, H, W) with H, W >= 16 "
                f"(four 2x pools), got {tuple(x.shape)} and {tuple(y.shape)}"
            )

    def features(self, images: Tensor) -> list[Tensor]:
        """The five VGG16 taps of images in [-1, 1] after the scaling layer. Each side runs on its
        own, so a backward pass skips the side that needs no gradient (the real images)."""
        images = images.to(self.shift.dtype).expand(-1, 3, -1, -1)  # grayscale: R = G = B
        return self.vgg((images - self.shift) / self.scale)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Eq. 1: d(x, y) per image, (B,)."""
        self.check(x, y)
        d = 0
        for tap, (f_x, f_y) in enumerate(zip(self.features(x), self.features(y), strict=True)):
            v = self.get_buffer(f"lin{tap}")  # v_l (C_l,)
            u_x, u_y = unit_normalize(f_x.to(v.dtype)), unit_normalize(f_y.to(v.dtype))  # ŷ^l, ŷ'^l
            squared = (u_x - u_y) ** 2  # (B, C_l, H_l, W_l)
            d = d + (v.view(1, -1, 1, 1) * squared).sum(dim=1).mean(dim=(1, 2))  # Eq. 1, (B,)
        return d
