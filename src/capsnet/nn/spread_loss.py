"""Spread loss and its margin schedule ("Matrix capsules with EM routing", Hinton, Sabour,
Frosst, ICLR 2018, the spread-loss subsection).

    L = Σ_{i ≠ t} max(0, m − (a_t − a_i))²

for the target class t and class activations a: every wrong class is pushed at least m
below the target.  The paper starts the margin at 0.2 and increases it linearly to 0.9
during training, to avoid dead capsules in the earlier layers, without saying over how
many steps (``spread_margin``: ``ramp_steps`` must be chosen).  The official code
(google-research/google-research ``capsule_em/layers.py``, ``optimizer`` and
``order_loss``) uses a sigmoid schedule instead, 0.2 + 0.79·sigmoid(min(10, step/50000 − 4))
(``official_spread_margin``: 0.214 at step 0, 0.595 at 200K, 0.9 near 302K, 0.990 from
700K on), and averages the per-class terms over the classes as well as the batch
(``official_scaling``: L / K).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def spread_loss(activations: Tensor, targets: Tensor, margin: float | Tensor, official_scaling: bool = False) -> Tensor:
    """Σ_{i≠t} max(0, m − (a_t − a_i))², averaged over the batch (and over the K classes
    with ``official_scaling``, as the official code's ``tf.reduce_mean``).

    Shapes:
        activations: [B, K]; targets: [B] class indices or [B, K] one-hot -> scalar.
    """
    if targets.dim() == 1:
        one_hot = F.one_hot(targets.long(), activations.shape[1]).to(activations.dtype)
    else:
        one_hot = targets.to(activations.dtype)
    target_a = (one_hot * activations).sum(dim=1, keepdim=True)  # a_t
    per_class = (1.0 - one_hot) * F.relu(margin - (target_a - activations)).pow(2)
    per_example = per_class.mean(dim=1) if official_scaling else per_class.sum(dim=1)
    return per_example.mean()


def spread_margin(step: int | float, start: float = 0.2, end: float = 0.9, *, ramp_steps: int) -> float:
    """The paper's schedule: ``start`` at step 0, linearly to ``end`` at ``ramp_steps``, then
    ``end`` (the ramp's length is not in the paper)."""
    if ramp_steps <= 0:
        raise ValueError(f"spread_margin: ramp_steps must be positive, got {ramp_steps}")
    return start + (end - start) * min(1.0, max(0.0, step / ramp_steps))


def official_spread_margin(step: int | float) -> float:
    """The official code's schedule: 0.2 + 0.79 · sigmoid(min(10, step / 50000 − 4))."""
    x = min(10.0, step / 50000.0 - 4.0)
    return 0.2 + 0.79 / (1.0 + math.exp(-x))


def spread_loss_with_schedule(
    activations: Tensor, targets: Tensor, step: int, *, schedule: str = "official", ramp_steps: int | None = None
) -> Tensor:
    """Spread loss at the margin of ``step``: schedule "official" (sigmoid, official code's
    class-averaged loss) or "linear" (the paper's 0.2 → 0.9 over ``ramp_steps``, summed)."""
    if schedule == "official":
        return spread_loss(activations, targets, official_spread_margin(step), official_scaling=True)
    if schedule == "linear":
        if ramp_steps is None:
            raise ValueError("spread loss: the linear schedule needs ramp_steps (the paper does not give it)")
        return spread_loss(activations, targets, spread_margin(step, ramp_steps=ramp_steps))
    raise ValueError(f"spread loss: schedule must be 'official' or 'linear', got {schedule!r}")


__all__ = ["official_spread_margin", "spread_loss", "spread_loss_with_schedule", "spread_margin"]
