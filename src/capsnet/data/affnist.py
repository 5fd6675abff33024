"""affNIST-style robustness (§5.2): train on expanded MNIST, test on affine-transformed digits.

Expanded MNIST places each 28×28 digit at a random position of a 40×40 canvas (centred,
then shifted up to ±6 px: translation only).  The affine test set applies to each MNIST
*test* digit a random rotation, shear and per-axis scale within the ranges documented for
the original affNIST, then a random translation that keeps the whole digit inside the
frame.  Item i is a pure function of (seed, i), generated in batch on the device.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from capsnet.data.base import PaperRow
from capsnet.data.loader import EvalBatches
from capsnet.data.mnist import DataError, MNISTDataModule
from capsnet.data.transforms import center_on_canvas, hash_uniform, random_shift, to_float_images

TEST_PLACEMENT = 2**32 - 1  # a key no training epoch reaches: eval positions never match training shifts


class AffNIST:
    """Seeded affine-transformed MNIST digits on a ``size``×``size`` canvas.

    Item ``i`` is copy ``i // N`` of digit ``i % N``; ``len = N * copies`` (the original
    affNIST made 32 copies of each test digit).

    Shapes: item -> (image [1, size, size] float in [0, 1], label long).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        copies: int = 1,
        seed: int = 0,
        size: int = 40,
        max_rotation_deg: float = 20.0,
        max_shear: float = 0.2,
        scale_range: tuple[float, float] = (0.8, 1.2),
    ) -> None:
        assert copies >= 1, f"copies must be >= 1, got {copies}"
        self.images, self.labels = images, labels.long()
        self.copies, self.seed, self.size = copies, seed, size
        self.max_rotation, self.max_shear = math.radians(max_rotation_deg), max_shear
        self.scale_range = tuple(scale_range)
        self._device_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return len(self.images) * self.copies

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        image, label = self.batch(torch.tensor([index]))
        return image[0], label[0]

    def linear_parts(self, index: Tensor) -> Tensor:
        """The 2×2 linear map (rotation · shear · scale) of each item, in pixel units.

        Shapes: index [B] -> [B, 2, 2] acting on (x, y) column vectors.
        """

        def uniform(low: float, high: float, stream: int) -> Tensor:
            return low + (high - low) * hash_uniform(self.seed, index, stream).double()

        angle = uniform(-self.max_rotation, self.max_rotation, 0)
        shear = uniform(-self.max_shear, self.max_shear, 1)
        scale_x = uniform(*self.scale_range, 2)
        scale_y = uniform(*self.scale_range, 3)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        one, zero = torch.ones_like(shear), torch.zeros_like(shear)
        shear_m = torch.stack([torch.stack([one, shear], -1), torch.stack([zero, one], -1)], -2)
        scale = torch.diag_embed(torch.stack([scale_x, scale_y], -1))
        return rotation @ shear_m @ scale

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Items ``index`` [B] at once, on ``index.device``."""
        device = index.device
        if device not in self._device_cache:  # the source digits move to a device once
            self._device_cache[device] = (self.images.to(device), self.labels.to(device))
        images, labels = self._device_cache[device]
        digit = index % len(images)
        canvas = center_on_canvas(to_float_images(images[digit]), self.size)  # (B,1,S,S)
        linear = self.linear_parts(index).to(device)  # float64, pixel units about the centre
        half = self.size / 2
        # Ink bounding box in centred pixel coordinates (pixel edges, not centres).
        ink = canvas[:, 0] > 0
        positions = torch.arange(self.size, device=device, dtype=torch.float64) - half
        rows, cols = ink.any(dim=2), ink.any(dim=1)
        top = torch.where(rows, positions, torch.inf).amin(1)
        bottom = torch.where(rows, positions, -torch.inf).amax(1) + 1
        left = torch.where(cols, positions, torch.inf).amin(1)
        right = torch.where(cols, positions, -torch.inf).amax(1) + 1
        corners = torch.stack(
            [
                torch.stack([left, top], -1),
                torch.stack([right, top], -1),
                torch.stack([left, bottom], -1),
                torch.stack([right, bottom], -1),
            ],
            1,
        )  # (B,4,2)
        moved = corners @ linear.transpose(1, 2)  # (B, 4, 2)
        low, high = moved.amin(1), moved.amax(1)  # (B, 2)
        # Any translation that keeps the transformed box inside the frame, uniformly.
        t_min, t_max = -half - low, half - high
        fraction = torch.stack([hash_uniform(self.seed, index, 4), hash_uniform(self.seed, index, 5)], -1).double()
        shift = t_min + fraction * (t_max - t_min).clamp(min=0)  # (B, 2) pixels
        # grid_sample wants output→input: p_in = A⁻¹ (p_out − t), in [-1, 1] units (÷ half).
        inverse = torch.linalg.inv(linear)
        theta = torch.cat([inverse, -(inverse @ (shift / half).unsqueeze(-1))], dim=2).float()
        grid = F.affine_grid(theta, list(canvas.shape), align_corners=False)
        out = F.grid_sample(canvas, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.clamp(0.0, 1.0), labels[digit]


def load_affnist_mat(path: str | Path) -> tuple[Tensor, Tensor]:
    """Read an original affNIST .mat file (``affNISTdata`` with ``image`` 1600×N and
    ``label_int``) as (images float [N, 1, 40, 40] in [0, 1], labels [N])."""
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"affNIST file missing: {path.resolve()}. Set data.affnist_mat to a real affNIST .mat file or null."
        )
    try:
        data = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)["affNISTdata"]
        images = torch.from_numpy(data.image.T.reshape(-1, 40, 40).copy())
        # MATLAB stores each 40×40 image column-major.
        images = images.transpose(1, 2).unsqueeze(1).float() / 255.0
        labels = torch.from_numpy(data.label_int.astype("int64").reshape(-1))
    except Exception as error:
        raise DataError(
            f"affNIST file unreadable: {path.resolve()} ({error}); expected the original affNIST .mat layout"
        ) from error
    return images, labels


class AffNISTDataModule(MNISTDataModule):
    """Train on expanded MNIST (40×40, ±6 px); test on expanded-MNIST test and the affine set.

    The test loaders are ``test`` (expanded MNIST test digits at seeded random positions)
    and ``affnist`` (the affine set), reported as ``test_error`` and ``affnist_error``.
    """

    test_set_names = ("test", "affnist")
    title = "expanded MNIST and the affNIST-style set"
    headline_error = "affnist_error"
    paper: ClassVar[dict[str, dict[PaperRow, str]]] = {  # §5.2 gives accuracy: 99.23% / 79% and 99.22% / 66%
        "test_error": {("capsnet", 3, True): "0.77", ("baseline", None, None): "0.78"},
        "affnist_error": {("capsnet", 3, True): "21", ("baseline", None, None): "34"},
    }
    paper_source = "Sabour et al. 2017, §5.2 (accuracy, shown as error %)"
    sample_titles: ClassVar[dict[str, str]] = {
        "expanded": "expanded-MNIST test digits (40×40, seeded positions)",
        "affnist": "affine-transformed test digits (affNIST-style set)",
    }

    def __init__(
        self,
        *,
        copies: int = 1,
        affnist_seed: int = 0,
        max_rotation_deg: float = 20.0,
        max_shear: float = 0.2,
        scale_range: tuple[float, float] = (0.8, 1.2),
        affnist_mat: str | None = None,
        canvas_size: int = 40,
        max_shift: int = 6,
        **kwargs: object,
    ) -> None:
        super().__init__(canvas_size=canvas_size, max_shift=max_shift, **kwargs)  # type: ignore[arg-type]
        self.copies, self.affnist_seed, self.affnist_mat = copies, affnist_seed, affnist_mat
        self.ranges = {"max_rotation_deg": max_rotation_deg, "max_shear": max_shear, "scale_range": tuple(scale_range)}
        self.affnist: AffNIST | None = None
        self.real_affnist: tuple[Tensor, Tensor] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.affnist is not None or self.real_affnist is not None:
            return
        super().setup(stage)
        if self.affnist_mat:
            images, labels = load_affnist_mat(self.affnist_mat)
            self.real_affnist = (
                (images[: self.test_subset], labels[: self.test_subset]) if self.test_subset else (images, labels)
            )
        else:
            self.affnist = AffNIST(
                *self.test_set, copies=self.copies, seed=self.affnist_seed, size=self.canvas_size, **self.ranges
            )

    def test_dataloader(self) -> list[EvalBatches]:
        expanded = self._eval_loader("test", self.test_set)
        if self.real_affnist is not None:
            return [expanded, self._eval_loader("affnist", self.real_affnist)]
        return [expanded, self._eval_loader("affnist", (torch.arange(len(self.affnist)),))]

    def place_for_eval(self, images: Tensor, idx: Tensor) -> Tensor:
        """Expanded-MNIST eval digits: each at a seeded random position, fixed for every run."""
        return random_shift(self.place(images), self.max_shift, self.affnist_seed, TEST_PLACEMENT, idx)

    def sample_batches(self, count: int = 32) -> dict[str, tuple[Tensor, ...]]:
        """Small CPU batches for figures: expanded-MNIST test digits and the affine set."""
        count = min(count, len(self.test_set[1]))
        idx = torch.arange(count)
        expanded = self.place_for_eval(self.test_set[0][:count], idx)
        affine = self.real_affnist if self.real_affnist is not None else self.affnist.batch(idx)
        return {"expanded": (expanded, self.test_set[1][:count]), "affnist": (affine[0][:count], affine[1][:count])}

    def on_after_batch_transfer(self, batch: tuple[Tensor, ...], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            return super().on_after_batch_transfer(batch, dataloader_idx)
        if trainer is not None and trainer.testing and dataloader_idx == 1:
            if self.real_affnist is not None:
                return batch[0], batch[1]
            return self.affnist.batch(batch[0])
        # Validation and expanded-MNIST test digits: seeded random positions, so model
        # selection sees the same kind of input as the expanded test set.
        images, labels, idx = batch
        return self.place_for_eval(images, idx), labels
