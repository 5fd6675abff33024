"""Spread loss and its margin schedules against hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from capsnet.nn.spread_loss import official_spread_margin, spread_loss, spread_loss_with_schedule, spread_margin

A = torch.tensor([[0.9, 0.5, 0.2], [0.3, 0.6, 0.65]], dtype=torch.float64)
T = torch.tensor([0, 1])


def test_spread_loss_hand_computed() -> None:
    # example 0 (t = 0), m = 0.9: a_t − a_i = 0.4, 0.7 -> (0.5)² + (0.2)² = 0.29
    # example 1 (t = 1), m = 0.9: a_t − a_i = 0.3, −0.05 -> (0.6)² + (0.95)² = 1.2625
    loss = spread_loss(A, T, 0.9)
    assert loss.item() == pytest.approx((0.29 + 1.2625) / 2, rel=1e-12)
    # m = 0.2: example 0 has every wrong class ≥ 0.4 below: 0; example 1: 0 + (0.25)² = 0.0625
    assert spread_loss(A, T, 0.2).item() == pytest.approx(0.0625 / 2, rel=1e-12)
    # official scaling: also averaged over the K = 3 classes
    assert spread_loss(A, T, 0.9, official_scaling=True).item() == pytest.approx((0.29 + 1.2625) / 6, rel=1e-12)
    # one-hot targets give the same
    one_hot = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)
    assert spread_loss(A, one_hot, 0.9).item() == pytest.approx(spread_loss(A, T, 0.9).item(), rel=1e-15)


def test_the_target_class_adds_no_term() -> None:
    """Σ over i ≠ t only: with a_t − a_i ≥ m for every wrong class the loss is 0, although the
    target's own (m − 0)² would be m²."""
    a = torch.tensor([[0.95, 0.05, 0.0]])
    assert spread_loss(a, torch.tensor([0]), 0.9).item() == 0.0
    # target 1: 0.9 − (0.05 − 0.95) = 1.8 and 0.9 − (0.05 − 0) = 0.85
    assert spread_loss(a, torch.tensor([1]), 0.9).item() == pytest.approx(1.8**2 + 0.85**2, rel=1e-6)


def test_spread_loss_gradient_hand_computed() -> None:
    a = A[:1].clone().requires_grad_(True)
    spread_loss(a, T[:1], 0.9).backward()
    # d/da_0 = −2(0.5) − 2(0.2) = −1.4; d/da_1 = 2(0.5) = 1.0; d/da_2 = 2(0.2) = 0.4
    torch.testing.assert_close(a.grad, torch.tensor([[-1.4, 1.0, 0.4]], dtype=torch.float64))


def test_tensor_margin() -> None:
    assert spread_loss(A, T, torch.tensor(0.9, dtype=torch.float64)).item() == pytest.approx(
        spread_loss(A, T, 0.9).item(), rel=1e-15
    )


def test_paper_linear_margin_schedule() -> None:
    assert spread_margin(0, ramp_steps=1000) == pytest.approx(0.2)
    assert spread_margin(500, ramp_steps=1000) == pytest.approx(0.55)
    assert spread_margin(1000, ramp_steps=1000) == pytest.approx(0.9)
    assert spread_margin(5000, ramp_steps=1000) == pytest.approx(0.9)
    assert spread_margin(250, start=0.0, end=1.0, ramp_steps=1000) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="ramp_steps must be positive"):
        spread_margin(0, ramp_steps=0)


def test_official_margin_schedule() -> None:
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert official_spread_margin(0) == pytest.approx(0.2 + 0.79 * sig(-4))  # 0.2142
    assert official_spread_margin(0) == pytest.approx(0.214209, abs=1e-6)
    assert official_spread_margin(200_000) == pytest.approx(0.595)  # sigmoid(0) = 1/2
    assert official_spread_margin(302_600) == pytest.approx(0.9, abs=1e-3)
    assert official_spread_margin(700_000) == pytest.approx(0.2 + 0.79 * sig(10))
    assert official_spread_margin(5_000_000) == official_spread_margin(700_000)  # min(10, ·) caps it
    steps = [0, 50_000, 100_000, 300_000, 600_000]
    assert all(official_spread_margin(a) < official_spread_margin(b) for a, b in itertools.pairwise(steps))


def test_schedule_dispatch() -> None:
    official = spread_loss_with_schedule(A, T, 200_000)
    assert official.item() == pytest.approx(spread_loss(A, T, 0.595, official_scaling=True).item(), rel=1e-12)
    linear = spread_loss_with_schedule(A, T, 500, schedule="linear", ramp_steps=1000)
    assert linear.item() == pytest.approx(spread_loss(A, T, 0.55).item(), rel=1e-12)
    with pytest.raises(ValueError, match="needs ramp_steps"):
        spread_loss_with_schedule(A, T, 0, schedule="linear")
    with pytest.raises(ValueError, match="schedule must be"):
        spread_loss_with_schedule(A, T, 0, schedule="cosine")
