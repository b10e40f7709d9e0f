"""The oracle's verdict on single images: does each image show what its prompt asks for?

Caption accuracy (:class:`genlab.metrics.text_image.CaptionAccuracy`) counts over a set; a
person looking at samples wants the verdict on each one. Where the data has an oracle with a
caption parser (the shapes oracle: ``parse(images)`` and ``caption_cells(prompt)``, both per
cell of the row-major 3×3 grid), :func:`verdicts` compares each image's parsed cells with the
ones its prompt asks for and says which cells are wrong and how.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from genlab.metrics.text_image import ATTRIBUTES, EMPTY

POSITIONS = (  # row-major 3x3 grid cells: genlab.data.shapes.CELLS (no dataset import here; tested)
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)


def cell_verdict(parsed: np.ndarray, wanted: np.ndarray) -> str:
    """One image's verdict from its parsed and wanted cells ``(9, 3)``: ``"✓ right"`` or
    ``"✗ <cell> (<what is wrong>), ..."``."""
    wrong = []
    for cell, (got, want) in enumerate(zip(parsed, wanted, strict=True)):
        if (got == want).all():
            continue
        where = POSITIONS[cell] if cell < len(POSITIONS) else f"cell {cell}"
        if want[0] == EMPTY:
            wrong.append(f"{where} (an extra object)")
        elif got[0] == EMPTY:
            wrong.append(f"{where} (missing)")
        else:
            bad = [name for name, g, w in zip(ATTRIBUTES, got, want, strict=True) if g != w]
            wrong.append(f"{where} ({', '.join(bad)})")
    return "✓ right" if not wrong else "✗ " + "; ".join(wrong)


def verdicts(oracle: Any, images: torch.Tensor, prompts: list[str]) -> list[str] | None:
    """The oracle's verdict on each image for its prompt, or None when there is no oracle with
    a caption parser or a prompt is not one it reads.

    Args:
        oracle: an evaluator module with ``parse`` and ``caption_cells`` (the shapes oracle), a
            :class:`genlab.metrics.extractors.CheckpointEvaluator` holding one, or None.
        images: ``(N, C, H, W)`` in [-1, 1].
        prompts: N prompts, prompt i for image i.
    """
    module = getattr(oracle, "module", oracle)
    parse_caption = getattr(module, "caption_cells", None)
    if module is None or parse_caption is None or len(prompts) != len(images):
        return None
    try:
        wanted = [np.asarray(parse_caption(p)) for p in prompts]
    except ValueError:  # not a caption the oracle reads
        return None
    device = next(iter(module.parameters())).device if hasattr(module, "parameters") else "cpu"
    parsed = module.parse(images.float().to(device)).cpu().numpy()
    return [cell_verdict(p, w) for p, w in zip(parsed, wanted, strict=True)]
