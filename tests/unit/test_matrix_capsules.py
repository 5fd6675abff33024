"""The matrix-capsule network: parameter counts against the paper, votes and coordinate
addition against loops, forward/backward, batch independence, and its config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from capsnet.nn.matrix_capsules import (
    ConvMatrixCaps,
    MatrixCapsulesEM,
    coordinate_offsets,
    receptive_field_centres,
)
from capsnet.nn.routing.em import EMResult

CONF = Path(__file__).resolve().parents[2] / "conf"
TINY = {"conv_channels": 8, "primary_types": 4, "caps_types": (4, 4)}  # fast on CPU


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def hand_count(a: int, b: int, c: int, d: int, channels: int = 2, classes: int = 5) -> int:
    """The paper's network on 32×32 pairs, layer by layer."""
    conv1 = 5 * 5 * channels * a + a  # 5×5 kernels and biases
    primary = a * b * 16 + a * b  # 1×1 pose (4×4) and activation weights, no biases (official code)
    conv_caps1 = 3 * 3 * b * c * 16 + 2 * c  # a 4×4 W per (kernel offset, child type, parent type); β_u, β_a per type
    conv_caps2 = 3 * 3 * c * d * 16 + 2 * d
    class_caps = d * classes * 16 + 2 * classes  # W shared over positions; β_u, β_a per class
    return conv1 + primary + conv_caps1 + conv_caps2 + class_caps


def test_parameter_count_against_the_paper() -> None:
    # A = B = C = D = 32: 1,632 + 17,408 + 147,520 + 147,520 + 2,570 = 316,650; the paper: about 310K
    assert hand_count(32, 32, 32, 32) == 1_632 + 17_408 + 147_520 + 147_520 + 2_570 == 316_650
    assert count(MatrixCapsulesEM(input_size=32, in_channels=2, num_classes=5)) == 316_650
    assert abs(316_650 - 310_000) / 310_000 < 0.025
    # the paper's smaller network, A = 64, B = 8, C = D = 16: 68K
    small = MatrixCapsulesEM(conv_channels=64, primary_types=8, caps_types=(16, 16))
    assert count(small) == hand_count(64, 8, 16, 16) == 3_264 + 8_704 + 18_464 + 36_896 + 1_290 == 68_618
    assert abs(68_618 - 68_000) / 68_000 < 0.01
    # the count does not depend on the input size (shared class W, convolutional capsules)
    assert count(MatrixCapsulesEM(input_size=40, in_channels=1, num_classes=5)) == hand_count(32, 32, 32, 32, 1)


def test_forward_backward_tiny_batch() -> None:
    torch.manual_seed(0)
    model = MatrixCapsulesEM(input_size=32, in_channels=2, num_classes=5, **TINY)
    out = model(torch.randn(3, 2, 32, 32), torch.tensor([0, 1, 2]))
    assert out.lengths.shape == (3, 5) and out.poses.shape == (3, 5, 16) and out.reconstructions is None
    assert ((out.lengths > 0) & (out.lengths < 1)).all()
    (out.lengths.sum() + out.poses.pow(2).sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_full_size_forward_shapes() -> None:
    model = MatrixCapsulesEM()
    with torch.no_grad():
        out = model(torch.randn(1, 2, 32, 32))
    assert out.lengths.shape == (1, 5) and out.poses.shape == (1, 5, 16)
    assert torch.isfinite(out.lengths).all() and torch.isfinite(out.poses).all()
    # 32 → conv1 14 → primary 14 → ConvCaps1 6 → ConvCaps2 4 → 4·4·32 = 512 class-capsule children
    assert [layer.geometry.in_size[0] for layer in model.conv_caps] == [14, 6]
    assert model.conv_caps[1].out_size == 4 and model.class_caps.router.in_caps == 512


def test_batch_independence() -> None:
    torch.manual_seed(1)
    model = MatrixCapsulesEM(input_size=32, in_channels=2, num_classes=5, **TINY).double()
    x = torch.randn(4, 2, 32, 32, dtype=torch.float64)
    together = model(x)
    for b in range(4):
        alone = model(x[b : b + 1])
        torch.testing.assert_close(alone.lengths, together.lengths[b : b + 1], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(alone.poses, together.poses[b : b + 1], rtol=1e-12, atol=1e-14)


def _captured_route(layer: torch.nn.Module) -> dict:
    """Replace ``layer.router.route`` by a recorder that still routes."""
    seen: dict = {}
    original = layer.router.route

    def route(votes: torch.Tensor, activations: torch.Tensor, geometry=None) -> EMResult:
        seen.update(votes=votes, activations=activations, geometry=geometry)
        return original(votes, activations, geometry)

    layer.router.route = route  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_capsule_votes_against_loops(stride: int) -> None:
    layer = ConvMatrixCaps(2, 3, in_size=5, kernel=3, stride=stride).double()
    seen = _captured_route(layer)
    poses = torch.randn(2, 2, 5, 5, 16, dtype=torch.float64)
    acts = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    out_poses, out_a = layer(poses, acts)
    size = (5 - 3) // stride + 1
    assert out_poses.shape == (2, 3, size, size, 16) and out_a.shape == (2, 3, size, size)
    votes, window_a = seen["votes"], seen["activations"]
    w = layer.weight.detach()
    for b in range(2):
        for oh in range(size):
            for ow in range(size):
                for i in range(2):
                    for uh in range(3):
                        for uw in range(3):
                            child = poses[b, i, oh * stride + uh, ow * stride + uw].view(4, 4)
                            n, c = oh * size + ow, (i * 3 + uh) * 3 + uw
                            assert window_a[b, n, c] == acts[b, i, oh * stride + uh, ow * stride + uw]
                            for j in range(3):
                                expected = (child @ w[i, uh, uw, j]).reshape(16)  # pose @ W
                                torch.testing.assert_close(votes[b, n, c, j], expected, rtol=1e-12, atol=1e-14)
    # the routed output is laid out [B, J, H', W']: parent (j, oh, ow) = routed[b, oh·size + ow, j]
    routed = layer.router.route(votes, window_a, seen["geometry"])
    torch.testing.assert_close(out_a[1, 2, size - 1, 0], routed.activations[1, (size - 1) * size, 2])
    torch.testing.assert_close(out_poses[0, 1, 0, size - 1], routed.poses[0, size - 1, 1])


def test_class_capsule_votes_with_coordinate_addition_against_loops() -> None:
    model = MatrixCapsulesEM(input_size=32, in_channels=1, num_classes=3, **TINY).double()
    seen = _captured_route(model.class_caps)
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64)
    model(x)
    # the class layer's inputs, recomputed
    poses, acts = model.primary(torch.relu(model.conv1(x)))
    for layer in model.conv_caps:
        poses, acts = layer(poses, acts)
    votes, children_a = seen["votes"], seen["activations"]
    assert votes.shape == (1, 1, 4 * 4 * 4, 3, 16)
    centres = [-0.08, -0.04, 0.0, 0.04]  # receptive-field centres 8, 12, 16, 20 px, minus 16, / 100
    w = model.class_caps.weight.detach()
    for i in range(4):
        for h in range(4):
            for col in range(4):
                child = (i * 4 + h) * 4 + col  # children ordered (type, row, column)
                assert children_a[0, 0, child] == acts[0, i, h, col]
                for j in range(3):
                    expected = (poses[0, i, h, col].view(4, 4) @ w[i, j]).reshape(16).clone()
                    expected[0] += centres[col]  # official: column -> element 0
                    expected[1] += centres[h]  # row -> element 1
                    torch.testing.assert_close(votes[0, 0, child, j], expected, rtol=1e-12, atol=1e-14)


def test_receptive_field_centres_match_the_official_position_grid() -> None:
    """The official ``conv_pos`` averages the position grid over every kernel window; an
    average pool over np.mgrid's coordinates does the same."""
    layers = [(5, 2), (3, 2), (3, 1)]
    grid = torch.arange(-16, 16, dtype=torch.float64).view(1, 1, 32)  # mgrid[-16:16] for 32 pixels
    for kernel, stride in layers:
        grid = F.avg_pool1d(grid, kernel, stride)
    np.testing.assert_allclose(
        (receptive_field_centres(32, layers) - 16).numpy(), grid.view(-1).numpy(), rtol=0, atol=1e-12
    )
    assert receptive_field_centres(32, layers).tolist() == [8.0, 12.0, 16.0, 20.0]


def test_coordinate_addition_modes() -> None:
    layers = [(5, 2), (3, 2), (3, 1)]
    official = coordinate_offsets(32, layers, "official").view(4, 4, 16)
    paper = coordinate_offsets(32, layers, "paper").view(4, 4, 16)
    assert official[2, 3, 0].item() == pytest.approx(0.04) and official[2, 3, 1].item() == pytest.approx(0.0)
    assert paper[2, 3, 3].item() == pytest.approx(0.0) and paper[2, 3, 7].item() == pytest.approx(0.04)
    assert (
        official[..., 2:].abs().sum() == 0
        and paper[..., [0, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15]].abs().sum() == 0
    )
    assert coordinate_offsets(32, layers, "none").abs().sum() == 0
    with pytest.raises(ValueError, match="coordinate_addition must be one of"):
        coordinate_offsets(32, layers, "both")


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="too small"):
        MatrixCapsulesEM(input_size=12, **TINY)
    with pytest.raises(ValueError, match="task must be"):
        MatrixCapsulesEM(task="regression", **TINY)


def test_config_builds_the_paper_network() -> None:
    cfg = OmegaConf.load(CONF / "model" / "matrix_capsules_em.yaml")
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "name"}
    model = instantiate(kwargs, input_size=32, in_channels=2, num_classes=5, task="single", _convert_="all")
    assert isinstance(model, MatrixCapsulesEM) and count(model) == 316_650
    assert cfg.name == "matrix_capsules_em"
