"""Photographs and renderings (CIFAR-10, SVHN, smallNORB, your own images): files checked,
images held as uint8 [N, C, H, W] on the training device, crops, flips and jitter done in
batch there.

A subclass names its files (``expected_files``: relative path → checksum or None), reads a
split (``read``) and, where torchvision can, downloads (``fetch``).  Everything else — the
seeded validation split, the global-batch loaders, exact resume, DDP sharding — is the
base's (:class:`~capsnet.data.base.InMemoryDataModule`), shared with MNIST.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from capsnet.data.base import DataError, InMemoryDataModule, file_digest
from capsnet.data.transforms import (
    center_crop,
    random_brightness_contrast,
    random_crop,
    random_flip,
    standardize,
    to_float_images,
)

CROPS = ("random", "center")


class ImageDataModule(InMemoryDataModule):
    """Images with a train-time crop (``train_crop``: random, or center as at test), optional
    flips, brightness/contrast jitter and per-image standardisation.

    Args:
        crop_size: side of the square the network sees (train and test).
        train_crop: "random" (a uniformly placed window per image and epoch) or "center".
        flip: mirror left-right with probability 1/2 in training.
        brightness: largest brightness change in training, on the [0, 1] pixel scale (0: none).
        contrast: (low, high) contrast factor range in training, or None.
        standardize: per-image zero mean, unit variance, in training and test.
        verify_checksums: check each file against its published checksum where it has one.
        download: fetch missing files with torchvision's own download, where it has one.
    """

    checksum_kind = "md5"
    sample_titles: ClassVar[dict[str, str]] = {
        "train_center": "training images, central crop (the test-time view; training crops are random)",
        "test_images": "test images as the network sees them",
    }
    source = ""  # where the files come from, for the missing-file message
    folder_name = ""  # the dataset's folder under the data root

    def __init__(
        self,
        *,
        crop_size: int,
        train_crop: str = "random",
        flip: bool = False,
        brightness: float = 0.0,
        contrast: tuple[float, float] | None = None,
        standardize: bool = False,
        verify_checksums: bool = True,
        download: bool = False,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if train_crop not in CROPS:
            raise ValueError(f"data.train_crop must be one of {CROPS}, got {train_crop!r}")
        self.crop_size, self.train_crop, self.flip = crop_size, train_crop, flip
        self.brightness = brightness
        self.contrast = tuple(contrast) if contrast is not None else None
        self.standardize = standardize
        self.verify_checksums, self.download = verify_checksums, download

    # ---- what a dataset defines ---------------------------------------------------------
    def folder(self) -> Path:
        """Where the dataset's files live: ``<data root>/<folder_name>``."""
        return Path(self.data_dir).expanduser() / self.folder_name

    def expected_files(self) -> dict[str, str | None]:
        """Relative file name → its published checksum (None where none is published)."""
        raise NotImplementedError

    def read(self, train: bool) -> tuple[Tensor, Tensor]:
        """A split as (uint8 [N, C, H, W], int64 [N])."""
        raise NotImplementedError

    def fetch(self) -> None:
        """Download the files (``data.download=true``)."""
        raise DataError(f"data.download: no download is available for {type(self).__name__}; {self.source}")

    # ---- files ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        missing = [name for name in self.expected_files() if not (self.folder() / name).is_file()]
        if missing and self.download:
            self.fetch()
        self.verify()

    def verify(self) -> None:
        """Every file present, and equal to its published checksum where one exists."""
        for name, expected in self.expected_files().items():
            path = self.folder() / name
            if not path.is_file():
                raise DataError(
                    f"{type(self).__name__}: file missing: {path.resolve()}. {self.source} Put the files in "
                    f"{self.folder().resolve()} (data root: paths.data_dir or CAPSNET_DATA_DIR), or pass "
                    "data.download=true where a download exists."
                )
            if self.verify_checksums and expected is not None:
                actual = file_digest(path, self.checksum_kind)
                if actual != expected:
                    raise DataError(
                        f"{type(self).__name__}: file corrupt: {path.resolve()} has {self.checksum_kind} {actual}, "
                        f"expected {expected}. Replace it with the original file. {self.source}"
                    )

    # ---- the views the network sees ----------------------------------------------------------
    def place(self, images: Tensor) -> Tensor:
        """The test-time view: float, central crop, standardised if configured."""
        images = center_crop(to_float_images(images), self.crop_size)
        return standardize(images) if self.standardize else images

    @property
    def image_size(self) -> int:
        return self.crop_size

    def train_view(self, images: Tensor, idx: Tensor, epoch: int) -> Tensor:
        keys = (self.seed, epoch, idx)
        images = to_float_images(images)
        if self.train_crop == "random":
            images = random_crop(images, self.crop_size, *keys)
        else:
            images = center_crop(images, self.crop_size)
        if self.flip:
            images = random_flip(images, *keys)
        if self.brightness or self.contrast:
            images = random_brightness_contrast(images, self.brightness, self.contrast or (1.0, 1.0), *keys)
        return standardize(images) if self.standardize else images

    def sample_batches(self, count: int = 32) -> dict[str, tuple[Tensor, ...]]:
        """Small CPU batches for figures, in the test-time view."""
        return {
            "test_images": (self.place(self.test_set[0][:count]), self.test_set[1][:count]),
            "train_center": (self.place(self.train_set[0][:count]), self.train_set[1][:count]),
        }


def as_images(array: object, layout: str) -> Tensor:
    """A numpy array as contiguous uint8 [N, C, H, W] from ``layout`` ('NCHW' or 'HWCN')."""
    tensor = torch.as_tensor(array)
    if layout == "HWCN":
        tensor = tensor.permute(3, 2, 0, 1)
    return tensor.to(torch.uint8).contiguous()
