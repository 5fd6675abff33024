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


def _hand_sse_loss(reconstructions: torch.Tensor, images: torch.Tensor, weight: float = 0.0005) -> float:
    """weight · mean over images of the sum of squared pixel errors, in Python floats (float64)."""
    per_image = [
        sum((r - i) ** 2 for r, i in zip(rec.flatten().tolist(), img.flatten().tolist(), strict=True))
        for rec, img in zip(reconstructions, images, strict=True)
    ]
    return weight * sum(per_image) / len(per_image)


def test_reconstruction_loss_of_a_float64_model_is_float64() -> None:
    generator = torch.Generator().manual_seed(0)
    recon = torch.rand(3, 1, 28, 28, dtype=torch.float64, generator=generator)
    images = torch.rand(3, 1, 28, 28, dtype=torch.float64, generator=generator)
    loss = reconstruction_loss(recon, images)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(_hand_sse_loss(recon, images), rel=1e-13)  # float32 is off by ~1e-7
    half = reconstruction_loss(recon.bfloat16(), images.bfloat16())
    assert half.dtype == torch.float32  # never summed in bfloat16's 8 bits


def test_the_module_computes_the_reconstruction_loss_in_float64_under_64_true() -> None:
    """``trainer.precision=64-true`` casts the module with ``.double()``; the data's float32
    images meet float64 reconstructions."""
    from capsnet.run.module import CapsNetModule

    module = CapsNetModule(
        model={
            "_target_": "capsnet.nn.models.CapsNet",
            "name": "capsnet",
            "conv1_channels": 16,
            "primary_types": 4,
        },
        data={"image_size": 28, "in_channels": 1, "num_classes": 10, "task": "single"},
        loss={
            "m_pos": 0.9,
            "m_neg": 0.1,
            "lam": 0.5,
            "recon_weight": 0.0005,
            "official_scaling": False,
            "mask_with_label_at_test": False,
        },
        optim={"lr": 0.001, "decay_rate": 0.96, "decay_steps": 2000},
    ).double()
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        _, parts = module.objective(module.net, images.double(), labels, None, training=True, step=0)
        poses, _ = module.net.encode(images.double())
        expected = _hand_sse_loss(module.net.reconstruct(poses, labels), images.double())
    assert parts["recon"].dtype == torch.float64
    assert parts["recon"].item() == pytest.approx(expected, rel=1e-13)
