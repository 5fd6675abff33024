"""smallNORB novel-viewpoint splits ("Matrix capsules with EM routing", Hinton, Sabour,
Frosst, ICLR 2018, the generalisation-to-novel-viewpoints experiment): train on a third of the
viewpoints, test on the rest.

The ``-info.mat`` files give, per stereo pair, four int32 values (the NYU dataset page):
    0 instance   0 … 9 (training set: 4, 6, 7, 8, 9; test set: 0, 1, 2, 3, 5)
    1 elevation  0 … 8, meaning 30°, 35°, …, 70° (30 + 5·index)
    2 azimuth    0, 2, …, 34, meaning 0°, 20°, …, 340° (10·value)
    3 lighting   0 … 5
Each split holds every (category, instance, elevation, azimuth, lighting) once:
5·5·9·18·6 = 24,300 pairs.

``viewpoint_split``:
    standard   all 24,300 training pairs; test on all 24,300 test pairs.
    azimuth    train on the training pairs at azimuths 300°, 320°, 340°, 0°, 20°, 40°
               (info values 30, 32, 34, 0, 2, 4: 6 of 18, 8,100 pairs); test on the test
               pairs at the other 12 azimuths, 60° … 280° (16,200 pairs).
    elevation  train on the 3 lowest elevations, 30°, 35°, 40° (info 0, 1, 2: 8,100
               pairs); test on the 6 higher ones, 45° … 70° (16,200 pairs).
The split sizes follow the paper's description as recalled here (its text was not at hand):
training on a third of the training data, testing on two thirds of the test data.  A third
of 18 azimuths is six: 300° … 40°, the set the self-routing paper's code uses too
(coder3000/SR-CapsNet ``norb.py``: ``train_anno = [0, 2, 4, 34, 32, 30]``, elevations
``[0, 1, 2]``).  Five azimuths, 300° … 20°, would train on 6,750 pairs (5/18).
``train_degrees`` replaces the training viewpoints (in degrees of the split's axis).

For a novel-viewpoint split the test loaders are ``test`` (the novel viewpoints: the
experiment's number) and ``familiar`` (test pairs at the training viewpoints, which the
paper uses to match the capsule network and the CNN before comparing them on novel ones).
The validation hold-out (``val_size``) is drawn from the kept training pairs.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from capsnet.data.base import PaperRow
from capsnet.data.loader import EvalBatches
from capsnet.data.mnist import DataError
from capsnet.data.smallnorb import SmallNORBDataModule

VIEWPOINT_SPLITS = ("standard", "azimuth", "elevation")
INFO_COLUMN = {"elevation": 1, "azimuth": 2}
# Training viewpoints in degrees: "a third" of each axis.
TRAIN_DEGREES = {"azimuth": (300, 320, 340, 0, 20, 40), "elevation": (30, 35, 40)}
ELEVATIONS = tuple(30 + 5 * i for i in range(9))  # info value i -> degrees
AZIMUTHS = tuple(range(0, 360, 20))  # info value 2k -> 20k degrees


def viewpoint_degrees(info: np.ndarray, axis: str) -> np.ndarray:
    """The ``axis`` ("azimuth" or "elevation") of every row of an info matrix [N, 4], in
    degrees; a value outside the published range is a DataError."""
    values = np.asarray(info)[:, INFO_COLUMN[axis]].astype(np.int64)
    if axis == "elevation":
        valid = (values >= 0) & (values <= 8)
        degrees = 30 + 5 * values
    else:
        valid = (values >= 0) & (values <= 34) & (values % 2 == 0)
        degrees = 10 * values
    if not valid.all():
        bad = sorted(set(values[~valid].tolist()))[:5]
        raise DataError(f"smallNORB -info.mat: {axis} values {bad} outside the published range (corrupt file?)")
    return degrees


def familiar_mask(info: np.ndarray, split: str, train_degrees: tuple[int, ...] | None = None) -> np.ndarray:
    """bool [N]: the pairs at the split's training viewpoints (all pairs for "standard")."""
    if split not in VIEWPOINT_SPLITS:
        raise ValueError(f"data.viewpoint_split must be one of {VIEWPOINT_SPLITS}, got {split!r}")
    if split == "standard":
        return np.ones(len(info), dtype=bool)
    allowed = ELEVATIONS if split == "elevation" else AZIMUTHS
    chosen = tuple(train_degrees) if train_degrees is not None else TRAIN_DEGREES[split]
    if not chosen or any(d not in allowed for d in chosen):
        raise ValueError(f"data.train_degrees for {split} must be a non-empty subset of {allowed}, got {chosen}")
    return np.isin(viewpoint_degrees(info, split), chosen)


class SmallNORBViewpointDataModule(SmallNORBDataModule):
    """smallNORB with a novel-viewpoint split (module docstring); everything else (files,
    resize, crops, jitter) is SmallNORBDataModule's.

    Args:
        viewpoint_split: "standard", "azimuth" or "elevation".
        train_degrees: the training viewpoints in degrees (None: the paper's).
    """

    title = "smallNORB, novel viewpoints"
    paper: ClassVar[dict[str, dict[PaperRow, str]]] = {}  # §7's 2.7% is the standard split's, not these
    paper_source = "Hinton, Sabour, Frosst 2018 (novel viewpoints): compared with a CNN, not Table 1"

    def __init__(
        self, *, viewpoint_split: str = "standard", train_degrees: list[int] | None = None, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.viewpoint_split = viewpoint_split
        self.train_degrees = tuple(train_degrees) if train_degrees is not None else None
        familiar_mask(np.zeros((0, 4), dtype=np.int32), viewpoint_split, self.train_degrees)  # check the settings
        self.familiar_set: tuple[Tensor, Tensor] | None = None
        self._familiar_test: tuple[Tensor, Tensor] | None = None

    @property
    def test_set_names(self) -> tuple[str, ...]:
        return ("test",) if self.viewpoint_split == "standard" else ("test", "familiar")

    def familiar(self, train: bool) -> np.ndarray:
        """bool [N]: the pairs of a split at the training viewpoints."""
        return familiar_mask(self._matrix(train, "info"), self.viewpoint_split, self.train_degrees)

    def read(self, train: bool) -> tuple[Tensor, Tensor]:
        """Training: the pairs at the training viewpoints.  Test: those at the other
        viewpoints (the familiar ones are kept for the ``familiar`` loader)."""
        images, labels = super().read(train)
        if self.viewpoint_split == "standard":
            return images, labels
        keep = torch.from_numpy(self.familiar(train))
        if train:
            return images[keep], labels[keep]
        self._familiar_test = (images[keep], labels[keep])
        return images[~keep], labels[~keep]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        super().setup(stage)
        if self._familiar_test is not None:
            images, labels = self._familiar_test
            limit = self.test_subset  # as the test set
            self.familiar_set = (images[:limit], labels[:limit]) if limit is not None else (images, labels)

    def test_dataloader(self) -> EvalBatches | list[EvalBatches]:
        novel = self._eval_loader("test", self.test_set)
        if self.familiar_set is None:
            return novel
        return [novel, self._eval_loader("familiar", self.familiar_set)]


__all__ = [
    "TRAIN_DEGREES",
    "VIEWPOINT_SPLITS",
    "SmallNORBViewpointDataModule",
    "familiar_mask",
    "viewpoint_degrees",
]
