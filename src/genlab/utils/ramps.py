"""Scalar schedules over training steps: the Gumbel temperature and KL weight of the dVAE, a KL
warm-up of the VAE. A ``Ramp`` is a plain dataclass, so a config instantiates it
(``_target_: genlab.utils.ramps.Ramp``) and a model calls it with its step count."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

RampKind = Literal["constant", "linear", "cosine", "exponential"]


@dataclass(frozen=True)
class Ramp:
    """``start`` until step ``begin``, then ``start → end`` over ``steps`` steps, then ``end``.

    ``kind`` is the shape of the transition at progress p ∈ [0, 1]:
    ``linear`` start + (end − start) p; ``cosine`` start + (end − start)(1 − cos πp)/2 (the
    half-cosine DALL·E uses for its temperature and KL weight, Ramesh et al. 2021, App. A.2);
    ``exponential`` start (end / start)^p (geometric, needs both > 0); ``constant`` ``start``.
    """

    start: float
    end: float | None = None
    steps: int = 0
    begin: int = 0
    kind: RampKind = "cosine"

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "cosine", "exponential"):
            raise ValueError(
                f"ramp kind={self.kind!r} must be constant, linear, cosine or exponential"
            )
        if self.steps < 0 or self.begin < 0:
            raise ValueError(f"ramp steps={self.steps} and begin={self.begin} must be >= 0")
        if self.kind == "exponential" and (self.start <= 0 or (self.end or 0) <= 0):
            raise ValueError(
                f"an exponential ramp needs start and end > 0 (got {self.start}, {self.end})"
            )

    @property
    def final(self) -> float:
        """The value once the ramp is over."""
        return self.start if self.kind == "constant" or self.end is None else self.end

    def __call__(self, step: int) -> float:
        end = self.start if self.end is None else self.end
        if self.kind == "constant" or step < self.begin:
            return self.start
        p = 1.0 if self.steps == 0 else min(1.0, (step - self.begin) / self.steps)
        if self.kind == "linear":
            return self.start + (end - self.start) * p
        if self.kind == "cosine":
            return self.start + (end - self.start) * (1 - math.cos(math.pi * p)) / 2
        return self.start * (end / self.start) ** p
