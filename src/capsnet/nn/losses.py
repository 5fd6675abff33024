"""Margin loss (Eq. 4) and the scaled reconstruction loss (§4.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

RECON_WEIGHT = 0.0005  # §4.1: "scaled down by 0.0005"


def as_multi_hot(targets: Tensor, num_classes: int) -> Tensor:
    """Targets as a float [B, K] multi-hot matrix.

    Accepts class indices [B], sets of class indices [B, k] (integer, e.g. the two digits
    of a MultiMNIST image) or an already multi-hot float [B, K].
    """
    if targets.dim() == 1:
        return F.one_hot(targets.long(), num_classes).float()
    if not targets.is_floating_point():
        return torch.zeros(targets.shape[0], num_classes, device=targets.device).scatter_(1, targets.long(), 1.0)
    return targets.float()


def margin_loss(
    lengths: Tensor,
    targets: Tensor,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lam: float = 0.5,
    official_scaling: bool = False,
) -> Tensor:
    """L_k = T_k max(0, m⁺ − |v_k|)² + λ (1 − T_k) max(0, |v_k| − m⁻)² (Eq. 4).

    Summed over classes k and averaged over the batch.  ``official_scaling`` reproduces
    the official code instead: mean over classes, then halved (20× weaker vs. recon).

    Shapes:
        lengths: [B, K]; targets: [B] class indices or [B, K] multi-hot -> scalar.
    """
    t = as_multi_hot(targets, lengths.shape[1]).to(lengths.dtype)
    present = t * F.relu(m_pos - lengths).pow(2)
    absent = lam * (1.0 - t) * F.relu(lengths - m_neg).pow(2)
    per_class = present + absent
    per_example = 0.5 * per_class.mean(dim=1) if official_scaling else per_class.sum(dim=1)
    return per_example.mean()


def reconstruction_loss(reconstructions: Tensor, images: Tensor, weight: float = RECON_WEIGHT) -> Tensor:
    """``weight`` × sum of squared pixel errors per image, averaged over the batch.

    Computed in the wider of the two dtypes, never below float32: float64 for a float64
    model (``trainer.precision=64-true``), float32 for float32, bfloat16 and float16 ones
    (a sum of hundreds of squares in 8 or 11 significant bits would lose digits).

    Shapes: reconstructions, images: [B, C, H, W] -> scalar.
    """
    dtype = torch.promote_types(torch.promote_types(reconstructions.dtype, images.dtype), torch.float32)
    sse = (reconstructions.to(dtype) - images.to(dtype)).pow(2).flatten(1).sum(dim=1)
    return weight * sse.mean()


__all__ = ["RECON_WEIGHT", "as_multi_hot", "margin_loss", "reconstruction_loss"]
