"""Pure tensor transforms that run in batch on whatever device the images live on.

Randomness comes from a counter-based integer hash of (seed, keys...) rather than a
stateful generator, so every augmentation or generated item is a pure function of its
keys: identical on CPU and GPU, on every machine, and after resuming a killed run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # < 2**31, so x * _MULT never overflows int64 for 32-bit x
_GOLDEN = 0x9E3779B9


def _mix32(x: Tensor | int) -> Tensor | int:
    """A 32-bit integer avalanche hash of values in [0, 2**32): int64 tensors or Python ints,
    with identical results (no product exceeds 2**63)."""
    x = x ^ (x >> 16)
    x = (x * _MULT) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MULT) & _MASK32
    return x ^ (x >> 16)


def hash_keys(*keys: int | Tensor, device: torch.device | str | None = None) -> Tensor:
    """Hash a sequence of integer keys (ints or int tensors, broadcast) to 32-bit values.

    Python-int keys are mixed on the host and enter tensor arithmetic as scalars, so no key
    ever becomes a device tensor of its own: on CUDA that would be a blocking host-to-device
    copy per key, several per training step.
    """
    h: Tensor | int = 0
    for key in keys:
        h = _mix32(((h ^ (key & _MASK32)) + _GOLDEN) & _MASK32)
    if isinstance(h, Tensor):
        return h
    if device is None:
        device = "cpu"
    return torch.tensor(h, dtype=torch.int64, device=device)


def hash_uniform(*keys: int | Tensor, device: torch.device | str | None = None) -> Tensor:
    """Uniform float32 in [0, 1), a pure function of the integer keys."""
    return (hash_keys(*keys, device=device).double() / 2.0**32).float()


def hash_int(low: int, high: int, *keys: int | Tensor, device: torch.device | str | None = None) -> Tensor:
    """Uniform integer in [low, high] inclusive, a pure function of the keys."""
    span = high - low + 1
    return (hash_keys(*keys, device=device) % span) + low


def translate(images: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """Shift each image by integer (dx, dy) pixels, filling with zeros (pixels leave the frame).

    Shapes: images [B, C, H, W]; dx, dy [B] (positive = right/down) -> [B, C, H, W].
    """
    batch, channels, height, width = images.shape
    rows = torch.arange(height, device=images.device).unsqueeze(0) - dy.view(-1, 1)  # (B, H)
    cols = torch.arange(width, device=images.device).unsqueeze(0) - dx.view(-1, 1)  # (B, W)
    valid = ((rows >= 0) & (rows < height)).view(batch, 1, height, 1) & (
        (cols >= 0) & (cols < width)
    ).view(batch, 1, 1, width)
    rows = rows.clamp(0, height - 1).view(batch, 1, height, 1).expand(batch, channels, height, width)
    cols = cols.clamp(0, width - 1).view(batch, 1, 1, width).expand(batch, channels, height, width)
    out = images.gather(2, rows).gather(3, cols)
    return out * valid.to(out.dtype)


def center_on_canvas(images: Tensor, size: int) -> Tensor:
    """Zero-pad [B, C, h, w] images to a centred size×size canvas."""
    height, width = images.shape[-2:]
    top, left = (size - height) // 2, (size - width) // 2
    return F.pad(images, (left, size - width - left, top, size - height - top))


def random_shift(images: Tensor, max_shift: int, seed: int, *keys: int | Tensor) -> Tensor:
    """Shift each image by a uniform integer in [-max_shift, max_shift] per axis.

    ``keys`` (e.g. epoch and per-example index) make the draw a pure function.
    """
    if max_shift == 0:
        return images
    dx = hash_int(-max_shift, max_shift, seed, *keys, 0, device=images.device)
    dy = hash_int(-max_shift, max_shift, seed, *keys, 1, device=images.device)
    return translate(images, dx.expand(images.shape[0]), dy.expand(images.shape[0]))


def to_float_images(images: Tensor) -> Tensor:
    """uint8 [B, H, W] or [B, C, H, W] → float32 [B, C, H, W] in [0, 1]."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
