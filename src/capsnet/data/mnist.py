"""MNIST: checksummed loading and the DataModule with ±2 px shifts done on the device."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torchvision
from torch import Tensor

from capsnet.data.base import DataError, InMemoryDataModule, PaperRow, file_digest, split_train_val
from capsnet.data.transforms import center_on_canvas, random_shift, to_float_images

__all__ = ["DataError", "MNISTDataModule", "file_digest", "load_mnist", "split_train_val", "verify_mnist"]

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


class MNISTDataModule(InMemoryDataModule):
    """MNIST with a held-out validation split and random ±``max_shift`` px training shifts.

    The whole split lives on the training device as uint8 (47 MB for MNIST's training
    set); batches are sliced there and only then converted to float, placed on the canvas
    and shifted, so no batch is ever copied from the host.

    Args:
        max_shift: the largest training shift per axis, zero padded (§5: 2).
        canvas_size: the side of the canvas the digits are centred on (28; 40 for affNIST).
    """

    title = "MNIST"
    paper: ClassVar[dict[str, dict[PaperRow, str]]] = {
        "test_error": {  # Table 1, test error % (mean ± std of 3 trials)
            ("baseline", None, None): "0.39",
            ("capsnet", 1, False): "0.34 ± 0.032",
            ("capsnet", 1, True): "0.29 ± 0.011",
            ("capsnet", 3, False): "0.35 ± 0.036",
            ("capsnet", 3, True): "0.25 ± 0.005",
        }
    }
    paper_source = "Sabour et al. 2017, Table 1"
    sample_titles: ClassVar[dict[str, str]] = {
        "train": "training digits as the network sees them (random shifts)",
        "test": "test digits",
    }

    def __init__(self, *, max_shift: int = 2, canvas_size: int = 28, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.max_shift, self.canvas_size = max_shift, canvas_size

    @property
    def image_size(self) -> int:
        return self.canvas_size

    def prepare_data(self) -> None:
        verify_mnist(self.data_dir)

    def read(self, train: bool) -> tuple[Tensor, Tensor]:
        return load_mnist(self.data_dir, train=train)

    def place(self, images: Tensor) -> Tensor:
        """uint8 digits → float images centred on this module's canvas."""
        images = to_float_images(images)
        return center_on_canvas(images, self.canvas_size) if images.shape[-1] != self.canvas_size else images

    def train_view(self, images: Tensor, idx: Tensor, epoch: int) -> Tensor:
        images = self.place(images)
        return random_shift(images, self.max_shift, self.seed, epoch, idx) if self.max_shift > 0 else images
