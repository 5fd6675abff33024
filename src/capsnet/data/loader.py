"""Mini-batch iterators over in-memory tensors: exact mid-epoch resume, global batches under DDP.

MNIST fits in device memory many times over, so a per-item Dataset + collate would only
burn CPU and copy every batch from the host.  These loaders slice whole batches out of
tensors that already live on the training device, with one index op.

Training (:class:`TrainBatches`): ``batch_size`` is the *global* batch.  Epoch e's order is
a pure function of (seed, e); global batch b is ``order[b*G:(b+1)*G]`` whatever the world
size, and rank r takes its r-th equal slice.  So 1 or N processes train on exactly the same
examples at every step, and a run resumed from a mid-epoch checkpoint sees exactly the
batches it had not yet trained on.  Only full batches are used (as the official code does),
so every rank always has the same number of examples.

Evaluation (:class:`EvalBatches`): rank r takes the r-th of ``world_size`` contiguous
shards (sizes differ by at most one), so every example is evaluated exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

Position = Callable[[], tuple[int, int]]


class TrainBatches:
    """Yields ``(*tensors[idx], idx)`` for this rank's slice of each global batch.

    Args:
        tensors: tensors sharing their first dimension (on the training device).
        batch_size: the global batch (all ranks together); a multiple of ``world_size``.
        seed: the order's seed (each epoch reshuffles).
        position: returns ``(epoch, first_batch)``; the trainer's progress during fit.
        rank, world_size: this process among the data-parallel ones.
        fixed_batches: train on only the first N global batches of epoch 0's order, the same
            ones every epoch (``debug=overfit``).
    """

    def __init__(
        self,
        tensors: tuple[Tensor, ...],
        *,
        batch_size: int,
        seed: int = 0,
        position: Position | None = None,
        rank: int = 0,
        world_size: int = 1,
        fixed_batches: int | None = None,
    ) -> None:
        assert batch_size > 0, f"batch_size must be positive, got {batch_size}"
        assert batch_size % world_size == 0, (
            f"the global batch {batch_size} must be a multiple of the world size {world_size}"
        )
        assert len(tensors[0]) >= batch_size, (
            f"the training set ({len(tensors[0])} examples) is smaller than one global batch ({batch_size})"
        )
        self.tensors = tensors
        self.batch_size, self.seed, self.position = batch_size, seed, position
        self.rank, self.world_size = rank, world_size
        self.per_rank = batch_size // world_size
        self.fixed_batches = fixed_batches

    def __len__(self) -> int:
        full = len(self.tensors[0]) // self.batch_size
        return full if self.fixed_batches is None else min(full, self.fixed_batches)

    def order(self, epoch: int) -> Tensor:
        """The global example order of ``epoch`` (the same on every rank and device)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.tensors[0]), generator=generator)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        epoch, start = self.position() if self.position is not None else (0, 0)
        # One host-to-device copy per epoch; every batch below is sliced on the device.
        order = self.order(0 if self.fixed_batches else epoch).to(self.tensors[0].device)
        for batch in range(max(start, 0), len(self)):
            first = batch * self.batch_size + self.rank * self.per_rank
            idx = order[first : first + self.per_rank]
            yield (*(t[idx] for t in self.tensors), idx)


class EvalBatches:
    """Yields ``(*tensors[idx], idx)`` over this rank's contiguous shard, in order."""

    def __init__(self, tensors: tuple[Tensor, ...], *, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        assert batch_size > 0, f"batch_size must be positive, got {batch_size}"
        self.tensors = tensors
        self.batch_size = batch_size
        total = len(tensors[0])
        self.begin = total * rank // world_size
        self.end = total * (rank + 1) // world_size

    def __len__(self) -> int:
        return (self.end - self.begin + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        device = self.tensors[0].device
        for first in range(self.begin, self.end, self.batch_size):
            stop = min(first + self.batch_size, self.end)
            yield (*(t[first:stop] for t in self.tensors), torch.arange(first, stop, device=device))
