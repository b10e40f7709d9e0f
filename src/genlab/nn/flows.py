"""Invertible layers of Glow (Kingma & Dhariwal 2018) and its multi-scale architecture (Dinh et al.
2017, RealNVP §3.6).

Every layer maps ``x`` to ``y`` bijectively: ``forward(x) -> (y, logdet)`` with ``logdet`` the
per-sample log|det ∂y/∂x| of shape (B,), and ``inverse(y) -> x``. The layers of one *step of flow*
(Glow, Tab. 1):

* :class:`ActNorm`: y = (x + b) ⊙ exp(logs), per channel; b and logs start as the statistics of
  the first training batch (data-dependent initialization), so that y has zero mean and unit
  variance per channel. An ``initialized`` buffer records that the statistics were taken, so a
  reloaded checkpoint keeps its trained values;
* :class:`InvConv2d`: an invertible 1×1 convolution y = W x, W initialised as a random rotation;
  log|det| = h·w·log|det W|, or with the LU decomposition W = P L (U + diag(s)) (§3.2), in O(c)
  as h·w·Σ log|s|;
* :class:`AffineCoupling`: x = (x_a, x_b); (t, ŝ) = NN(x_a); y_b = (x_b + t) ⊙ σ(ŝ + 2),
  y_a = x_a (the sigmoid scale of the official code, which starts near 0.88 and cannot blow up);
  NN's last convolution starts at zero, so every coupling starts near the identity.

The multi-scale architecture (:class:`MultiScaleFlow`) repeats, at each of L levels,
:class:`Squeeze` (space to channels, 2×2 → 4c), K steps of flow and :class:`Split`, which factors
out half of the channels under a learned conditional prior N(μ(x_a), exp(logs(x_a))²). Here the
split is itself a bijection: it keeps x_a and replaces the factored half x_b by its standardised
value ε = (x_b − μ) ⊙ exp(−logs), with log|det| = −Σ logs; the last level's latent is standardised
the same way by :class:`LearnedPrior` (a learned per-channel mean and log-scale, Glow's
"learntop", plus a per-class shift for a class-conditional prior, Glow §5.2 "ycond"). The whole
flow is therefore a bijection x ↦ (ε_1, ..., ε_L) onto standard normal noise, with

    log p(x) = Σ_l log N(ε_l; 0, I) + Σ_layers log|det J_layer|,

and sampling at a temperature T draws ε ~ N(0, T² I) and inverts (Glow §5.3). With a
``num_classes``, every prior (the splits' too, not only the top one as in the paper) adds a learned
per-class shift to its mean and log-scale.

No noise, no losses here: dequantization and bits per dimension are ``genlab.models.flows.glow``'s.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def zeros_logdet(x: torch.Tensor) -> torch.Tensor:
    """A zero log-determinant per sample, (B,), of ``x``'s dtype and device."""
    return x.new_zeros(x.shape[0])


# ----------------------------------------------------------------------------------------------
# the three layers of a step of flow


class ActNorm(nn.Module):
    """Activation normalization (Glow §3.1): y = (x + b) ⊙ exp(logs) per channel.

    On its first forward pass in training mode, b and logs are set from that batch so that y has
    zero mean and unit variance per channel (statistics pooled over all DDP ranks when a process
    group is running, so that the ranks' weights stay equal). The ``initialized`` buffer is saved
    with the weights: a module loaded from a checkpoint is never initialised again.
    """

    def __init__(self, channels: int, *, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set b = −mean and logs = −log(std + eps) from ``x`` (B, C, H, W), per channel."""
        x = x.detach().double()
        sums = torch.stack([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3))])  # (2, C)
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(count)
        mean = sums[0] / count
        std = (sums[1] / count - mean**2).clamp_min(0).sqrt()
        self.bias.copy_(-mean.view_as(self.bias))
        self.logs.copy_(-torch.log(std + self.eps).view_as(self.logs))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not self.initialized:
            self.initialize(x)
        y = (x + self.bias) * self.logs.exp()
        logdet = x.shape[2] * x.shape[3] * self.logs.sum()  # h·w·Σ logs, Glow Tab. 1
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.logs) - self.bias


class InvConv2d(nn.Module):
    """Invertible 1×1 convolution (Glow §3.2): y = W x at every position, W ∈ R^{c×c}.

    W starts as a random rotation (log|det W| = 0). With ``lu=True`` it is parametrised as
    W = P L (U + diag(sign(s) exp(log|s|))) with P a fixed permutation, L unit lower triangular
    and U strictly upper triangular, so log|det W| = Σ log|s| costs O(c) instead of O(c³).
    """

    def __init__(self, channels: int, *, lu: bool = True):
        super().__init__()
        self.lu = lu
        rotation = torch.linalg.qr(torch.randn(channels, channels))[0]  # (c, c), det ±1
        if not lu:
            self.weight = nn.Parameter(rotation)
            return
        p, lower, upper = torch.linalg.lu(rotation)
        s = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(s.abs()))

    def weight_matrix(self) -> torch.Tensor:
        """W (c, c)."""
        if not self.lu:
            return self.weight
        eye = torch.eye(len(self.log_s), dtype=self.log_s.dtype, device=self.log_s.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.p @ lower @ upper

    def log_abs_det(self) -> torch.Tensor:
        """log|det W| (a scalar)."""
        return self.log_s.sum() if self.lu else torch.linalg.slogdet(self.weight)[1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight_matrix()
        y = F.conv2d(x, w[:, :, None, None])
        logdet = x.shape[2] * x.shape[3] * self.log_abs_det()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        w_inv = torch.linalg.inv(self.weight_matrix())
        return F.conv2d(y, w_inv[:, :, None, None])


class ZeroConv2d(nn.Module):
    """3×3 convolution that starts at zero, its output scaled by exp(3·logs) with a learned
    per-channel logs (the official Glow code's ``conv2d_zeros``): the last layer of every
    coupling network and prior, so that each starts as the identity / a standard normal."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, c_out, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * torch.exp(3 * self.logs)


class CouplingNet(nn.Module):
    """NN() of the coupling layer (Glow §3.3 and App. C): 3×3 conv, ActNorm, ReLU, 1×1 conv,
    ActNorm, ReLU, zero-initialised 3×3 conv. Not invertible, and need not be."""

    def __init__(self, c_in: int, c_out: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, hidden, 3, padding=1, bias=False)
        self.norm1 = ActNorm(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 1, bias=False)
        self.norm2 = ActNorm(hidden)
        self.out = ZeroConv2d(hidden, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x))[0])
        h = F.relu(self.norm2(self.conv2(h))[0])
        return self.out(h)


class AffineCoupling(nn.Module):
    """Affine coupling layer (Glow §3.3, Dinh et al. 2017): the first ⌊c/2⌋ channels x_a pass
    through and set a shift t and a scale s = σ(ŝ + 2) of the others, y_b = (x_b + t) ⊙ s, with
    log|det| = Σ log s. ``affine=False`` is the additive coupling (s = 1, log|det| = 0) of
    NICE (Dinh et al. 2015), which Glow compares against in its Fig. 3.
    """

    def __init__(self, channels: int, *, hidden: int = 512, affine: bool = True):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling layer needs >= 2 channels (got {channels})")
        self.affine = affine
        self.c_a = channels // 2
        c_b = channels - self.c_a
        self.net = CouplingNet(self.c_a, 2 * c_b if affine else c_b, hidden)

    def shift_scale(self, x_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(t, log s) from x_a; log s is None for the additive coupling."""
        h = self.net(x_a)
        if not self.affine:
            return h, None
        t, s_raw = h.chunk(2, dim=1)
        return t, F.logsigmoid(s_raw + 2.0)  # log σ(ŝ + 2), stable for any ŝ

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, : self.c_a], x[:, self.c_a :]
        t, log_s = self.shift_scale(x_a)
        if log_s is None:
            return torch.cat([x_a, x_b + t], dim=1), zeros_logdet(x)
        y_b = (x_b + t) * log_s.exp()
        return torch.cat([x_a, y_b], dim=1), log_s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        y_a, y_b = y[:, : self.c_a], y[:, self.c_a :]
        t, log_s = self.shift_scale(y_a)
        x_b = y_b - t if log_s is None else y_b * torch.exp(-log_s) - t
        return torch.cat([y_a, x_b], dim=1)


class FlowStep(nn.Module):
    """One step of flow (Glow Fig. 2a): ActNorm → invertible 1×1 conv → affine coupling."""

    def __init__(self, channels: int, *, hidden: int, lu: bool = True, affine: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                ActNorm(channels),
                InvConv2d(channels, lu=lu),
                AffineCoupling(channels, hidden=hidden, affine=affine),
            ]
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = zeros_logdet(x)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


# ----------------------------------------------------------------------------------------------
# the multi-scale architecture


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """Space to channels (Dinh et al. 2017, Fig. 3): (B, C, H, W) → (B, 4C, H/2, W/2)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(y: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`squeeze`: (B, 4C, H, W) → (B, C, 2H, 2W)."""
    b, c4, h, w = y.shape
    y = y.view(b, c4 // 4, 2, 2, h, w)
    return y.permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, 2 * h, 2 * w)


class Squeeze(nn.Module):
    """:func:`squeeze` as a flow layer (a permutation: log|det| = 0)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"squeeze needs an even height and width (got {tuple(x.shape)})")
        return squeeze(x), zeros_logdet(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return unsqueeze(y)


class ClassShift(nn.Module):
    """A learned per-class shift of a prior's (mean, log-scale), zero at the start."""

    def __init__(self, num_classes: int, channels: int):
        super().__init__()
        self.embedding = nn.Embedding(num_classes, channels)
        nn.init.zeros_(self.embedding.weight)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels)[:, :, None, None]  # (B, channels, 1, 1)


def standardize(z, mean_logs, *, inverse: bool = False):
    """ε = (z − μ) ⊙ exp(−logs) (or z = μ + exp(logs) ⊙ ε with ``inverse``) for the (μ, logs)
    halves of ``mean_logs``; forward also returns log|det ∂ε/∂z| = −Σ logs per sample."""
    mean, logs = mean_logs.chunk(2, dim=1)
    if inverse:
        return mean + logs.exp() * z
    eps = (z - mean) * torch.exp(-logs)
    return eps, -logs.expand_as(z).flatten(1).sum(1)


class Split(nn.Module):
    """Factor out half of the channels (Dinh et al. 2017 §3.6; Glow's ``split2d``) under the
    learned conditional prior p(x_b | x_a) = N(μ, exp(logs)²), (μ, logs) = ZeroConv(x_a) (+ a
    per-class shift): y = (x_a, ε) with ε = (x_b − μ) ⊙ exp(−logs) ~ N(0, I), log|det| = −Σ logs.
    The first ``keep`` channels of the output go on through the flow; the rest is ε.
    """

    def __init__(self, channels: int, *, num_classes: int | None = None):
        super().__init__()
        self.keep = channels // 2
        factored = channels - self.keep
        self.prior = ZeroConv2d(self.keep, 2 * factored)
        self.class_shift = ClassShift(num_classes, 2 * factored) if num_classes else None

    def mean_logs(self, x_a: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = self.prior(x_a)  # (B, 2·factored, H, W)
        return h if self.class_shift is None else h + self.class_shift(labels)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        x_a, x_b = x[:, : self.keep], x[:, self.keep :]
        eps, logdet = standardize(x_b, self.mean_logs(x_a, labels))
        return torch.cat([x_a, eps], dim=1), logdet

    def inverse(self, y: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        y_a, eps = y[:, : self.keep], y[:, self.keep :]
        x_b = standardize(eps, self.mean_logs(y_a, labels), inverse=True)
        return torch.cat([y_a, x_b], dim=1)


class LearnedPrior(nn.Module):
    """The prior of the last level's latent: N(μ, exp(logs)²) with a learned per-channel μ and
    logs (Glow's "learntop") plus a per-class shift ("ycond"); standardises z to ε like
    :class:`Split`, log|det| = −Σ logs."""

    def __init__(self, channels: int, *, num_classes: int | None = None):
        super().__init__()
        self.mean_logs_bias = nn.Parameter(torch.zeros(1, 2 * channels, 1, 1))
        self.class_shift = ClassShift(num_classes, 2 * channels) if num_classes else None

    def mean_logs(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        h = self.mean_logs_bias.expand(z.shape[0], -1, *z.shape[2:])  # (B, 2C, H, W)
        return h if self.class_shift is None else h + self.class_shift(labels)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None):
        return standardize(z, self.mean_logs(z, labels))

    def inverse(self, eps: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return standardize(eps, self.mean_logs(eps, labels), inverse=True)


class MultiScaleFlow(nn.Module):
    """Glow's multi-scale flow (Fig. 2b): L levels of squeeze → K steps of flow → split (the
    last level: the learned prior), a bijection from images to standard normal latents.

    Args:
        in_channels: the input's channels c (the first level sees 4c after its squeeze).
        levels: L; the input's height and width must be divisible by 2^L.
        steps: K, steps of flow per level (Glow: 32).
        hidden: channels of the coupling networks (Glow: 512).
        lu: LU-decomposed 1×1 convolutions (Glow §3.2) instead of plain ones.
        affine: affine couplings (else additive).
        num_classes: with a number, every prior takes a per-class shift (class-conditional);
            None: unconditional.

    ``forward(x, labels) -> (latents, logdet)``: the L standardised latents ε_l (B, c_l, h_l, w_l)
    and Σ log|det| (B,). ``inverse(latents, labels) -> x``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        levels: int = 3,
        steps: int = 32,
        hidden: int = 512,
        lu: bool = True,
        affine: bool = True,
        num_classes: int | None = None,
    ):
        super().__init__()
        if levels < 1 or steps < 1 or hidden < 1 or in_channels < 1:
            raise ValueError(
                f"model.flow: levels={levels}, steps={steps}, hidden={hidden} and in_channels="
                f"{in_channels} must all be >= 1"
            )
        self.in_channels, self.num_levels, self.num_classes = in_channels, levels, num_classes
        self.squeeze = Squeeze()
        self.levels = nn.ModuleList()
        c = in_channels
        for level in range(levels):
            c *= 4
            last = level == levels - 1
            prior = (LearnedPrior if last else Split)(c, num_classes=num_classes)
            steps_ = [FlowStep(c, hidden=hidden, lu=lu, affine=affine) for _ in range(steps)]
            self.levels.append(nn.ModuleDict({"steps": nn.ModuleList(steps_), "prior": prior}))
            c = c if last else c // 2

    def check_labels(self, labels: torch.Tensor | None) -> None:
        if (labels is None) != (self.num_classes is None):
            wanted = "class labels" if self.num_classes else "no labels (it is unconditional)"
            raise ValueError(f"this flow takes {wanted}; got labels={labels is not None}")

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        self.check_labels(labels)
        latents, logdet = [], zeros_logdet(x)
        for level in self.levels:
            x, _ = self.squeeze(x)  # (B, 4C, H/2, W/2)
            for step in level["steps"]:
                x, ld = step(x)
                logdet = logdet + ld
            y, ld = level["prior"](x, labels)
            logdet = logdet + ld
            if isinstance(level["prior"], Split):
                x, eps = y[:, : level["prior"].keep], y[:, level["prior"].keep :]
            else:
                eps = y
            latents.append(eps)
        return latents, logdet

    def inverse(self, latents: list[torch.Tensor], labels: torch.Tensor | None = None):
        self.check_labels(labels)
        x = None
        for level, eps in zip(reversed(self.levels), reversed(latents), strict=True):
            y = eps if x is None else torch.cat([x, eps], dim=1)
            x = level["prior"].inverse(y, labels)
            for step in reversed(level["steps"]):
                x = step.inverse(x)
            x = self.squeeze.inverse(x)
        return x

    def latent_shapes(self, height: int, width: int | None = None) -> list[tuple[int, int, int]]:
        """The (c_l, h_l, w_l) of the L latents of an input of ``height`` × ``width``."""
        width = height if width is None else width
        shapes, c = [], self.in_channels
        for level in range(self.num_levels):
            c, height, width = 4 * c, height // 2, width // 2
            last = level == self.num_levels - 1
            shapes.append((c if last else c - c // 2, height, width))
            c = c // 2
        return shapes

    @property
    def initialized(self) -> bool:
        """Whether every ActNorm has taken its data-dependent initialization."""
        return all(bool(m.initialized) for m in self.modules() if isinstance(m, ActNorm))


def standard_normal_log_prob(latents: list[torch.Tensor]) -> torch.Tensor:
    """Σ_l log N(ε_l; 0, I) per sample, (B,)."""
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    return sum((-0.5 * eps**2 - half_log_2pi).flatten(1).sum(1) for eps in latents)
