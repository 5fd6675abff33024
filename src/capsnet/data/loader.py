"""A mini-batch iterator over in-memory tensors that resumes mid-epoch exactly.

MNIST fits in memory many times over, so a per-item Dataset + collate would only burn
CPU.  This loader slices whole batches with one index op.  Its order is a pure function
of (seed, epoch), and it starts each epoch at the batch the trainer has reached, so a run
restarted from a mid-epoch checkpoint sees exactly the batches it had not yet trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

Position = Callable[[], tuple[int, int]]


class TensorBatches:
    """Yields ``(*tensors[idx], idx)`` for consecutive index batches.

    Args:
        tensors: tensors sharing their first dimension.
        batch_size: examples per batch.
        shuffle: reshuffle each epoch (order seeded by ``seed`` and the epoch).
        seed: the order's seed.
        position: returns ``(epoch, first_batch)``; the trainer's progress during fit.
        rank, world_size: each rank takes a disjoint slice of every epoch's order.
    """

    def __init__(
        self,
        tensors: tuple[Tensor, ...],
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        position: Position | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        assert batch_size > 0, f"batch_size must be positive, got {batch_size}"
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.position = position
        self.rank, self.world_size = rank, world_size
        self.num_examples = len(tensors[0]) // world_size if world_size > 1 else len(tensors[0])

    def __len__(self) -> int:
        return (self.num_examples + self.batch_size - 1) // self.batch_size

    def order(self, epoch: int) -> Tensor:
        """The example order of ``epoch`` for this rank."""
        total = len(self.tensors[0])
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(total, generator=generator)
        else:
            order = torch.arange(total)
        if self.world_size > 1:
            order = order[self.rank : self.num_examples * self.world_size : self.world_size]
        return order

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        epoch, start = self.position() if self.position is not None else (0, 0)
        order = self.order(epoch)
        for batch in range(max(start, 0), len(self)):
            idx = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield (*(t[idx] for t in self.tensors), idx)
