"""Learning-rate schedules, stepped every training step (``optim.schedule``: conf/optim/)."""

from __future__ import annotations

import math

import torch


def exponential_decay(
    optimizer: torch.optim.Optimizer, *, rate: float, steps: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """lr · rate^(step / steps), applied every step (the official code's continuous decay:
    0.96 every 2,000 steps for MNIST, 20,000 for MultiMNIST)."""
    rate, steps = float(rate), float(steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: math.pow(rate, step / steps))


def constant(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """No decay."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
