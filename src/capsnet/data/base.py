"""The base of every dataset: in memory, on the training device, one class per dataset.

A dataset is one :class:`InMemoryDataModule` subclass and one YAML (``conf/data/<name>.yaml``,
which starts from ``conf/data/base.yaml``).  The subclass reads its files (``prepare_data``
checks them, ``read`` returns a split as uint8 images and int64 labels) and says how the
network sees a batch (``place`` at test time, ``train_view`` in training, both on the
device).  Everything else is here: the seeded validation split, subsets, the global-batch
loaders with exact mid-epoch resume, DDP sharding, data kept on the device.

It also *declares what it is* — the facts records, the results table, the report and the
figures read (they find the class through the record's ``data._target_``), so none of them
names a dataset in a string literal of its own: ``title``, ``record_fields`` (extra record
fields copied from test metrics), ``headline_error`` (the record field the paper's main
number compares with), ``paper`` (the paper's test errors, %, by record field and table
row) and ``sample_titles`` (the figure titles of ``sample_batches``).  The record's
``data`` label is the YAML's ``name``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
from torch import Tensor

from capsnet.data.loader import EvalBatches, TrainBatches

# A row of the paper's tables: (model, routing iterations, reconstruction); None where it
# does not apply (the CNN baselines).
PaperRow = tuple[str, int | None, bool | None]


class DataError(RuntimeError):
    """A dataset file is missing or corrupt; the message names the file and the fix."""


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def split_train_val(
    images: Tensor, labels: Tensor, val_size: int, split_seed: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Hold a seeded validation split out of the training set (independent of the run seed)."""
    assert 0 < val_size < len(images), f"val_size must be in (0, {len(images)}), got {val_size}"
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def _take(pair: tuple[Tensor, Tensor], limit: int | None) -> tuple[Tensor, Tensor]:
    return pair if limit is None else (pair[0][:limit], pair[1][:limit])


class InMemoryDataModule(L.LightningDataModule):
    """A dataset held in memory as uint8, moved to the training device once, sliced there.

    ``batch_size`` is the global batch: under DDP each of the N ranks takes
    ``batch_size / N`` of it.  Subclasses define ``prepare_data`` (check the files),
    ``read`` (a split), ``image_size``, ``place`` (the test-time view) and, where training
    sees something else, ``train_view``.

    Args:
        data_dir: the data root (``paths.data_dir``).
        batch_size: the global training batch.
        eval_batch_size: per process; does not change results.
        val_size: examples held out of the training split for model selection.
        split_seed: the held-out split's seed (it does not move with the run seed).
        seed: the run seed (the training order and augmentation draw from it).
        train_subset, val_subset, test_subset: the first N examples of each (profiles, tests).
        overfit_batches: train on the same first N global batches every epoch (debug).
    """

    # ---- what the dataset is (see the module docstring) --------------------------------------
    title: ClassVar[str] = ""
    task: ClassVar[str] = "single"  # "single": one label per image; "multi": several (MultiMNIST)
    num_classes: ClassVar[int] = 10
    in_channels: ClassVar[int] = 1
    record_fields: ClassVar[dict[str, str]] = {}  # extra record field -> test metric it copies
    headline_error: ClassVar[str] = "test_error"
    paper: ClassVar[dict[str, dict[PaperRow, str]]] = {}  # record field -> table row -> the paper's error %
    paper_source: ClassVar[str] = ""  # where in the paper, and what kind of number it is
    sample_titles: ClassVar[dict[str, str]] = {}  # sample_batches() key -> figure title
    test_set_names: ClassVar[tuple[str, ...]] = ("test",)  # test loaders; the first is the dataset's own

    def __init__(
        self,
        *,
        data_dir: str,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        val_size: int = 5000,
        split_seed: int = 0,
        seed: int = 0,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        overfit_batches: int | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.split_seed, self.seed = val_size, split_seed, seed
        self.train_subset, self.val_subset, self.test_subset = train_subset, val_subset, test_subset
        self.overfit_batches = overfit_batches
        self.train_set: tuple[Tensor, Tensor] | None = None
        self._full_train: tuple[Tensor, Tensor] | None = None
        self._on_device: dict[tuple[str, str], tuple[Tensor, ...]] = {}

    # ---- what a dataset defines -----------------------------------------------------------
    @property
    def image_size(self) -> int:
        """The side of the square images the network sees."""
        raise NotImplementedError

    def read(self, train: bool) -> tuple[Tensor, Tensor]:
        """A split as (uint8 images [N, H, W] or [N, C, H, W], int64 labels [N])."""
        raise NotImplementedError

    def place(self, images: Tensor) -> Tensor:
        """uint8 images (on the device) -> the float images the network sees at test time."""
        raise NotImplementedError

    def train_view(self, images: Tensor, idx: Tensor, epoch: int) -> Tensor:
        """The training-time view of the uint8 images ``idx`` in ``epoch``: by default the
        test-time one.  Augmentation must be a pure function of (seed, epoch, example), so a
        resumed run replays it exactly."""
        return self.place(images)

    # ---- splits ---------------------------------------------------------------------------
    def full_training_split(self) -> tuple[Tensor, Tensor]:
        """The whole training split (before the validation hold-out), read once."""
        if self._full_train is None:
            self._full_train = self.read(train=True)
        return self._full_train

    def num_training_examples(self) -> int:
        """Examples in the training split, validation hold-out included (checked against the
        config before any work)."""
        return len(self.full_training_split()[1])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val = split_train_val(*self.full_training_split(), self.val_size, self.split_seed)
        self.train_set = _take(train, self.train_subset)
        self.val_set = _take(val, self.val_subset)
        self.test_set = _take(self.read(train=False), self.test_subset)

    # ---- loaders --------------------------------------------------------------------------
    def _position(self) -> tuple[int, int]:
        """(epoch, first batch) from the trainer, so a resumed run skips trained batches."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        epoch = trainer.current_epoch
        return epoch, trainer.global_step - epoch * int(trainer.num_training_batches)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def device(self) -> torch.device:
        """The training device (the data moves there once, not per batch)."""
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def on_device(self, name: str, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """``tensors`` moved to the training device once and kept there."""
        device = self.device()
        key = (name, str(device))
        if key not in self._on_device:
            self._on_device[key] = tuple(t.to(device) for t in tensors)
        return self._on_device[key]

    def _train_loader(self, tensors: tuple[Tensor, ...]) -> TrainBatches:
        rank, world = self._rank()
        return TrainBatches(
            self.on_device("train", tensors),
            batch_size=self.batch_size,
            seed=self.seed,
            position=self._position,
            rank=rank,
            world_size=world,
            fixed_batches=self.overfit_batches,
        )

    def _eval_loader(self, name: str, tensors: tuple[Tensor, ...]) -> EvalBatches:
        rank, world = self._rank()
        return EvalBatches(self.on_device(name, tensors), batch_size=self.eval_batch_size, rank=rank, world_size=world)

    def train_dataloader(self) -> TrainBatches:
        return self._train_loader(self.train_set)

    def val_dataloader(self) -> EvalBatches:
        return self._eval_loader("val", self.val_set)

    def test_dataloader(self) -> EvalBatches | list[EvalBatches]:
        return self._eval_loader("test", self.test_set)

    def on_after_batch_transfer(self, batch: tuple[Tensor, ...], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        images, labels, idx = batch
        trainer = self.trainer
        if trainer is not None and trainer.training:
            return self.train_view(images, idx, trainer.current_epoch), labels
        return self.place(images), labels

    def sample_batches(self, count: int = 32) -> dict[str, tuple[Tensor, ...]]:
        """Small CPU batches for figures (keys titled by ``sample_titles``)."""
        count = min(count, len(self.test_set[1]), len(self.train_set[1]))
        idx = torch.arange(count)
        return {
            "test": (self.place(self.test_set[0][:count]), self.test_set[1][:count]),
            "train": (self.train_view(self.train_set[0][:count], idx, 0), self.train_set[1][:count]),
        }
