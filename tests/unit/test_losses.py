"""Margin and reconstruction losses against values computed by hand."""

from __future__ import annotations

import pytest
import torch

from capsnet.nn.losses import margin_loss, reconstruction_loss

LENGTHS = torch.tensor([[0.95, 0.2, 0.05], [0.5, 0.7, 0.0]])


def test_margin_loss_class_indices_by_hand() -> None:
    # example 0, label 0: present 0; absent: 0.5·(0.2−0.1)² = 0.005, 0  → 0.005
    # example 1, label 1: present (0.9−0.7)² = 0.04; absent 0.5·(0.5−0.1)² = 0.08 → 0.12
    loss = margin_loss(LENGTHS, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx((0.005 + 0.12) / 2)


def test_margin_loss_multi_hot_by_hand() -> None:
    # both 0 and 1 present: (0.9−0.95)_+² = 0, (0.9−0.2)² = 0.49; class 2 absent: 0
    # second: (0.9−0.5)² = 0.16, (0.9−0.7)² = 0.04, class 2: 0
    targets = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert margin_loss(LENGTHS, targets).item() == pytest.approx((0.49 + 0.20) / 2)


def test_margin_loss_constants_and_official_scaling() -> None:
    loss = margin_loss(LENGTHS, torch.tensor([0, 1]), m_pos=1.0, m_neg=0.0, lam=1.0)
    # ex0: (1−0.95)² + 0.2² + 0.05² = 0.0025+0.04+0.0025 ; ex1: 0.5² + 0.3² + 0 = 0.34
    assert loss.item() == pytest.approx((0.045 + 0.34) / 2)
    official = margin_loss(LENGTHS, torch.tensor([0, 1]), official_scaling=True)
    assert official.item() == pytest.approx((0.005 / 3 / 2 + 0.12 / 3 / 2) / 2)


def test_reconstruction_loss_is_scaled_sse() -> None:
    recon = torch.ones(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    target[1] = 0.5  # SSE 4 and 1 → mean 2.5
    assert reconstruction_loss(recon, target).item() == pytest.approx(0.0005 * 2.5)


def test_margin_loss_accepts_label_pairs() -> None:
    pairs = torch.tensor([[0, 1], [1, 0]])
    multi_hot = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert margin_loss(LENGTHS, pairs).item() == pytest.approx(margin_loss(LENGTHS, multi_hot).item())
