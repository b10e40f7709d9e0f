"""The pieces of exact resume, one by one: the sampler's order, shards and skip; items seeded by
(epoch, index); the loader's saved position; per-rank, per-step seeds."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from conftest import shapes_data
from genlab.callbacks.step_seeds import StepSeeds
from genlab.data.arrays import InMemoryImages
from genlab.data.resumable import ResumableLoader, ResumableSampler, SeededItems

DATA = list(range(40))


def test_sampler_order_depends_on_seed_and_epoch_only() -> None:
    a, b = ResumableSampler(DATA, seed=3), ResumableSampler(DATA, seed=3)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(1)  # the global generator plays no part
    assert list(b) == first
    a.set_epoch(1)
    assert list(a) != first
    assert sorted(i for i, _ in first) == DATA
    assert {e for _, e in first} == {0}


def test_sampler_shards_are_disjoint_and_cover_the_epoch() -> None:
    shards = [ResumableSampler(DATA, num_replicas=2, rank=r, seed=0) for r in (0, 1)]
    keys = [[i for i, _ in s] for s in shards]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == DATA
    whole = [i for i, _ in ResumableSampler(DATA, seed=0)]
    assert keys[0] == whole[0::2] and keys[1] == whole[1::2]


def test_sampler_resume_skips_once_and_keeps_its_length() -> None:
    sampler = ResumableSampler(DATA, seed=0)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.resume_at(epoch=2, skip=12)
    assert list(sampler) == whole[12:]
    assert len(sampler) == 40
    assert list(sampler) == whole  # only the first iteration resumes
    sampler.resume_at(epoch=5, skip=12)
    assert list(sampler) == whole  # another epoch's position does not apply to this one


def test_seeded_items_flip_by_epoch_and_index_not_by_the_global_generator() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    items = SeededItems(InMemoryImages(images, flip=True), seed=0)
    torch.manual_seed(0)
    first = [items[(i % 2, e)]["image"] for e in range(8) for i in range(2)]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = [items[(i % 2, e)]["image"] for e in range(8) for i in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert torch.equal(torch.get_rng_state(), state)  # the reader's stream is untouched
    flipped = {bool(torch.equal(x, y)) for x, y in zip(first[0::2], first[0::2][1:])}
    assert flipped == {True, False}  # epochs draw different flips of item 0


def test_loader_resumes_after_the_trained_batches() -> None:
    dm = shapes_data(16, train_size=64)
    dm.setup("fit")
    position = {"epoch": 1, "batches": 0}
    loader = dm.train_dataloader()
    loader.progress = lambda: (position["epoch"], position["batches"])
    batches = list(loader)
    assert len(batches) == len(loader) == 8
    position["batches"] = 3
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 3, "batch_size": 8, "world_size": 1, "seed": 0}

    fresh = dm.train_dataloader()
    fresh.progress = lambda: (1, 0)
    fresh.load_state_dict(state)
    rest = list(fresh)
    assert len(rest) == 5
    for a, b in zip(batches[3:], rest):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
        assert a["caption"] == b["caption"]


def test_loader_with_another_batch_size_restarts_the_epoch_with_a_warning(caplog) -> None:
    dm = shapes_data(16, train_size=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, ResumableLoader)
    state = {"epoch": 0, "batches": 3, "batch_size": 4, "world_size": 1, "seed": 0}
    with caplog.at_level(logging.WARNING):
        loader.load_state_dict(state)
    assert "cannot resume exactly" in caplog.text and "batch_size 4 -> 8" in caplog.text
    assert len(list(loader)) == 8


def fake_trainer(rank: int, batch: int) -> SimpleNamespace:
    """The two trainer attributes StepSeeds reads."""
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(total_batch_idx=batch))
    return SimpleNamespace(global_rank=rank, fit_loop=loop, global_step=batch)


def draws(seeds: StepSeeds, rank: int, batch: int) -> torch.Tensor:
    seeds.on_train_batch_start(fake_trainer(rank, batch), None, None, batch)
    return torch.randn(4)


def test_step_seeds_differ_across_ranks_and_steps_and_repeat_exactly() -> None:
    seeds = StepSeeds(42)
    r0, r1 = draws(seeds, 0, 5), draws(seeds, 1, 5)
    assert not torch.equal(r0, r1)  # ranks draw their own noise
    assert not torch.equal(r0, draws(seeds, 0, 6))
    torch.randn(100)  # whatever ran in between (validation, sampling) does not matter
    assert torch.equal(draws(seeds, 0, 5), r0)
    resumed = StepSeeds(7)
    resumed.load_state_dict(seeds.state_dict())  # the checkpoint's seed wins
    assert torch.equal(draws(resumed, 1, 5), r1)
