"""The embedded ``shapes`` dataset: coloured shapes on a 3x3 grid, with captions, drawn on the fly.

An image (16, 32 or 64 px, RGB, black background) holds ``min_objects..max_objects`` objects in
distinct cells of a 3x3 grid. Each object has a shape, a colour from a named palette, a size
(``small`` or ``large``: 0.45 or 0.8 of a cell side) and a cell; a small jitter moves it inside
its cell, never across. Item ``i`` of a split is drawn from ``numpy.random.default_rng([seed,
split_id, i])``: deterministic, and the same in any worker or process.

Captions say every attribute of every object, in one of :data:`TEMPLATES` (objects joined with
" and "); :func:`parse_caption` inverts all of them. Each item carries its attribute labels,
``attributes`` ``(max_objects, 4)`` = (shape, color, size, cell) indices into :data:`SHAPES`,
:data:`COLORS`, :data:`SIZES`, :data:`CELLS` (padding -1), and ``num_objects``; the indices
refer to these fixed tables, whatever subset a config uses. :func:`cell_attributes` (of a scene),
:func:`cells_from_attributes` (of a batch) and :func:`caption_cells` (of a caption) give the same
labels per cell of the grid, ``(9, 3)``, the format in which the shapes oracle parses images.

Held-out pairs: the (shape, color) pair with table indices (i, j) is held out iff
``(j - 2 * i) % 5 == 1`` (:func:`held_out_pairs`), about 1/5 of the pairs, spread over shapes
and colours. With the default three shapes and six colours these are the green circle, the
yellow square, the red triangle and the cyan triangle. The ``train``, ``val`` and ``test`` splits
never show them; every item of the ``compositional`` split shows at least one of them.

Rendering: PIL draws the scene at 4x and ``Image.reduce(4)`` box-filters it down, i.e. each
pixel is the coverage of 16 sub-samples (28 us per 32 px image here, against 54 us for an
equivalent numpy coverage mask).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from genlab.data.checks import check_arg, check_choice
from genlab.data.datamodule import GenDataModule

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 220),
    "cyan": (40, 220, 230),
    "white": (240, 240, 240),
    "orange": (250, 140, 20),
    "pink": (250, 120, 190),
}
COLOR_NAMES = tuple(COLORS)
SIZES = {"small": 0.45, "large": 0.8}  # side (or diameter) as a fraction of a cell side
SIZE_NAMES = tuple(SIZES)
CELLS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)  # row-major: cell = 3 * row + col
LOCATIONS = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)
# One object phrase per template; fields: size, color, shape, cell (its name), location.
TEMPLATES = (
    "a {size} {color} {shape} {location}",  # a large red circle at the top left
    "a {color} {shape}, {size}, {location}",  # a red circle, large, at the top left
    "{cell}: a {size} {color} {shape}",  # top left: a large red circle
    "a {size} {shape} in {color} {location}",  # a large circle in red at the top left
)
SPLITS = {"train": 0, "val": 1, "test": 2, "compositional": 3}
DEFAULT_SHAPES = ("circle", "square", "triangle")
DEFAULT_COLORS = ("red", "green", "blue", "yellow", "purple", "cyan")
RESOLUTIONS = (16, 32, 64)
SUPERSAMPLE = 4
BACKGROUND = (0, 0, 0)
# Unit polygons (x, y) around the centre, y pointing down, inscribed in the square [-1, 1]^2.
POLYGONS = {
    "triangle": ((0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)),
    "diamond": ((0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)),
}
CROSS_ARM = 1.0 / 3.0  # half-width of a cross arm, as a fraction of the half-extent


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene; ``offset`` is its (dx, dy) from the cell centre in cell sides."""

    shape: str
    color: str
    size: str
    cell: int
    offset: tuple[float, float] = (0.0, 0.0)


Scene = tuple[ShapeObject, ...]


def held_out_pairs(shapes: Sequence[str], colors: Sequence[str]) -> list[tuple[str, str]]:
    """The held-out (shape, color) pairs among ``shapes x colors``: ``(j - 2i) % 5 == 1``."""
    return [
        (s, c)
        for s, c in itertools.product(shapes, colors)
        if (COLOR_NAMES.index(c) - 2 * SHAPES.index(s)) % 5 == 1
    ]


def draw_scene(
    rng: np.random.Generator,
    pairs: Sequence[tuple[str, str]],
    *,
    min_objects: int = 1,
    max_objects: int = 1,
    jitter: float = 0.5,
    required_pairs: Sequence[tuple[str, str]] = (),
) -> Scene:
    """Draw a random scene: objects with (shape, color) from ``pairs`` in distinct cells.

    Args:
        rng: the source of randomness (the only one).
        pairs: the (shape, color) pairs objects may take.
        min_objects: fewest objects.
        max_objects: most objects (at most 9).
        jitter: fraction of the free room of its cell by which an object may move off-centre.
        required_pairs: if given, one object (at a random position in the scene) takes its pair
            from these instead.
    """
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.permutation(len(CELLS))[:n].tolist()  # distinct cells
    chosen = [pairs[k] for k in rng.integers(len(pairs), size=n)]
    if required_pairs:
        chosen[int(rng.integers(n))] = required_pairs[int(rng.integers(len(required_pairs)))]
    sizes = [SIZE_NAMES[k] for k in rng.integers(len(SIZE_NAMES), size=n)]
    shifts = (rng.random((n, 2)) * 2 - 1).tolist()  # (n, 2) in [-1, 1)
    objects = []
    for (shape, color), size, cell, shift in zip(chosen, sizes, cells, shifts):
        objects.append(ShapeObject(shape, color, size, cell, offset_of(size, shift, jitter)))
    return tuple(objects)


def offset_of(size: str, shift: Sequence[float], jitter: float) -> tuple[float, float]:
    """An object's offset from its cell centre, in cell sides, for a ``shift`` in [-1, 1)²: the
    fraction ``jitter`` of the room its size leaves, so the object stays in its cell."""
    room = jitter * (1.0 - SIZES[size]) / 2
    return (shift[0] * room, shift[1] * room)


def redraw_scene(scene: Scene, rng: np.random.Generator, jitter: float) -> Scene:
    """The same objects (shape, colour, size, cell) with fresh offsets: the scene its caption
    describes, drawn again."""
    shifts = (rng.random((len(scene), 2)) * 2 - 1).tolist()
    return tuple(
        dataclasses.replace(o, offset=offset_of(o.size, shift, jitter))
        for o, shift in zip(scene, shifts)
    )


def render_scene(scene: Scene, resolution: int = 32) -> np.ndarray:
    """Render ``scene`` anti-aliased: uint8 ``(resolution, resolution, 3)``.

    Drawn at ``SUPERSAMPLE`` times the resolution, then box-filtered down: each pixel holds the
    coverage of its sub-samples.
    """
    canvas = Image.new("RGB", (resolution * SUPERSAMPLE,) * 2, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    cell_side = resolution * SUPERSAMPLE / 3
    for obj in scene:
        row, col = divmod(obj.cell, 3)
        cx = (col + 0.5 + obj.offset[0]) * cell_side
        cy = (row + 0.5 + obj.offset[1]) * cell_side
        draw_object(draw, obj.shape, cx, cy, SIZES[obj.size] * cell_side / 2, COLORS[obj.color])
    return np.array(canvas.reduce(SUPERSAMPLE))


def draw_object(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, rgb: tuple
) -> None:
    """Fill one shape of half-extent ``half`` centred at ``(cx, cy)`` (continuous coordinates).

    Sub-sample ``k`` covers ``[k, k+1)``; PIL fills whole sub-samples with inclusive bounds, so
    boxes end one sub-sample early and polygons shrink by half a sub-sample, which keeps areas
    and centres exact to a fraction of a sub-sample.
    """
    if shape == "circle":
        draw.ellipse(inclusive_box(cx, cy, half, half), fill=rgb)
    elif shape == "square":
        draw.rectangle(inclusive_box(cx, cy, half, half), fill=rgb)
    elif shape == "cross":
        draw.rectangle(inclusive_box(cx, cy, half, half * CROSS_ARM), fill=rgb)
        draw.rectangle(inclusive_box(cx, cy, half * CROSS_ARM, half), fill=rgb)
    else:
        reach = half - 0.5
        points = [
            (round(cx - 0.5 + reach * x), round(cy - 0.5 + reach * y)) for x, y in POLYGONS[shape]
        ]
        draw.polygon(points, fill=rgb)


def inclusive_box(cx: float, cy: float, half_x: float, half_y: float) -> list[int]:
    """PIL's inclusive pixel box for the continuous box ``[cx - half_x, cx + half_x)`` etc."""
    return [
        round(cx - half_x),
        round(cy - half_y),
        round(cx + half_x) - 1,
        round(cy + half_y) - 1,
    ]


def caption_scene(scene: Scene, template: int = 0) -> str:
    """Describe every object of ``scene`` with ``TEMPLATES[template]``, joined with " and "."""
    return " and ".join(describe_object(obj, template) for obj in scene)


def describe_object(obj: ShapeObject, template: int = 0) -> str:
    """One object in words, e.g. ``a large red circle at the top left`` (template 0)."""
    fields = {
        "size": obj.size,
        "color": obj.color,
        "shape": obj.shape,
        "cell": CELLS[obj.cell],
        "location": LOCATIONS[obj.cell],
    }
    return re.sub(r"\ba (?=[aeiou])", "an ", TEMPLATES[template].format(**fields))


def parse_caption(caption: str) -> Scene:
    """Read a scene back from a caption in any of ``TEMPLATES`` (offsets are zero).

    Raises:
        ValueError: if an object phrase does not name exactly one shape, colour, size and cell.
    """
    return tuple(parse_object(phrase) for phrase in caption.strip().lower().split(" and "))


def parse_object(phrase: str) -> ShapeObject:
    """Read one object phrase: its shape, colour and size words and its cell words."""
    words = re.findall(r"[a-z]+", phrase)
    found = {}
    for name, vocabulary in (("shape", SHAPES), ("color", COLORS), ("size", SIZES)):
        hits = [w for w in words if w in vocabulary]
        if len(hits) != 1:
            raise ValueError(f"object phrase {phrase!r} must name exactly one {name}, got {hits}")
        found[name] = hits[0]
    row = 0 if "top" in words else 2 if "bottom" in words else 1
    col = 0 if "left" in words else 2 if "right" in words else 1
    if (row, col) == (1, 1) and "center" not in words:
        raise ValueError(f"object phrase {phrase!r} names no cell (e.g. 'top left', 'center')")
    return ShapeObject(found["shape"], found["color"], found["size"], 3 * row + col)


def scene_attributes(scene: Scene, max_objects: int) -> np.ndarray:
    """Attribute labels ``(max_objects, 4)``: shape, color, size, cell indices; -1 padding."""
    attributes = np.full((max_objects, 4), -1, dtype=np.int64)
    for k, obj in enumerate(scene):
        attributes[k] = (
            SHAPES.index(obj.shape),
            COLOR_NAMES.index(obj.color),
            SIZE_NAMES.index(obj.size),
            obj.cell,
        )
    return attributes


def cell_attributes(scene: Scene) -> np.ndarray:
    """Per-cell labels ``(9, 3)`` int64, row-major as :data:`CELLS`: the (shape, color, size)
    indices into :data:`SHAPES`, :data:`COLOR_NAMES`, :data:`SIZE_NAMES`; -1 for an empty cell.

    The format of the shapes oracle's ``parse`` (``genlab.models.evaluators.shapes_oracle``).

    Raises:
        ValueError: if two objects share a cell (no scene of the dataset does).
    """
    cells = np.full((len(CELLS), 3), -1, dtype=np.int64)
    for obj in scene:
        if cells[obj.cell, 0] >= 0:
            raise ValueError(f"two objects {CELLS[obj.cell]!r}: a cell holds at most one")
        cells[obj.cell] = (
            SHAPES.index(obj.shape),
            COLOR_NAMES.index(obj.color),
            SIZE_NAMES.index(obj.size),
        )
    return cells


def caption_cells(caption: str) -> np.ndarray:
    """The per-cell labels ``(9, 3)`` that ``caption`` describes: ``cell_attributes`` of its
    parsed scene.

    Raises:
        ValueError: if the caption does not parse (see :func:`parse_caption`).
    """
    return cell_attributes(parse_caption(caption))


def cells_from_attributes(attributes: torch.Tensor) -> torch.Tensor:
    """Batched :func:`cell_attributes` from the items' ``attributes``.

    Args:
        attributes: ``(B, max_objects, 4)`` long rows of (shape, color, size, cell), -1 padding.

    Returns:
        ``(B, 9, 3)`` long: per cell the (shape, color, size) of its object, -1 if empty.
    """
    b = attributes.shape[0]
    cells = attributes.new_full((b, len(CELLS) + 1, 3), -1)  # a spare cell takes the padding
    cell = attributes[..., 3].clone()  # (B, max_objects)
    cell[cell < 0] = len(CELLS)
    rows = torch.arange(b, device=attributes.device)[:, None].expand_as(cell)
    cells[rows, cell] = attributes[..., :3]  # padding rows write -1 into the spare cell
    return cells[:, : len(CELLS)]  # (B, 9, 3)


LABELS = (None, "shape", "color", "shape_color")


def label_names(
    label: str | None, shapes: Sequence[str], colors: Sequence[str]
) -> list[str] | None:
    """The class names of a scene label: the shapes, the colours or every (colour, shape)."""
    if label is None:
        return None
    if label == "shape":
        return list(shapes)
    if label == "color":
        return list(colors)
    return [f"{color} {shape}" for shape in shapes for color in colors]


def scene_label(scene: Scene, label: str, names: list[str]) -> int:
    """The class of a scene: its first object's shape, colour or both (index into ``names``)."""
    first = scene[0]
    name = {"shape": first.shape, "color": first.color}.get(label, f"{first.color} {first.shape}")
    return names.index(name)


class ShapesDataset(Dataset):
    """One split of the shapes dataset; item ``i`` is drawn and rendered on access.

    Items: ``image`` ``(3, H, W)`` in ``[-1, 1]``, ``caption``, ``index``, ``attributes``
    ``(max_objects, 4)`` and ``num_objects``. Every scene of the ``compositional`` split shows at
    least one held-out pair; the other splits never show one. ``redraw`` k > 0: each item's
    objects again, with fresh offsets from ``default_rng([seed, split_id, i, k])`` — another
    image its caption describes (what a perfect text-to-image model would draw). ``label``
    (``shape`` | ``color`` | ``shape_color``) adds ``label``: a class derived from the scene, its
    first object's shape, colour or both (for label-conditional models; ``class_names``).
    """

    def __init__(
        self,
        split: str = "train",
        *,
        size: int = 20000,
        seed: int = 0,
        resolution: int = 32,
        shapes: Sequence[str] = DEFAULT_SHAPES,
        colors: Sequence[str] = DEFAULT_COLORS,
        min_objects: int = 1,
        max_objects: int = 2,
        jitter: float = 0.5,
        hold_out: bool = True,
        redraw: int = 0,
        label: str | None = None,
    ) -> None:
        check_choice("split", split, list(SPLITS))
        check_choice("label", label, LABELS)
        held = held_out_pairs(shapes, colors) if hold_out else []
        if split == "compositional" and not held:
            raise ValueError(
                f"split='compositional' needs held-out pairs; {shapes=} {colors=} have none"
            )
        everything = list(itertools.product(shapes, colors))
        if split == "compositional":
            self.pairs, self.required_pairs = everything, held
        else:
            self.pairs, self.required_pairs = [p for p in everything if p not in held], []
        self.split = split
        self.size = size
        self.seed = seed
        self.resolution = resolution
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.jitter = jitter
        self.redraw = redraw
        self.label = label
        self.class_names = label_names(label, shapes, colors)

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> tuple[Scene, int]:
        """The scene of item ``index`` and the caption template it uses."""
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        scene = draw_scene(
            rng,
            self.pairs,
            min_objects=self.min_objects,
            max_objects=self.max_objects,
            jitter=self.jitter,
            required_pairs=self.required_pairs,
        )
        template = int(rng.integers(len(TEMPLATES)))
        if self.redraw:  # the same objects, offsets from a stream of their own
            redraw_rng = np.random.default_rng([self.seed, SPLITS[self.split], index, self.redraw])
            scene = redraw_scene(scene, redraw_rng, self.jitter)
        return scene, template

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene, template = self.scene(index)
        pixels = torch.from_numpy(render_scene(scene, self.resolution))  # (H, W, 3) uint8
        return {
            "image": pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0),  # (3, H, W)
            "caption": caption_scene(scene, template),
            "index": index,
            "attributes": torch.from_numpy(scene_attributes(scene, self.max_objects)),
            "num_objects": len(scene),
        } | (
            {}
            if self.label is None
            else {"label": scene_label(scene, self.label, self.class_names)}
        )


class ShapesDataModule(GenDataModule):
    """Shapes on a 3x3 grid with captions (the embedded default dataset); no files needed.

    ``test_split`` picks what the test loader reads: ``"test"``, or ``"compositional"`` for the
    held-out (shape, color) pairs. ``data_dir`` is accepted for a uniform interface and unused.
    """

    name = "shapes"

    def __init__(
        self,
        *,
        data_dir: str = "data/",
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        resolution: int = 32,
        seed: int = 0,
        shapes: Sequence[str] = DEFAULT_SHAPES,
        colors: Sequence[str] = DEFAULT_COLORS,
        min_objects: int = 1,
        max_objects: int = 2,
        jitter: float = 0.5,
        hold_out: bool = True,
        train_size: int = 20000,
        val_size: int = 512,
        test_size: int = 1024,
        compositional_size: int = 1024,
        test_split: Literal["test", "compositional"] = "test",
        label: str | None = None,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            resolution=resolution,
            seed=seed,
        )
        self.save_hyperparameters(logger=False)
        check_choice("resolution", resolution, RESOLUTIONS)
        check_vocabulary("shapes", shapes, SHAPES)
        check_vocabulary("colors", colors, COLOR_NAMES)
        check_arg(1 <= min_objects <= 9, "min_objects", min_objects, "an int in [1, 9]")
        check_arg(
            min_objects <= max_objects <= 9,
            "max_objects",
            max_objects,
            "an int in [min_objects, 9]",
        )
        check_arg(0.0 <= jitter <= 1.0, "jitter", jitter, "a float in [0, 1]")
        check_choice("test_split", test_split, ("test", "compositional"))
        if hold_out:
            check_held_out(list(shapes), list(colors))
        else:
            check_arg(test_split == "test", "test_split", test_split, "'test' when hold_out=false")
        self.sizes = {
            "train": train_size,
            "val": val_size,
            "test": test_size,
            "compositional": compositional_size,
        }
        for split, size in self.sizes.items():
            check_arg(size >= 1, f"{split}_size", size, "an int >= 1")
        self.shapes = list(shapes)
        self.colors = list(colors)
        self.min_objects = min_objects
        self.max_objects = max_objects
        self.jitter = jitter
        self.hold_out = hold_out
        self.test_split = test_split
        check_choice("label", label, LABELS)
        self.label = label
        self.class_names = label_names(label, shapes, colors)
        self.num_classes = None if label is None else len(self.class_names)

    def split(self, name: str, *, redraw: int = 0) -> ShapesDataset:
        """The dataset of split ``name``: ``train``, ``val``, ``test`` or ``compositional``;
        ``redraw`` k > 0: its scenes drawn again (:class:`ShapesDataset`)."""
        return ShapesDataset(
            name,
            size=self.sizes[name],
            seed=self.seed,
            resolution=self.resolution,
            shapes=self.shapes,
            colors=self.colors,
            min_objects=self.min_objects,
            max_objects=self.max_objects,
            jitter=self.jitter,
            hold_out=self.hold_out,
            redraw=redraw,
            label=self.label,
        )

    def redrawn(self, name: str) -> ShapesDataset:
        """The scenes of split ``name`` drawn again: for each item the objects its caption names,
        at fresh offsets. Measured against the split itself, this is the floor of a text model
        prompted with the split's captions (``real_split=redrawn``)."""
        return self.split(name, redraw=1)

    def setup(self, stage: str | None = None) -> None:
        """Build the splits (items are drawn lazily, so this is instant)."""
        self.data_train = self.split("train")
        self.data_val = self.split("val")
        self.data_test = self.split(self.test_split)

    def train_captions(self) -> list[str]:
        """The caption of every training item (scenes are drawn, not rendered)."""
        dataset = self.split("train")
        return [caption_scene(*dataset.scene(i)) for i in range(len(dataset))]

    def sample_prompts(self, n: int) -> list[str]:
        """Captions of the first ``n`` val scenes, in the canonical template 0."""
        dataset = self.split("val")
        return [caption_scene(dataset.scene(i)[0], template=0) for i in range(n)]

    def held_out_pairs(self) -> list[tuple[str, str]]:
        """The (shape, color) pairs that only the compositional split shows."""
        return held_out_pairs(self.shapes, self.colors) if self.hold_out else []


def check_vocabulary(name: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    """Check a non-empty list of distinct names from a fixed table."""
    ok = bool(values) and len(set(values)) == len(values) and set(values) <= set(allowed)
    check_arg(ok, name, values, f"a non-empty list of distinct names from {list(allowed)}")


def check_held_out(shapes: list[str], colors: list[str]) -> None:
    """Check that some pairs are held out and that every shape and colour stays in training."""
    held = held_out_pairs(shapes, colors)
    seen = [p for p in itertools.product(shapes, colors) if p not in held]
    unseen = (set(shapes) - {s for s, _ in seen}) | (set(colors) - {c for _, c in seen})
    allowed = "shapes and colors that hold out some pairs, or hold_out=false"
    check_arg(bool(held), "hold_out", True, f"{allowed} ({shapes} x {colors} hold out none)")
    check_arg(
        not unseen,
        "hold_out",
        True,
        f"{allowed}: holding out {held} removes {sorted(unseen)} from training",
    )
