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
    valid = ((rows >= 0) & (rows < height)).view(batch, 1, height, 1) & ((cols >= 0) & (cols < width)).view(
        batch, 1, 1, width
    )
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


def crop(images: Tensor, top: Tensor, left: Tensor, size: int) -> Tensor:
    """A size×size window of each image at its own (top, left).

    Shapes: images [B, C, H, W]; top, left [B] -> [B, C, size, size].
    """
    batch, channels, _, width = images.shape
    offsets = torch.arange(size, device=images.device)
    rows = (top.view(-1, 1) + offsets).view(batch, 1, size, 1).expand(batch, channels, size, width)
    cols = (left.view(-1, 1) + offsets).view(batch, 1, 1, size).expand(batch, channels, size, size)
    return images.gather(2, rows).gather(3, cols)


def center_crop(images: Tensor, size: int) -> Tensor:
    """The central size×size patch (the test-time view of a random-crop protocol)."""
    height, width = images.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top : top + size, left : left + size]


def random_crop(images: Tensor, size: int, seed: int, *keys: int | Tensor) -> Tensor:
    """A uniformly placed size×size window per image, a pure function of the keys."""
    height, width = images.shape[-2:]
    batch = images.shape[0]
    top = hash_int(0, height - size, seed, *keys, 2, device=images.device).expand(batch)
    left = hash_int(0, width - size, seed, *keys, 3, device=images.device).expand(batch)
    return crop(images, top, left, size)


def random_flip(images: Tensor, seed: int, *keys: int | Tensor) -> Tensor:
    """Mirror left-right with probability 1/2 per image."""
    flip = hash_int(0, 1, seed, *keys, 4, device=images.device).bool().view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


def random_brightness_contrast(
    images: Tensor, max_delta: float, contrast: tuple[float, float], seed: int, *keys: int | Tensor
) -> Tensor:
    """TensorFlow's random_brightness then random_contrast, per image: add a uniform
    delta in [-max_delta, max_delta], then scale each channel about its mean by a factor
    uniform in ``contrast``."""
    delta = (hash_uniform(seed, *keys, 5, device=images.device) * 2 - 1) * max_delta
    images = images + delta.view(-1, 1, 1, 1)
    low, high = contrast
    factor = (low + hash_uniform(seed, *keys, 6, device=images.device) * (high - low)).view(-1, 1, 1, 1)
    mean = images.mean(dim=(2, 3), keepdim=True)
    return (images - mean) * factor + mean


def standardize(images: Tensor) -> Tensor:
    """TensorFlow's per_image_standardization: zero mean, unit variance per image, the
    standard deviation floored at 1/sqrt(pixels) so a flat image does not divide by 0."""
    count = images[0].numel()
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    std = images.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
    return (images - mean) / std.clamp(min=count**-0.5)
