"""CIFAR-10 (§7): torchvision's on-disk layout, its published MD5s, the official code's
augmentation (random 24×24 crop, flip, brightness and contrast; per-image standardisation)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torchvision
from torch import Tensor

from capsnet.data.base import PaperRow
from capsnet.data.images import ImageDataModule, as_images

FOLDER = "cifar-10-batches-py"


class CIFAR10DataModule(ImageDataModule):
    """50,000 training images (``val_size`` of them held out), 10,000 test images, 32×32×3."""

    title = "CIFAR-10"
    paper: ClassVar[dict[str, dict[PaperRow, str]]] = {"test_error": {("capsnet", 3, True): "10.6"}}
    paper_source = "Sabour et al. 2017, §7: an ensemble of 7 models"

    source = (
        "CIFAR-10 'python version': https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, "
        "unpacked as torchvision lays it out (<data root>/cifar-10-batches-py/)."
    )

    in_channels = 3
    folder_name = FOLDER

    def expected_files(self) -> dict[str, str | None]:
        listed = torchvision.datasets.CIFAR10.train_list + torchvision.datasets.CIFAR10.test_list
        return {name: md5 for name, md5 in listed}

    def read(self, train: bool) -> tuple[Tensor, Tensor]:
        names = [
            n for n, _ in (torchvision.datasets.CIFAR10.train_list if train else torchvision.datasets.CIFAR10.test_list)
        ]
        images, labels = [], []
        for name in names:
            with (self.folder() / name).open("rb") as handle:
                entry = pickle.load(handle, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        return as_images(np.concatenate(images), "NCHW"), torch.as_tensor(labels, dtype=torch.int64)

    def fetch(self) -> None:
        for train in (True, False):
            torchvision.datasets.CIFAR10(root=str(Path(self.data_dir).expanduser()), train=train, download=True)
