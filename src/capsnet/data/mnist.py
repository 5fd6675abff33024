"""MNIST: checksummed loading and the DataModule with ±2 px shifts done on the device."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import torch
import torchvision
from torch import Tensor

from capsnet.data.loader import EvalBatches, TrainBatches
from capsnet.data.transforms import center_on_canvas, random_shift, to_float_images

# SHA-256 of the four official, uncompressed MNIST IDX files.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

HOW_TO_FIX = (
    "Put the four official uncompressed MNIST IDX files in <data_dir>/MNIST/raw/ and point "
    "the data root at <data_dir> with CAPSNET_DATA_DIR=<data_dir> (or paths.data_dir=<data_dir>)."
)


class DataError(RuntimeError):
    """A dataset file is missing or corrupt; the message names the file and the fix."""


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_mnist(data_dir: str | Path) -> Path:
    """Check that the four MNIST files exist with the right SHA-256; return the raw folder."""
    raw = Path(data_dir).expanduser() / "MNIST" / "raw"
    for name, expected in MNIST_SHA256.items():
        path = raw / name
        if not path.is_file():
            raise DataError(f"MNIST file missing: {path.resolve()}. {HOW_TO_FIX}")
        actual = file_digest(path)
        if actual != expected:
            raise DataError(
                f"MNIST file corrupt: {path.resolve()} has SHA-256 {actual}, expected {expected} "
                f"(truncated or altered download?). Replace it with the official file. {HOW_TO_FIX}"
            )
    return raw


def load_mnist(data_dir: str | Path, train: bool) -> tuple[Tensor, Tensor]:
    """Verified MNIST split as (images uint8 [N, 28, 28], labels int64 [N])."""
    verify_mnist(data_dir)
    dataset = torchvision.datasets.MNIST(root=str(Path(data_dir).expanduser()), train=train, download=False)
    return dataset.data.clone(), dataset.targets.clone().long()


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


class MNISTDataModule(L.LightningDataModule):
    """MNIST with a held-out validation split and random ±``max_shift`` px training shifts.

    The whole split lives on the training device as uint8 (47 MB for MNIST's training
    set); batches are sliced there and only then converted to float, placed on the canvas
    and shifted, so no batch is ever copied from the host.  ``batch_size`` is the global
    batch: under DDP each of the N ranks takes ``batch_size / N`` of it.
    """

    task = "single"
    num_classes = 10
    in_channels = 1

    def __init__(
        self,
        *,
        data_dir: str,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        val_size: int = 5000,
        split_seed: int = 0,
        seed: int = 0,
        max_shift: int = 2,
        canvas_size: int = 28,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        overfit_batches: int | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.split_seed, self.seed = val_size, split_seed, seed
        self.max_shift, self.canvas_size = max_shift, canvas_size
        self.train_subset, self.val_subset, self.test_subset = train_subset, val_subset, test_subset
        self.overfit_batches = overfit_batches
        self.train_set: tuple[Tensor, Tensor] | None = None
        self._full_train: tuple[Tensor, Tensor] | None = None
        self._on_device: dict[tuple[str, str], tuple[Tensor, ...]] = {}

    @property
    def image_size(self) -> int:
        return self.canvas_size

    def prepare_data(self) -> None:
        verify_mnist(self.data_dir)

    def read(self, train: bool) -> tuple[Tensor, Tensor]:
        """A split as (uint8 images, int64 labels); the datasets built on this class override it."""
        return load_mnist(self.data_dir, train=train)

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

    def place(self, images: Tensor) -> Tensor:
        """uint8 digits → float images centred on this module's canvas."""
        images = to_float_images(images)
        return center_on_canvas(images, self.canvas_size) if images.shape[-1] != self.canvas_size else images

    def sample_batches(self, count: int = 32) -> dict[str, tuple[Tensor, ...]]:
        """Small CPU batches for figures: shifted training digits and test digits."""
        idx = torch.arange(count)
        train = random_shift(self.place(self.train_set[0][:count]), self.max_shift, self.seed, 0, idx)
        return {
            "test": (self.place(self.test_set[0][:count]), self.test_set[1][:count]),
            "train": (train, self.train_set[1][:count]),
        }

    def on_after_batch_transfer(self, batch: tuple[Tensor, ...], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        images, labels, idx = batch
        images = self.place(images)
        trainer = self.trainer
        if trainer is not None and trainer.training and self.max_shift > 0:
            images = random_shift(images, self.max_shift, self.seed, trainer.current_epoch, idx)
        return images, labels
