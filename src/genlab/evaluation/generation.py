"""Generated images sharded over the ranks: conditions, chunks and their seeds.

Item i of the ``n`` generated images gets the i-th prompt of the datamodule's ``sample_prompts``
for a text model (the caption of val item i, so with ``reference_split=val`` the generated set is
paired with the reference: image i is made for real image i's caption), label ``i mod K`` for
a label model, nothing for an unconditional one. Items
are cut into chunks of ``batch_size``; chunk c is drawn by rank ``c mod W`` from a generator
seeded from (seed, purpose, c), so every item is drawn exactly once (no duplicates, no padding)
and an item's image does not depend on the number of ranks.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch

GENERATION_PURPOSE = 1  # seeds of generated chunks: (seed, GENERATION_PURPOSE, chunk)


def chunk_seed(seed: int, chunk: int, purpose: int = GENERATION_PURPOSE) -> int:
    """A 63-bit seed for one chunk, mixed from (seed, purpose, chunk) by numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, purpose, chunk]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) % 2**63


def chunks_of(rank: int, world_size: int, n: int, size: int) -> list[range]:
    """The item ranges of the chunks rank ``rank`` draws: chunks r, r + W, ... of ``size``."""
    starts = range(0, n, size)
    return [range(s, min(s + size, n)) for c, s in enumerate(starts) if c % world_size == rank]


def check_every_rank_has_a_chunk(n: int, batch_size: int, world_size: int) -> None:
    """A rank without items would hang the metric sync (empty cat states cannot be gathered)."""
    if math.ceil(n / batch_size) < world_size:
        raise ValueError(
            f"callbacks.generative_metrics: {n} images in chunks of batch_size="
            f"{batch_size} leave some of the {world_size} ranks without a chunk;"
            " lower batch_size or raise num_samples"
        )


def sample_conditions(pl_module: L.LightningModule, datamodule: Any, n: int) -> dict[str, list]:
    """Prompts or labels of ``n`` generated items (see the module docstring)."""
    condition = pl_module.condition
    if condition == "label":
        return {"labels": [i % pl_module.num_classes for i in range(n)]}
    if condition == "text":
        prompts = datamodule.sample_prompts(n) if datamodule is not None else None
        if not prompts:
            raise ValueError(
                f"a text-conditional model needs prompts, but {type(datamodule).__name__} "
                "has no captions (sample_prompts)"
            )
        return {"prompts": [prompts[i % len(prompts)] for i in range(n)]}
    return {}


def random_captions(datamodule: Any, n: int, *, split: str, seed: int) -> tuple[list[str], int]:
    """``n`` captions drawn at random with ``seed`` from every caption of ``split``'s images
    (``datamodule.caption_pool(split)``), and the pool's size.

    The draw is a random permutation of the pool, then another, ... (so no caption is used a
    second time before every caption was used once), cut at ``n``: the zero-shot COCO protocol's
    "30,000 random val captions" (Imagen, LDM, GLIDE) on a pool of any size.
    """
    pool_of = getattr(datamodule, "caption_pool", None)
    if pool_of is None:
        raise ValueError(
            f"prompt_split={split!r}: {type(datamodule).__name__} cannot list the captions of a "
            "split (caption_pool); random-caption protocols need captioned data such as data=coco"
        )
    pool = list(pool_of(split))
    if not pool:
        raise ValueError(f"prompt_split={split!r}: the split has no captions")
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < n:
        order.extend(rng.permutation(len(pool)).tolist())
    return [pool[i] for i in order[:n]], len(pool)


def sampling_options(
    sampling: dict[str, Any], generate_options: dict[str, Any], scale: float | None
) -> dict[str, Any]:
    """The keywords of ``generate``: the sampling options set, the further options, the scale."""
    options = {k: v for k, v in sampling.items() if v is not None}
    options |= generate_options
    if scale is not None:
        options["guidance_scale"] = scale
    return options


def generate_chunk(
    pl_module: L.LightningModule,
    conditions: dict[str, list],
    items: range,
    *,
    seed: int,
    batch_size: int,
    options: dict[str, Any],
) -> torch.Tensor:
    """Images of ``items``: one chunk, from its own seeded generator."""
    generator = torch.Generator().manual_seed(chunk_seed(seed, items.start // batch_size))
    if "prompts" in conditions:
        chosen = [conditions["prompts"][i] for i in items]
        return pl_module.generate(chosen, generator=generator, **options)
    if "labels" in conditions:
        labels = [conditions["labels"][i] for i in items]
        return pl_module.generate(labels=labels, generator=generator, **options)
    return pl_module.generate(n=len(items), generator=generator, **options)


def own_captions(dataset: Any, n: int) -> dict[str, list[str]]:
    """The captions of items 0..n-1 as prompts, if every one has a caption (else nothing)."""
    captions = [dataset[i].get("caption") for i in range(n)]
    return {"prompts": captions} if all(isinstance(c, str) for c in captions) else {}
