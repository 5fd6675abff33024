"""MultiMNIST (§6): two digits of different classes overlaid on a 36×36 canvas, on the fly.

Each digit is centred on the canvas and shifted by up to ±4 px per axis; the composite is
their pixel sum clipped to 1.  Nothing is stored: item i is a pure function of (seed, i),
generated in batch on whatever device the indices live on.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from capsnet.data.base import PaperRow
from capsnet.data.loader import EvalBatches, TrainBatches
from capsnet.data.mnist import MNISTDataModule
from capsnet.data.transforms import center_on_canvas, hash_int, to_float_images, translate


class MultiMNIST:
    """Seeded, stateless MultiMNIST over a set of single digits.

    Item ``i`` uses digit ``i % N`` as its first digit and, as its second, a digit of a
    different class drawn from the same set; ``len = N * pairs_per_digit``.

    Shapes: item -> (image [1, size, size] in [0, 1], labels [2] long, parts [2, 1, size, size]).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        pairs_per_digit: int = 1,
        seed: int = 0,
        max_shift: int = 4,
        size: int = 36,
    ) -> None:
        assert images.dim() == 3 and images.dtype == torch.uint8, "images must be uint8 [N, 28, 28]"
        assert pairs_per_digit >= 1, f"pairs_per_digit must be >= 1, got {pairs_per_digit}"
        assert len(labels.unique()) >= 2, "MultiMNIST needs digits of at least two classes"
        self.images, self.labels = images, labels.long()
        self.pairs_per_digit, self.seed = pairs_per_digit, seed
        self.max_shift, self.size = max_shift, size
        # Digits sorted by class, so "any digit of another class" is one uniform draw.
        self.by_class = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels, minlength=int(self.labels.max()) + 1)
        self.class_count = counts
        self.class_start = torch.cumsum(counts, 0) - counts
        self._device_cache: dict[torch.device, tuple[Tensor, ...]] = {}

    def __len__(self) -> int:
        return len(self.images) * self.pairs_per_digit

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        image, labels, parts = self.batch(torch.tensor([index]))
        return image[0], labels[0], parts[0]

    def _on(self, device: torch.device) -> tuple[Tensor, ...]:
        if device not in self._device_cache:
            self._device_cache[device] = tuple(
                t.to(device) for t in (self.images, self.labels, self.by_class, self.class_count, self.class_start)
            )
        return self._device_cache[device]

    def pair_indices(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Digit indices (first, second) of items ``index``; their classes always differ."""
        images, labels, by_class, count, start = self._on(index.device)
        first = index % len(images)
        first_label = labels[first]
        others = len(images) - count[first_label]
        draw = hash_keys_mod(others, self.seed, index, 0)
        position = torch.where(draw < start[first_label], draw, draw + count[first_label])
        return first, by_class[position]

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Items ``index`` [B] at once, on ``index.device``."""
        images, labels, *_ = self._on(index.device)
        first, second = self.pair_indices(index)
        shifts = [hash_int(-self.max_shift, self.max_shift, self.seed, index, stream) for stream in (1, 2, 3, 4)]
        parts = []
        for digit, (dx, dy) in ((first, shifts[:2]), (second, shifts[2:])):
            canvas = center_on_canvas(to_float_images(images[digit]), self.size)
            parts.append(translate(canvas, dx, dy))
        parts_t = torch.stack(parts, dim=1)  # (B, 2, 1, size, size)
        composite = parts_t.sum(dim=1).clamp(max=1.0)
        return composite, torch.stack([labels[first], labels[second]], dim=1), parts_t


def hash_keys_mod(modulus: Tensor, *keys: int | Tensor) -> Tensor:
    """Uniform integers in [0, modulus) with a per-element modulus."""
    return hash_int(0, 2**31 - 1, *keys) % modulus


class MultiMNISTDataModule(MNISTDataModule):
    """MultiMNIST pairs from the train / held-out val / test digits, generated on the device.

    Training epoch e uses pair slot ``e % pairs_per_digit`` of every training digit, so
    ``pairs_per_digit`` epochs see every training pair once.  Validation and test sets are
    fixed by ``eval_seed`` and their sizes, identical for every run.
    """

    task = "multi"
    title = "MultiMNIST"
    record_fields: ClassVar[dict[str, str]] = {"multimnist_error": "test_error"}
    headline_error = "multimnist_error"
    paper: ClassVar[dict[str, dict[PaperRow, str]]] = {
        "multimnist_error": {  # Table 1, MultiMNIST column
            ("baseline", None, None): "8.1",
            ("capsnet", 1, True): "7.5",
            ("capsnet", 3, True): "5.2",
        }
    }
    paper_source = "Sabour et al. 2017, Table 1"
    sample_titles: ClassVar[dict[str, str]] = {"test": "MultiMNIST test composites"}

    def __init__(
        self,
        *,
        pairs_per_digit: int = 1000,
        eval_pairs_per_digit: int = 1,
        eval_seed: int = 1234,
        max_shift: int = 4,
        canvas_size: int = 36,
        **kwargs: object,
    ) -> None:
        super().__init__(max_shift=max_shift, canvas_size=canvas_size, **kwargs)  # type: ignore[arg-type]
        self.pairs_per_digit, self.eval_pairs_per_digit, self.eval_seed = (
            pairs_per_digit,
            eval_pairs_per_digit,
            eval_seed,
        )
        self.sets: dict[str, MultiMNIST] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        super().setup(stage)
        self.sets = {
            "train": MultiMNIST(*self.train_set, self.pairs_per_digit, self.seed, self.max_shift, self.canvas_size),
            "val": MultiMNIST(
                *self.val_set, self.eval_pairs_per_digit, self.eval_seed, self.max_shift, self.canvas_size
            ),
            "test": MultiMNIST(
                *self.test_set, self.eval_pairs_per_digit, self.eval_seed + 1, self.max_shift, self.canvas_size
            ),
        }

    def train_dataloader(self) -> TrainBatches:
        return self._train_loader((torch.arange(len(self.sets["train"].images)),))

    def val_dataloader(self) -> EvalBatches:
        return self._eval_loader("val", (torch.arange(len(self.sets["val"])),))

    def test_dataloader(self) -> EvalBatches:
        return self._eval_loader("test", (torch.arange(len(self.sets["test"])),))

    def sample_batches(self, count: int = 32) -> dict[str, tuple[Tensor, ...]]:
        """Small CPU batches for figures: test composites with their parts."""
        return {"test": self.sets["test"].batch(torch.arange(min(count, len(self.sets["test"]))))}

    def on_after_batch_transfer(self, batch: tuple[Tensor, ...], dataloader_idx: int) -> tuple[Tensor, Tensor, Tensor]:
        index = batch[0]
        trainer = self.trainer
        if trainer is not None and trainer.training:
            slot = 0 if self.overfit_batches else trainer.current_epoch % self.pairs_per_digit
            return self.sets["train"].batch(index + slot * len(self.sets["train"].images))
        stage = "test" if trainer is not None and trainer.testing else "val"
        return self.sets[stage].batch(index)


def measure_overlap(dataset: MultiMNIST, count: int) -> dict[str, float]:
    """Mean bounding-box overlap of the two digits over the first ``count`` items.

    Returns intersection over the smaller box and intersection over union.
    """
    _, _, parts = dataset.batch(torch.arange(min(count, len(dataset))))
    ink = parts[:, :, 0] > 0  # (B, 2, H, W)
    rows, cols = ink.any(dim=3), ink.any(dim=2)  # (B, 2, H), (B, 2, W)

    def extent(mask: Tensor) -> tuple[Tensor, Tensor]:
        positions = torch.arange(mask.shape[-1], dtype=torch.float32)
        low = torch.where(mask, positions, torch.inf).amin(-1)
        high = torch.where(mask, positions, -torch.inf).amax(-1) + 1
        return low, high

    (top, bottom), (left, right) = extent(rows), extent(cols)
    area = (bottom - top) * (right - left)  # (B, 2)
    inter_h = (torch.minimum(bottom[:, 0], bottom[:, 1]) - torch.maximum(top[:, 0], top[:, 1])).clamp(min=0)
    inter_w = (torch.minimum(right[:, 0], right[:, 1]) - torch.maximum(left[:, 0], left[:, 1])).clamp(min=0)
    inter = inter_h * inter_w
    smaller = area.min(dim=1).values
    union = area.sum(dim=1) - inter
    return {"intersection_over_smaller": float((inter / smaller).mean()), "iou": float((inter / union).mean())}


__all__ = ["MultiMNIST", "MultiMNISTDataModule", "measure_overlap"]
