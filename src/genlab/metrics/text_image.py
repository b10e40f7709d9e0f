"""Text–image agreement: CLIP score from embeddings, and caption accuracy from parsed attributes.

* ``CLIPScore``: the cosine similarity of an image's and its prompt's embeddings (the project's
  own CLIP offline), negative values clipped to 0, averaged over images. Reported in two scales:
  ``clip_score`` = 100 · mean max(cos, 0), the form of torchmetrics' ``CLIPScore``, and
  ``clip_score_w2.5`` = 2.5 · mean max(cos, 0), CLIP-S of Hessel et al. 2021 (Eq. 1, w = 2.5).
* ``CaptionAccuracy``: how well generated images follow compositional prompts, judged by an
  attribute parser (the shapes oracle) that reads, for each cell of the 3×3 grid, the (shape,
  color, size) of the object drawn there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from genlab.metrics.feature_bank import check_features

GRID_CELLS = 9  # a row-major 3×3 grid
ATTRIBUTES = ("shape", "color", "size")
EMPTY = -1  # all three attributes of an empty cell


class CLIPScore(Metric):
    """CLIP score: mean max(cos(E_I, E_T), 0) of image and text embeddings (Hessel et al. 2021).

    ``update`` normalizes the embeddings itself and accumulates Σ max(cos, 0) and the count
    (``sum`` states, float64). ``compute`` returns ``{"clip_score": 100 · mean,
    "clip_score_w2.5": 2.5 · mean}``: the torchmetrics scale and CLIP-S with w = 2.5.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> None:
        """Add pairs of image and text embeddings, both ``(B, D)``, row i the image of prompt i."""
        check_features(image_embeddings, "image_embeddings")
        check_features(text_embeddings, "text_embeddings", dim=image_embeddings.shape[1])
        if len(image_embeddings) != len(text_embeddings):
            raise ValueError(
                f"{len(image_embeddings)} image embeddings for {len(text_embeddings)} text ones"
            )
        image = F.normalize(image_embeddings.detach().double(), dim=1)
        text = F.normalize(text_embeddings.detach().double(), dim=1)
        self.score_sum += (image * text).sum(dim=1).clamp(min=0).sum()
        self.count += len(image)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"clip_score": 100 · mean max(cos, 0), "clip_score_w2.5": 2.5 · mean max(cos, 0)}``."""
        if self.count == 0:
            raise ValueError("CLIPScore has no embeddings: call update() before compute()")
        mean = self.score_sum / self.count
        return {"clip_score": 100 * mean, "clip_score_w2.5": 2.5 * mean}


def check_cells(cells: torch.Tensor, name: str) -> None:
    """Check a batch of grid attributes ``(B, 9, 3)``: integers ≥ -1, empty cells all -1."""
    if not isinstance(cells, torch.Tensor) or cells.shape[1:] != (GRID_CELLS, len(ATTRIBUTES)):
        shape = tuple(cells.shape) if isinstance(cells, torch.Tensor) else type(cells)
        raise ValueError(
            f"{name} must be shaped (B, 9, 3): (shape, color, size) per cell, got {shape}"
        )
    if cells.is_floating_point() or cells.dtype == torch.bool:
        raise ValueError(f"{name} must be integer attribute indices, got dtype {cells.dtype}")
    if len(cells) and cells.min() < EMPTY:
        raise ValueError(f"{name} has index {cells.min().item()}; -1 marks an empty cell")
    partial = (cells == EMPTY).any(dim=2) & (cells != EMPTY).any(dim=2)  # (B, 9)
    if partial.any():
        image, cell = partial.nonzero()[0].tolist()
        raise ValueError(
            f"{name}[{image}, {cell}] = {cells[image, cell].tolist()}: a cell is either empty"
            " (all three -1) or holds an object (no -1)"
        )


OBJECT_COUNTS = (1, 2)  # prompts split by how many objects they ask for
BY_COUNT_STATES = tuple(f"{s}_{k}obj" for k in OBJECT_COUNTS for s in ("exact", "images"))


class CaptionAccuracy(Metric):
    """Accuracy of generated compositional scenes against their prompts, from parsed attributes.

    Each image is described by a ``(9, 3)`` tensor: for each cell of the row-major 3×3 grid the
    (shape, color, size) indices of its object, or -1 three times for an empty cell. ``update``
    compares the attributes parsed from the images with the wanted ones. ``compute`` returns:

    * ``exact``: share of images whose 9 parsed cells all equal the wanted ones;
    * ``cell``: share of wanted objects whose cell holds some parsed object;
    * ``shape`` / ``color`` / ``size``: share of wanted objects whose cell holds an object with
      that attribute right (a missing object counts as wrong);
    * ``extra``: mean number, per image, of parsed objects in cells the prompt leaves empty;
    * ``exact_1obj`` / ``exact_2obj``: ``exact`` over the prompts with one / with two objects
      only (they behave very differently: attribute binding is the hard part), present when the
      batch had such prompts.

    The per-object shares are NaN if no prompt asked for any object. All states are sums.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        names = ("exact", "images", "objects", "cell", *ATTRIBUTES, "extra", *BY_COUNT_STATES)
        for name in names:
            self.add_state(name, torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, parsed: torch.Tensor, wanted: torch.Tensor) -> None:
        """Add a batch: ``parsed`` from the images, ``wanted`` from the prompts, both ``(B, 9, 3)``."""
        check_cells(parsed, "parsed")
        check_cells(wanted, "wanted")
        if len(parsed) != len(wanted):
            raise ValueError(f"{len(parsed)} parsed images for {len(wanted)} prompts")
        wanted_object = wanted[..., 0] != EMPTY  # (B, 9)
        parsed_object = parsed[..., 0] != EMPTY
        exact = (parsed == wanted).flatten(1).all(dim=1)  # (B,)
        self.exact += exact.sum()
        self.images += len(parsed)
        count = wanted_object.sum(dim=1)  # objects asked for, per image
        for k in OBJECT_COUNTS:
            setattr(self, f"images_{k}obj", getattr(self, f"images_{k}obj") + (count == k).sum())
            setattr(self, f"exact_{k}obj", getattr(self, f"exact_{k}obj") + exact[count == k].sum())
        self.objects += wanted_object.sum()
        self.cell += (parsed_object & wanted_object).sum()
        for i, attribute in enumerate(ATTRIBUTES):
            right = (parsed[..., i] == wanted[..., i]) & wanted_object
            setattr(self, attribute, getattr(self, attribute) + right.sum())
        self.extra += (parsed_object & ~wanted_object).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"exact", "cell", "shape", "color", "size", "extra"}`` as float64 scalars."""
        if self.images == 0:
            raise ValueError("CaptionAccuracy has no images: call update() before compute()")
        objects, images = self.objects.double(), self.images.double()
        result = {
            "exact": self.exact / images,
            "cell": self.cell / objects,
            "shape": self.shape / objects,
            "color": self.color / objects,
            "size": self.size / objects,
            "extra": self.extra / images,
        }
        for k in OBJECT_COUNTS:  # synced sums: every rank agrees on which groups exist
            group = getattr(self, f"images_{k}obj")
            if group > 0:
                result[f"exact_{k}obj"] = getattr(self, f"exact_{k}obj") / group.double()
        return result
