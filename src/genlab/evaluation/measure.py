"""The synced metrics of a set of images, drawn chunk by chunk over the ranks.

Every metric is a torchmetrics metric (``genlab.metrics``) whose states are synced across ranks;
``compute()`` runs on every rank; nothing collective runs on rank 0 only. The synced image count
is checked against the number asked.

Caption accuracy reads the wanted cells of a prompt with the oracle's own caption parser
(``caption_cells`` of the evaluator module), so no dataset is named here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import torch
from torchmetrics import SumMetric

from genlab.evaluation.generation import check_every_rank_has_a_chunk, chunks_of
from genlab.evaluation.protocol import named_values
from genlab.metrics.fid import FID
from genlab.metrics.inception_score import InceptionScore
from genlab.metrics.kid import KID, subset_size_for
from genlab.metrics.precision_recall import PrecisionRecall
from genlab.metrics.reconstruction import ReconstructionMetrics
from genlab.metrics.text_image import CaptionAccuracy, CLIPScore
from genlab.utils import progress
from genlab.utils.images import check_images
from genlab.utils.rank_logging import RankedLogger

log = RankedLogger(__name__, rank_zero_only=True)
Note = Callable[[str, str], None]  # (key, message): say it once


def caption_parser(tools: dict[str, Any]) -> Callable[[str], np.ndarray] | None:
    """The oracle's parser of captions into wanted cells ``(9, 3)``, if it has one."""
    oracle = tools.get("oracle")
    return getattr(getattr(oracle, "module", None), "caption_cells", None)


def parsable(prompts: list[str], parse: Callable[[str], np.ndarray] | None) -> bool:
    """Whether every prompt is a caption the oracle's labels can be read from."""
    if parse is None:
        return False
    try:
        for prompt in prompts:
            parse(prompt)
    except ValueError:
        return False
    return True


def new_metrics(
    wanted: Collection[str],
    settings: dict[str, int],
    tools: dict[str, Any],
    reference: torch.Tensor | None,
    conditions: dict[str, list],
    n: int,
    note: Note,
    paired: bool = False,
) -> torch.nn.ModuleDict:
    """Fresh synced metrics for ``n`` images; those that cannot apply are skipped. ``paired``:
    image i was made for reference item i (KID's paired estimator)."""
    s, metrics = settings, {}
    if reference is not None:
        if "fid" in wanted:
            metrics["fid"] = FID(reference=reference)
        if "kid" in wanted:
            size = subset_size_for(min(len(reference), n), s["kid_subset_size"])
            metrics["kid"] = KID(
                reference=reference, subsets=s["kid_subsets"], subset_size=size, paired=paired
            )
        if "pr" in wanted:
            metrics["pr"] = PrecisionRecall(reference=reference, k=s["pr_k"])
    if "is" in wanted and callable(getattr(tools.get("extractor"), "class_probs", None)):
        metrics["is"] = InceptionScore(splits=min(s["is_splits"], n // 2))
    prompts = conditions.get("prompts")
    if "caption" in wanted and "oracle" in tools and prompts:
        if parsable(prompts, caption_parser(tools)):
            metrics["caption"] = CaptionAccuracy()
        else:
            note("caption", "prompts are not shapes captions: no caption accuracy")
    if "clip" in wanted and "clip" in tools and prompts:
        metrics["clip"] = CLIPScore()
    return torch.nn.ModuleDict(metrics)


def update_metrics(metrics, tools, images, items: range, conditions, device) -> None:
    """Update the metrics with one chunk of images (items ``items``)."""
    index = torch.tensor(list(items), device=device)
    images = images.to(device)
    if {"fid", "kid", "pr"} & set(metrics):
        features = tools["extractor"].features(images).to(device)
        for name in ("fid", "kid", "pr"):
            if name == "fid" and name in metrics:
                metrics[name].update(features)
            elif name in metrics:
                metrics[name].update(features, index)
    if "is" in metrics:
        metrics["is"].update(tools["extractor"].class_probs(images).to(device), index)
    prompts = [conditions["prompts"][i] for i in items] if "prompts" in conditions else None
    if "caption" in metrics:
        parse = caption_parser(tools)
        wanted = torch.from_numpy(np.stack([parse(p) for p in prompts])).to(device)
        metrics["caption"].update(tools["oracle"].module.parse(images).to(device), wanted)
    if "clip" in metrics:
        clip = tools["clip"].module
        metrics["clip"].update(
            clip.encode_images(images).to(device), clip.encode_texts(prompts).to(device)
        )


def update(metrics, tools, images, items, conditions, device, originals, count) -> None:
    """Check one chunk of images and add it to every metric and to the image count."""
    check_images(images, name="generated images" if originals is None else "reconstructions")
    update_metrics(metrics, tools, images, items, conditions, device)
    if originals is not None:
        metrics["reconstruction"].update(images.to(device), originals(items).to(device))
    count.update(torch.tensor(float(len(items)), device=device))


def measure(
    source: Callable[[range], torch.Tensor],
    n: int,
    *,
    wanted: Collection[str],
    settings: dict[str, int],
    tools: dict[str, Any],
    reference: torch.Tensor | None,
    conditions: dict[str, list],
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    note: Note,
    originals: Callable[[range], torch.Tensor] | None = None,
    paired: bool = False,
    what: str = "images",
) -> dict[str, float]:
    """Draw this rank's chunks from ``source(items)``, update the synced metrics, compute.

    With ``originals(items)`` the images drawn are reconstructions of those: PSNR and SSIM
    against them are measured too. ``paired``: item i was made for reference item i (a prompt
    that is its caption, a reconstruction, a redraw of its scene); it holds only with as many
    reference items as images. Returns the named values, ``num_samples`` and ``paired`` (the
    pairing in effect, for the protocol). When no metric can read the images (no feature
    extractor, oracle or CLIP for what is asked), nothing is drawn: ``num_samples`` is 0 and
    there are no values.
    """
    paired = paired and reference is not None and len(reference) == n
    metrics = new_metrics(wanted, settings, tools, reference, conditions, n, note, paired)
    if originals is not None:
        metrics["reconstruction"] = ReconstructionMetrics()
    if not metrics:
        note(f"unread-{what}", f"no metric can read the {what}: none drawn")
        return {"num_samples": 0, "paired": False}
    metrics = metrics.to(device)
    count = SumMetric().to(device)
    check_every_rank_has_a_chunk(n, batch_size, world_size)
    log.info(
        f"{', '.join(metrics)} of {n} {what} ({world_size} process(es), chunks of {batch_size})"
    )
    start, done = time.monotonic(), 0
    mine = chunks_of(rank, world_size, n, batch_size)
    shown = progress.bar(f"{what} for {', '.join(metrics)}", total=sum(map(len, mine)))
    with shown as bar:
        for items in mine:
            images = source(items)
            update(metrics, tools, images, items, conditions, device, originals, count)
            done += len(items)
            bar.advance(len(items))
            if done == len(items) and done * world_size < n:  # after the first chunk: how long
                left = (time.monotonic() - start) * (n / (done * world_size) - 1)
                log.info(
                    f"  {done} of {n // world_size} {what} on this rank; about {left:.0f} s left"
                )
    total = int(count.compute().item())
    if total != n:
        raise RuntimeError(f"generated {total} images over all ranks, expected exactly {n}")
    values: dict[str, Any] = {"num_samples": total, "paired": paired}
    for name, metric in metrics.items():
        values.update(named_values(name, metric.compute()))
    return values
