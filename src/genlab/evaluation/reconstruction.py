"""Images that are not generated, measured as if they were: reconstructions and real images.

A model with ``reconstruct(images)`` (the first stages: VAE, VQ-GAN, dVAE) gets the result
``reconstructed``: its reconstructions of items 0..n-1 of the reference split, the same items as
the reference features. FID against the reference is then rFID, the reconstruction FID (Esser
et al. 2021, Table 2; Rombach et al. 2022, Table 8), with KID and precision/recall beside it;
caption accuracy compares the reconstructions with their own captions (shapes data); PSNR and
SSIM compare them with the originals (``genlab.metrics.reconstruction``). No Inception Score:
it rates diversity and class confidence, not fidelity to an input. ``reconstruct`` is
deterministic, so no seed is involved.

The real floor (``real_split``) measures real images of a split the same way: another split
(``test``: independent real images, the floor of an unconditional model), or ``redrawn``: the
reference split's own scenes drawn again (datasets with a ``redrawn(split)``: shapes), the floor
of a text model prompted with the reference captions — the protocol of the generated images.
The reconstructions and the redrawn images are paired with the reference items (KID's paired
estimator).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from genlab.data.splits import split_dataset
from genlab.evaluation.generation import own_captions
from genlab.evaluation.protocol import weights_of

# measure(source, n, conditions, originals=, skip=, paired=) -> values, num_samples, paired
Measure = Callable[..., dict[str, Any]]


def evaluate_reconstructed(
    pl_module: L.LightningModule,
    datamodule: Any,
    *,
    split: str,
    num_samples: int,
    measure: Measure,
    protocol: Callable[[int], dict[str, Any]],
) -> dict[str, Any]:
    """rFID & co.: ``reconstruct`` of items 0..n-1 of ``split``, the reference's own items,
    measured as if generated, plus PSNR / SSIM against the originals.

    Args:
        measure: ``measure(source, n, conditions, originals=, skip=)`` → named values.
        protocol: ``protocol(n)``: the base protocol for n images.
    """
    dataset = split_dataset(datamodule, split)
    n = min(num_samples, len(dataset))
    conditions = own_captions(dataset, n)

    @functools.lru_cache(maxsize=1)  # a chunk's originals, read once for both uses
    def originals(items: range) -> torch.Tensor:
        return torch.stack([dataset[i]["image"] for i in items])  # (B, C, H, W)

    def source(items: range) -> torch.Tensor:
        with torch.no_grad():
            return pl_module.reconstruct(originals(items).to(pl_module.device))

    start = time.monotonic()
    values = measure(source, n, conditions, originals=originals, skip={"is"}, paired=True)
    result = {
        **protocol(n),
        "num_samples": values.pop("num_samples"),
        "source": f"reconstructions of {split} items 0..{n - 1}",
        "paired": values.pop("paired"),
        "weights": weights_of(pl_module),
    }
    del result["is_splits"]  # no Inception Score of reconstructions
    result["seconds"] = round(time.monotonic() - start, 2)
    return {"name": "reconstructed", "protocol": result, "metrics": values}


def evaluate_real(
    datamodule: Any,
    *,
    split: str,
    num_samples: int,
    measure: Measure,
    protocol: Callable[[int], dict[str, Any]],
    reference_split: str = "val",
) -> dict[str, Any]:
    """The floor: real images of ``split`` measured as if they were generated; ``redrawn``: the
    ``reference_split``'s scenes drawn again (module docstring)."""
    if split == "redrawn":
        if not callable(getattr(datamodule, "redrawn", None)):
            raise ValueError(
                f"real_split=redrawn needs a dataset that can draw its scenes again (shapes); "
                f"{type(datamodule).__name__} cannot: use real_split=test"
            )
        dataset, source_name = datamodule.redrawn(reference_split), f"{reference_split} redrawn"
    else:
        dataset, source_name = split_dataset(datamodule, split), f"{split} split"
    n = min(num_samples, len(dataset))
    conditions = own_captions(dataset, n)

    def source(items: range) -> torch.Tensor:
        return torch.stack([dataset[i]["image"] for i in items])

    start = time.monotonic()
    paired = split in ("redrawn", reference_split)  # item i made for (or is) reference item i
    values = measure(source, n, conditions, paired=paired)
    result = {
        **protocol(n),
        "num_samples": values.pop("num_samples"),
        "source": f"real images, {source_name}",
        "paired": values.pop("paired"),
    }
    result["seconds"] = round(time.monotonic() - start, 2)
    return {"name": f"real_{split}", "protocol": result, "metrics": values}
