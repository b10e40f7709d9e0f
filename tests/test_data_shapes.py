"""The embedded shapes dataset: contract, determinism, splits, captions, rendering."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from genlab.data.checks import check_batch
from genlab.data.shapes import (
    CELLS,
    COLORS,
    SHAPES,
    SIZES,
    TEMPLATES,
    ShapeObject,
    ShapesDataModule,
    ShapesDataset,
    caption_scene,
    draw_scene,
    held_out_pairs,
    parse_caption,
    render_scene,
    scene_attributes,
)

SMALL = {"train_size": 200, "val_size": 64, "test_size": 64, "compositional_size": 200}


def make(**kwargs) -> ShapesDataModule:
    """A small shapes DataModule, set up."""
    dm = ShapesDataModule(**{**SMALL, "batch_size": 16, **kwargs})
    dm.setup("fit")
    return dm


def pairs_of(dataset: ShapesDataset, count: int) -> list[set[tuple[str, str]]]:
    """The (shape, color) pairs of the first ``count`` scenes of ``dataset``."""
    return [{(o.shape, o.color) for o in dataset.scene(i)[0]} for i in range(count)]


def test_batch_follows_the_contract_and_carries_attributes():
    dm = make(max_objects=3)
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, channels=3, resolution=32, captions=True, labels=False)
    assert batch["attributes"].shape == (16, 3, 4) and batch["attributes"].dtype == torch.long
    assert batch["num_objects"].min() >= 1 and batch["num_objects"].max() <= 3
    padded = torch.arange(3)[None, :] >= batch["num_objects"][:, None]  # (B, 3)
    assert torch.all((batch["attributes"] == -1).all(-1) == padded)
    assert dm.channels == 3 and dm.num_classes is None and dm.class_names is None


def test_check_batch_rejects_a_broken_batch():
    good = {"image": torch.zeros(2, 3, 8, 8), "index": torch.arange(2), "caption": ["a", "b"]}
    check_batch(good, channels=3, resolution=8, captions=True, labels=False)
    broken = [
        {**good, "image": torch.full((2, 3, 8, 8), 1.5)},
        {**good, "image": torch.zeros(2, 1, 8, 8)},
        {**good, "index": torch.arange(2).int()},
        {**good, "caption": ["a"]},
        {**good, "label": torch.zeros(2, dtype=torch.long)},
    ]
    for batch in broken:
        with pytest.raises(ValueError, match="data contract"):
            check_batch(batch, channels=3, resolution=8, captions=True, labels=False)


def test_items_are_deterministic_across_instances():
    first = make(max_objects=2).data_train
    second = ShapesDataset("train", size=10, max_objects=2)
    for i in (0, 7):
        a, b = first[i], second[i]
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
        assert torch.equal(a["attributes"], b["attributes"])


def test_splits_and_seeds_differ():
    captions = {
        split: [ShapesDataset(split, max_objects=2)[i]["caption"] for i in range(20)]
        for split in ("train", "val", "test")
    }
    other_seed = [ShapesDataset("train", seed=1, max_objects=2)[i]["caption"] for i in range(20)]
    for a, b in itertools.combinations([*captions.values(), other_seed], 2):
        assert sum(x == y for x, y in zip(a, b)) <= 2


def test_held_out_pairs_are_the_documented_ones():
    held = held_out_pairs(["circle", "square", "triangle"], list(COLORS)[:6])
    assert held == [
        ("circle", "green"),
        ("square", "yellow"),
        ("triangle", "red"),
        ("triangle", "cyan"),
    ]
    every = list(itertools.product(SHAPES, COLORS))
    assert 0.15 < len(held_out_pairs(SHAPES, list(COLORS))) / len(every) < 0.25


def test_compositional_split_holds_out_pairs_from_every_other_split():
    dm = make(max_objects=2, test_split="compositional")
    held = set(dm.held_out_pairs())
    for split in ("train", "val", "test"):
        assert all(not pairs & held for pairs in pairs_of(dm.split(split), 200)), split
    compositional = pairs_of(dm.data_test, 200)
    assert all(pairs & held for pairs in compositional)
    assert set().union(*compositional) >= held  # every held-out pair shows up
    assert dm.data_test.split == "compositional"


def test_captions_state_every_attribute_and_match_the_labels():
    dataset = ShapesDataset("train", max_objects=3)
    for i in range(100):
        item, (scene, _) = dataset[i], dataset.scene(i)
        assert item["caption"].count(" and ") == len(scene) - 1
        parsed = parse_caption(item["caption"])
        assert [(o.shape, o.color, o.size, o.cell) for o in parsed] == [
            (o.shape, o.color, o.size, o.cell) for o in scene
        ]
        assert np.array_equal(item["attributes"].numpy(), scene_attributes(parsed, 3))


def test_every_template_names_every_attribute():
    obj = ShapeObject("triangle", "orange", "small", 6)
    assert [caption_scene((obj,), template=t) for t in range(len(TEMPLATES))] == [
        "a small orange triangle at the bottom left",
        "an orange triangle, small, at the bottom left",
        "bottom left: a small orange triangle",
        "a small triangle in orange at the bottom left",
    ]
    captions = [caption_scene((obj, obj), template=t) for t in range(len(TEMPLATES))]
    for caption in captions:
        assert all(word in caption for word in ("triangle", "orange", "small", "bottom left"))
        assert parse_caption(caption) == (obj, obj)
    assert caption_scene((ShapeObject("circle", "orange", "large", 4),), 1).startswith("an orange")


def test_parse_caption_rejects_vague_phrases():
    for bad in ("a red circle at the top", "a large circle at the top", "a large red circle"):
        with pytest.raises(ValueError, match="object phrase"):
            parse_caption(bad)


def test_rendering_is_anti_aliased_and_stays_in_its_cell():
    for shape, size, cell in itertools.product(SHAPES, SIZES, (0, 4, 8)):
        for offset in ((1, 1), (-1, -1)):  # the largest jitter, both ways
            room = (1 - SIZES[size]) / 2
            obj = ShapeObject(shape, "white", size, cell, (offset[0] * room, offset[1] * room))
            image = render_scene((obj,), 32)[..., 0].astype(int)  # white: all channels alike
            rows, cols = (
                slice(math.floor(k * 32 / 3), math.ceil((k + 1) * 32 / 3)) for k in divmod(cell, 3)
            )
            inside = np.zeros_like(image, dtype=bool)
            inside[rows, cols] = True
            assert image[~inside].max() == 0, (shape, size, cell, offset)
            values = set(np.unique(image).tolist())
            assert len(values - {0, COLORS["white"][0]}) >= 2, "no intermediate values"


def test_rendered_areas_match_the_geometry():
    cell = 64 / 3
    expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9}
    for shape, fraction in expected.items():
        image = render_scene((ShapeObject(shape, "white", "large", 4),), 64)[..., 0]
        area = image.sum() / COLORS["white"][0]
        assert area == pytest.approx(fraction * (0.8 * cell) ** 2, rel=0.06), shape


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_resolutions_keep_sizes_distinguishable(resolution):
    dm = make(resolution=resolution)
    assert dm.data_val[0]["image"].shape == (3, resolution, resolution)
    scenes = {size: (ShapeObject("circle", "white", size, 4),) for size in SIZES}
    areas = {size: render_scene(scene, resolution)[..., 0].sum() for size, scene in scenes.items()}
    assert areas["large"] > 2.5 * areas["small"] > 0


def test_draw_scene_uses_distinct_cells_and_the_given_pairs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = draw_scene(rng, [("square", "red")], min_objects=9, max_objects=9)
        assert sorted(o.cell for o in scene) == list(range(len(CELLS)))
        assert {(o.shape, o.color) for o in scene} == {("square", "red")}


def test_train_captions_and_sample_prompts_work_before_setup():
    dm = ShapesDataModule(**SMALL, max_objects=2)
    captions = dm.train_captions()
    assert len(captions) == 200 and captions[:3] == [
        dm.split("train")[i]["caption"] for i in range(3)
    ]
    prompts = dm.sample_prompts(8)
    assert prompts == ShapesDataModule(**SMALL, max_objects=2).sample_prompts(8)
    val = dm.split("val")
    assert prompts == [caption_scene(val.scene(i)[0], template=0) for i in range(8)]
    assert all(p.startswith(("a ", "an ")) for p in prompts)


def test_describe_is_json_and_names_the_config():
    description = make(max_objects=2).describe()
    assert json.loads(json.dumps(description)) == description
    assert description["dataset"] == "shapes" and description["max_objects"] == 2
    assert "batch_size" not in description


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"resolution": 48}, "resolution"),
        ({"shapes": ["hexagon"]}, "shapes"),
        ({"colors": ["red", "red"]}, "colors"),
        ({"max_objects": 10}, "max_objects"),
        ({"min_objects": 2, "max_objects": 1}, "max_objects"),
        ({"jitter": 1.5}, "jitter"),
        ({"test_split": "val"}, "test_split"),
        ({"train_size": 0}, "train_size"),
        ({"batch_size": 0}, "batch_size"),
        ({"shapes": ["square"], "colors": ["blue", "yellow"]}, "hold_out"),
        ({"hold_out": False, "test_split": "compositional"}, "test_split"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}="):
        ShapesDataModule(**kwargs)
