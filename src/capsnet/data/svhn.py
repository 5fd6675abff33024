"""SVHN (§7): the cropped-digit .mat files in torchvision's layout, checked against its
published MD5s; the 73,257-image training set (no 'extra'), labels 0–9 (the files' 10 is 0)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torchvision
from torch import Tensor

from capsnet.data.base import PaperRow
from capsnet.data.images import ImageDataModule, as_images

FOLDER = "SVHN"


class SVHNDataModule(ImageDataModule):
    """73,257 training digits (``val_size`` held out), 26,032 test digits, 32×32×3."""

    title = "SVHN"
    paper: ClassVar[dict[str, dict[PaperRow, str]]] = {"test_error": {("capsnet", 3, True): "4.3"}}
    paper_source = "Sabour et al. 2017, §7"

    source = (
        "SVHN format 2 (cropped digits): http://ufldl.stanford.edu/housenumbers/train_32x32.mat and "
        "test_32x32.mat, in <data root>/SVHN/."
    )

    in_channels = 3
    folder_name = FOLDER

    def expected_files(self) -> dict[str, str | None]:
        splits = torchvision.datasets.SVHN.split_list
        return {splits[s][1]: splits[s][2] for s in ("train", "test")}

    def read(self, train: bool) -> tuple[Tensor, Tensor]:
        import scipy.io

        name = torchvision.datasets.SVHN.split_list["train" if train else "test"][1]
        mat = scipy.io.loadmat(self.folder() / name)
        labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10  # 10 stands for the digit 0
        return as_images(mat["X"], "HWCN"), torch.from_numpy(labels)

    def fetch(self) -> None:
        for split in ("train", "test"):
            torchvision.datasets.SVHN(root=str(self.folder()), split=split, download=True)
