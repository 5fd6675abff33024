"""Each figure has the shape the paper's figure has."""

from __future__ import annotations

from pathlib import Path

import torch

from capsnet.nn.models import CapsNet
from capsnet.reporting.figures import (
    PERTURBATIONS,
    dimension_perturbation,
    overlay_reconstructions,
    reconstructions_beside_inputs,
    routing_convergence,
    write_run_figures,
)


def test_perturbation_steps() -> None:
    assert len(PERTURBATIONS) == 11
    torch.testing.assert_close(PERTURBATIONS[[0, 5, 10]], torch.tensor([-0.25, 0.0, 0.25]))


def test_dimension_perturbation_is_16_by_11() -> None:
    torch.manual_seed(0)
    net = CapsNet(routing_iterations=1).eval()
    decoded = dimension_perturbation(net, torch.rand(1, 1, 28, 28))
    assert decoded.shape == (16 * 11, 1, 28, 28)
    # the middle column (delta 0) is the unperturbed reconstruction for every dimension
    middle = decoded.view(16, 11, 1, 28, 28)[:, 5]
    torch.testing.assert_close(middle, middle[:1].expand_as(middle))
    assert not torch.allclose(decoded.view(16, 11, -1)[:, 0], decoded.view(16, 11, -1)[:, 10])


def test_reconstruction_grid_shape() -> None:
    net = CapsNet(routing_iterations=1).eval()
    image = reconstructions_beside_inputs(net, torch.rand(5, 1, 28, 28))
    assert image.shape == (3, 2 * 28 + 3 * 2, 5 * 28 + 6 * 2)


def test_routing_convergence_per_iteration() -> None:
    torch.manual_seed(0)
    changes = routing_convergence(CapsNet(routing_iterations=3).eval(), torch.rand(2, 1, 28, 28), max_iterations=10)
    assert changes.shape == (9,)
    assert (changes >= 0).all() and changes[0] > 0


def test_overlay_colours() -> None:
    zeros = torch.zeros(2, 1, 8, 8)
    ones = torch.ones(2, 1, 8, 8)
    out = overlay_reconstructions(zeros, ones, zeros)
    assert out.shape == (2, 3, 8, 8)
    assert (out[:, 0] > out[:, 1]).all()  # first digit in red


def test_run_figures_written(tmp_path: Path) -> None:
    net = CapsNet(routing_iterations=2).eval()
    batches = {"test": (torch.rand(8, 1, 28, 28), torch.arange(8))}
    names = {p.name for p in write_run_figures(net, batches, tmp_path, "single")}
    assert names == {"samples_test.png", "reconstructions.png", "dimension_perturbation.png", "routing_convergence.png"}
    multi = CapsNet(input_size=36, routing_iterations=1).eval()
    parts = torch.rand(4, 2, 1, 36, 36)
    names = {
        p.name for p in write_run_figures(multi, {"test": (parts.sum(1).clamp(max=1), None, parts)}, tmp_path, "multi")
    }
    assert names == {"samples_test.png", "samples_test_parts.png", "reconstructions_multimnist.png"}
