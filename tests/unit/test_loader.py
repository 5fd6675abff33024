"""The in-memory batch loaders: seeded order, resume position, global batches, eval shards."""

from __future__ import annotations

import pytest
import torch

from capsnet.data.loader import EvalBatches, TrainBatches


def _indices(loader) -> list[list[int]]:
    return [batch[-1].tolist() for batch in loader]


def test_order_is_seeded_per_epoch_and_uses_full_batches_only() -> None:
    data = (torch.arange(10) * 10, torch.arange(10))
    epoch = {"now": 0}
    loader = TrainBatches(data, batch_size=4, seed=3, position=lambda: (epoch["now"], 0))
    first = _indices(loader)
    assert len(loader) == 2 and [len(b) for b in first] == [4, 4]  # 10 // 4: the partial batch is dropped
    assert len({i for batch in first for i in batch}) == 8
    assert _indices(loader) == first  # same epoch, same order
    epoch["now"] = 1
    assert _indices(loader) != first
    values, labels, idx = next(iter(loader))
    assert torch.equal(values, idx * 10) and torch.equal(labels, idx)


def test_position_resumes_at_the_first_untrained_batch() -> None:
    data = (torch.arange(20),)
    full = _indices(TrainBatches(data, batch_size=3, seed=0, position=lambda: (2, 0)))
    resumed = _indices(TrainBatches(data, batch_size=3, seed=0, position=lambda: (2, 4)))
    assert resumed == full[4:]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_each_global_batch_of_the_single_process_order(world: int) -> None:
    data = (torch.arange(50),)
    single = _indices(TrainBatches(data, batch_size=12, seed=1, position=lambda: (3, 0)))
    ranks = [
        _indices(TrainBatches(data, batch_size=12, seed=1, position=lambda: (3, 0), rank=r, world_size=world))
        for r in range(world)
    ]
    assert all(len(r) == len(single) == 4 for r in ranks)  # same number of steps as one process
    for step, batch in enumerate(single):
        parts = [r[step] for r in ranks]
        assert all(len(p) == 12 // world for p in parts)
        assert [i for part in parts for i in part] == batch  # together: exactly the same examples


def test_a_global_batch_the_world_does_not_divide_is_refused() -> None:
    with pytest.raises(AssertionError, match="multiple of the world size 3"):
        TrainBatches((torch.arange(50),), batch_size=128, world_size=3)


@pytest.mark.parametrize(("total", "world", "batch"), [(10, 3, 2), (10_000, 3, 500), (7, 4, 3), (5, 1, 5)])
def test_eval_shards_count_every_example_exactly_once(total: int, world: int, batch: int) -> None:
    data = (torch.arange(total) * 2,)
    seen = []
    for rank in range(world):
        loader = EvalBatches(data, batch_size=batch, rank=rank, world_size=world)
        batches = list(loader)
        assert len(batches) == len(loader)
        for values, idx in batches:
            assert torch.equal(values, idx * 2) and len(idx) <= batch
            seen += idx.tolist()
    assert sorted(seen) == list(range(total))
