"""Adversarial losses on discriminator logits, and VQ-GAN's adaptive weight.

* ``hinge`` (Lim & Ye 2017; Miyato et al. 2018; the VQ-GAN default): the discriminator minimises
  ½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))]), the generator −E[D(x̂)].
* ``non_saturating`` (Goodfellow et al. 2014, §3): the discriminator minimises
  ½ (E[softplus(−D(x))] + E[softplus(D(x̂))]) (binary cross-entropy on logits), the generator
  E[softplus(−D(x̂))] = −E[log σ(D(x̂))].

Means run over every logit of a patch discriminator. The ½ keeps the discriminator's loss on the
scale of one term (taming-transformers' convention).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

AdversarialLoss = Literal["hinge", "non_saturating"]


def discriminator_loss(real: Tensor, fake: Tensor, kind: AdversarialLoss = "hinge") -> Tensor:
    """The discriminator's loss from its logits on real and on generated images (scalar)."""
    real, fake = real.float(), fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    if kind == "non_saturating":
        return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    raise ValueError(f"adversarial loss {kind!r} must be hinge or non_saturating")


def generator_loss(fake: Tensor, kind: AdversarialLoss = "hinge") -> Tensor:
    """The generator's loss from the discriminator's logits on generated images (scalar)."""
    fake = fake.float()
    if kind == "hinge":
        return -fake.mean()
    if kind == "non_saturating":
        return F.softplus(-fake).mean()
    raise ValueError(f"adversarial loss {kind!r} must be hinge or non_saturating")


def adaptive_weight(
    rec_loss: Tensor,
    adv_loss: Tensor,
    last_layer: Tensor,
    *,
    delta: float = 1e-4,
    max_weight: float = 1e4,
) -> Tensor:
    """λ = ‖∇_L rec_loss‖ / (‖∇_L adv_loss‖ + δ) at the decoder's last layer L (Esser et al.
    2021, Eq. 7), clamped to [0, ``max_weight``] and detached.

    Both gradients are taken with ``torch.autograd.grad`` (the graph is kept for the backward
    pass that follows), so nothing accumulates in ``.grad``.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (adv_grad.float().norm() + delta)
    return weight.clamp(0.0, max_weight).detach()
