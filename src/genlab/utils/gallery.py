"""An HTML gallery of samples for people: each image upscaled (nearest neighbour, sharp pixels)
as an inline PNG, with its prompt under it and, where an oracle judged it, its verdict.

The page is one self-contained file (the PNGs are embedded as ``data:`` URIs), so it can be
copied, attached to a run or opened from anywhere. A page may hold several sections (e.g. the
grids of successive training steps, newest first).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from genlab.utils.images import upscale_factor
from genlab.utils.io import atomic_write_text

STYLE = """
body { font-family: sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 2em; } p.note { color: #555; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(var(--cell), 1fr));
        gap: 14px; }
figure { margin: 0; background: white; padding: 6px; border: 1px solid #ddd; }
figure img { width: 100%; image-rendering: pixelated; display: block; }
figcaption { font-size: 0.85em; margin-top: 4px; overflow-wrap: anywhere; }
.verdict { font-size: 0.8em; margin-top: 2px; }
.ok { color: #17752b; } .bad { color: #b3261e; }
"""


def png_data_uri(image: torch.Tensor, cell: int | None) -> str:
    """One image ``(C, H, W)`` in [-1, 1] as a ``data:image/png`` URI, upscaled by an integer
    factor to at least ``cell`` pixels a side (None: native)."""
    factor = upscale_factor(image.shape[-1], cell)
    big = torch.nn.functional.interpolate(image[None].detach().float().cpu(), scale_factor=factor)
    pixels = ((big[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def gallery_section(
    images: torch.Tensor,
    *,
    title: str,
    captions: Sequence[str] | None = None,
    verdicts: Sequence[str] | None = None,
    note: str | None = None,
    cell: int | None = 128,
) -> str:
    """The HTML of one section: a heading, an optional note, and one figure per image."""
    for name, texts in (("captions", captions), ("verdicts", verdicts)):
        if texts is not None and len(texts) != len(images):
            raise ValueError(f"{len(texts)} {name} for {len(images)} images")
    side = max(64, (cell or images.shape[-1]))
    parts = [f"<section><h2>{html.escape(title)}</h2>"]
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts.append(f'<div class="grid" style="--cell: {side}px">')
    for i, image in enumerate(images):
        text = captions[i] if captions is not None else f"image {i}"
        figure = [f'<figure><img src="{png_data_uri(image, cell)}" alt="{html.escape(text)}">']
        figure.append(f"<figcaption>{html.escape(text)}</figcaption>")
        if verdicts is not None:
            kind = "ok" if verdicts[i].startswith("✓") else "bad"
            figure.append(f'<div class="verdict {kind}">oracle: {html.escape(verdicts[i])}</div>')
        parts.append("".join(figure) + "</figure>")
    parts.append("</div></section>")
    return "\n".join(parts)


def write_gallery(path: str | Path, sections: Sequence[str], *, title: str) -> Path:
    """Write the page ``path`` (atomically) from sections made by :func:`gallery_section`."""
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>"
        f"<h1>{html.escape(title)}</h1>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    path = Path(path)
    atomic_write_text(path, page)
    return path
