"""The in-memory batch loader: seeded order, resume position, rank shards."""

from __future__ import annotations

import torch

from capsnet.data.loader import TensorBatches


def _indices(loader: TensorBatches) -> list[list[int]]:
    return [batch[-1].tolist() for batch in loader]


def test_order_is_seeded_per_epoch_and_covers_everything() -> None:
    data = (torch.arange(10) * 10, torch.arange(10))
    epoch = {"now": 0}
    loader = TensorBatches(data, batch_size=4, shuffle=True, seed=3, position=lambda: (epoch["now"], 0))
    first = _indices(loader)
    assert len(loader) == 3 and [len(b) for b in first] == [4, 4, 2]
    assert sorted(sum(first, [])) == list(range(10))
    assert _indices(loader) == first  # same epoch, same order
    epoch["now"] = 1
    assert _indices(loader) != first
    values, labels, idx = next(iter(loader))
    assert torch.equal(values, idx * 10) and torch.equal(labels, idx)


def test_position_resumes_at_the_first_untrained_batch() -> None:
    data = (torch.arange(20),)
    full = _indices(TensorBatches(data, batch_size=3, shuffle=True, seed=0, position=lambda: (2, 0)))
    resumed = _indices(TensorBatches(data, batch_size=3, shuffle=True, seed=0, position=lambda: (2, 4)))
    assert resumed == full[4:]


def test_ranks_take_disjoint_shards() -> None:
    data = (torch.arange(11),)
    shards = [
        set(sum(_indices(TensorBatches(data, batch_size=2, shuffle=True, seed=1, rank=r, world_size=2)), []))
        for r in (0, 1)
    ]
    assert not shards[0] & shards[1]
    assert len(shards[0]) == len(shards[1]) == 5
