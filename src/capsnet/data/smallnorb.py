"""smallNORB (§7): the NYU binary matrix files, read and checked by their headers and
sizes; stereo pairs as two channels (or the left camera only), resized 96→48 once, then
random 32×32 crops in training and the central 32×32 patch at test."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from capsnet.data.base import PaperRow
from capsnet.data.images import ImageDataModule
from capsnet.data.mnist import DataError

FOLDER = "smallNORB"
PAIRS = 24_300  # stereo pairs per split
SPLITS = {True: "smallnorb-5x46789x9x18x6x2x96x96-training", False: "smallnorb-5x01235x9x18x6x2x96x96-testing"}
# The binary matrix format: int32 magic (element type), int32 rank, max(3, rank) int32 dims.
BYTE_MATRIX, INT_MATRIX = 0x1E3D4C55, 0x1E3D4C54
SHAPES = {"dat": (BYTE_MATRIX, (2, 96, 96)), "cat": (INT_MATRIX, ()), "info": (INT_MATRIX, (4,))}


def read_matrix(path: Path, kind: str, pairs: int | None = PAIRS) -> np.ndarray:
    """One -dat/-cat/-info file as a (memory-mapped) numpy array, refusing any header, shape
    or size but its own (``pairs``: the published count; None accepts any)."""
    magic_expected, item = SHAPES[kind]
    with path.open("rb") as handle:
        head = handle.read(24)  # the longest header: rank 4
    if len(head) < 20:
        raise DataError(f"smallNORB file too short to be a -{kind}.mat file: {path.resolve()} ({len(head)} bytes)")
    magic, rank = (int(x) for x in np.frombuffer(head[:8], dtype="<i4"))
    header = 8 + 4 * max(3, rank)
    dims = tuple(int(d) for d in np.frombuffer(head[8 : 8 + 4 * min(max(rank, 0), 4)], dtype="<i4"))
    shape = (pairs if pairs is not None else (dims[0] if dims else -1), *item)
    dtype = np.dtype("u1") if magic_expected == BYTE_MATRIX else np.dtype("<i4")
    expected_size = header + int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size
    if magic & 0xFFFFFFFF != magic_expected or dims != shape or size != expected_size:
        raise DataError(
            f"smallNORB file corrupt or not a -{kind}.mat file: {path.resolve()} has magic {magic & 0xFFFFFFFF:#x}, "
            f"dims {dims}, {size} bytes; expected {magic_expected:#x}, {shape}, {expected_size} bytes "
            "(gunzip the downloaded .mat.gz files)"
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=header, shape=shape)


class SmallNORBDataModule(ImageDataModule):
    """24,300 training pairs (``val_size`` held out) and 24,300 test pairs of 5 categories.

    Args:
        channels: 2 for both stereo images as channels, 1 for the first camera only.
        resize: side the 96×96 images are reduced to once (area average), before cropping.
    """

    title = "smallNORB"
    paper: ClassVar[dict[str, dict[PaperRow, str]]] = {"test_error": {("capsnet", 3, True): "2.7"}}
    paper_source = "Sabour et al. 2017, §7"

    num_classes = 5
    folder_name = FOLDER
    source = (
        "smallNORB: the six files of https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/ "
        "(gunzipped: smallnorb-5x46789x9x18x6x2x96x96-training-{dat,cat,info}.mat and "
        "smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat,info}.mat) in <data root>/smallNORB/."
    )

    def __init__(self, *, channels: int = 2, resize: int = 48, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        if channels not in (1, 2):
            raise ValueError(f"data.channels must be 1 or 2, got {channels!r}")
        self.in_channels, self.resize = channels, resize

    def expected_files(self) -> dict[str, str | None]:
        # No checksums are published for these files: read_matrix checks header and size.
        return {f"{SPLITS[train]}-{kind}.mat": None for train in (True, False) for kind in SHAPES}

    def _matrix(self, train: bool, kind: str) -> np.ndarray:
        # verify_checksums: no checksums are published, so it checks the published count
        return read_matrix(
            self.folder() / f"{SPLITS[train]}-{kind}.mat", kind, PAIRS if self.verify_checksums else None
        )

    def verify(self) -> None:
        super().verify()
        for train in (True, False):
            counts = {kind: len(self._matrix(train, kind)) for kind in SHAPES}
            if len(set(counts.values())) != 1:
                raise DataError(
                    f"smallNORB {SPLITS[train]}: the -dat, -cat and -info files disagree in length {counts}"
                )

    def read(self, train: bool) -> tuple[Tensor, Tensor]:
        pairs = torch.from_numpy(np.ascontiguousarray(self._matrix(train, "dat")[:, : self.in_channels]))
        labels = torch.from_numpy(self._matrix(train, "cat").astype(np.int64))
        resized = torch.cat(
            [  # in chunks: the float copy of a whole split would take 1.8 GB
                F.interpolate(chunk.float(), size=(self.resize, self.resize), mode="area").round().clamp(0, 255)
                for chunk in pairs.split(2048)
            ]
        )
        return resized.to(torch.uint8), labels
