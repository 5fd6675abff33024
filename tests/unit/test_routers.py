"""Every router (each conf/routing/*.yaml) passes the same checks: shapes, couplings that
are a distribution over the parents where the algorithm says so, gradients that reach the
votes (and the inputs and every parameter), no NaN at zero input, and batch independence:
an example's output does not depend on the other examples of its batch (the bug of ports
that share routing logits across the batch).  Adding a router = one class + one YAML; this
test picks the YAML up by itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from capsnet.nn.routing import Routed, Router

CONF = Path(__file__).resolve().parents[2] / "conf" / "routing"
ROUTERS = sorted(p.stem for p in CONF.glob("*.yaml"))
SHAPES = {"in_caps": 12, "out_caps": 4, "in_dim": 8, "out_dim": 16}


def build(name: str) -> Router:
    factory = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    router = factory(**SHAPES).double()
    assert isinstance(router, Router) and router.name == name, f"{name}.yaml must build a Router named {name!r}"
    return router


def route(router: Router, votes: torch.Tensor, inputs: torch.Tensor) -> Routed:
    return router(votes, inputs if router.needs_inputs else None)


def inputs_and_votes(batch: int, seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, SHAPES["in_caps"], SHAPES["in_dim"], generator=generator, dtype=torch.float64)
    votes = torch.randn(
        batch, SHAPES["in_caps"], SHAPES["out_caps"], SHAPES["out_dim"], generator=generator, dtype=torch.float64
    )
    return scale * inputs, scale * votes


def test_every_router_has_a_config() -> None:
    assert {"dynamic", "uniform", "self_attention", "inverted_dot_product", "self_routing", "em"} <= set(ROUTERS)


@pytest.mark.parametrize("name", ROUTERS)
def test_shapes_and_couplings(name: str) -> None:
    router = build(name)
    inputs, votes = inputs_and_votes(5)
    out = route(router, votes, inputs)
    assert out.poses.shape == (5, SHAPES["out_caps"], SHAPES["out_dim"])
    if out.activations is not None:
        assert out.activations.shape == (5, SHAPES["out_caps"])
    if out.couplings is not None:
        assert out.couplings.shape == (5, SHAPES["in_caps"], SHAPES["out_caps"])
        if router.couplings_sum_to_one:
            torch.testing.assert_close(out.couplings.sum(-1), torch.ones(5, SHAPES["in_caps"], dtype=torch.float64))
            assert (out.couplings >= 0).all()


@pytest.mark.parametrize("name", ROUTERS)
def test_gradients_reach_votes_inputs_and_every_parameter(name: str) -> None:
    router = build(name)
    inputs, votes = inputs_and_votes(3)
    inputs.requires_grad_(True)
    votes.requires_grad_(True)
    out = route(router, votes, inputs)
    scores = out.activations if out.activations is not None else out.poses.norm(dim=-1)
    weights = torch.arange(1, SHAPES["out_caps"] + 1, dtype=torch.float64)
    ((scores * weights).sum() + out.poses.pow(2).sum()).backward()  # the class scores and the poses (the decoder's)
    assert votes.grad is not None and votes.grad.abs().sum() > 0
    if router.needs_inputs:
        assert inputs.grad is not None and inputs.grad.abs().sum() > 0
    for pname, parameter in router.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), pname


@pytest.mark.parametrize("name", ROUTERS)
def test_no_nan_at_zero_input(name: str) -> None:
    router = build(name)
    inputs, votes = inputs_and_votes(2, scale=0.0)
    inputs.requires_grad_(True)
    votes.requires_grad_(True)
    out = route(router, votes, inputs)
    for tensor in (out.poses, out.couplings, out.activations):
        assert tensor is None or torch.isfinite(tensor).all()
    out.poses.sum().backward()
    assert torch.isfinite(votes.grad).all() and (inputs.grad is None or torch.isfinite(inputs.grad).all())


@pytest.mark.parametrize("name", ROUTERS)
def test_an_examples_output_does_not_depend_on_its_batch(name: str) -> None:
    router = build(name)
    inputs, votes = inputs_and_votes(6, seed=1)
    together = route(router, votes, inputs)
    for k in range(6):
        alone = route(router, votes[k : k + 1], inputs[k : k + 1])
        torch.testing.assert_close(alone.poses[0], together.poses[k], rtol=1e-10, atol=1e-12)
        if alone.couplings is not None:
            torch.testing.assert_close(alone.couplings[0], together.couplings[k], rtol=1e-10, atol=1e-12)
    # and changing the others changes nothing for example 0
    other_inputs, other_votes = inputs_and_votes(6, seed=2)
    other_inputs[0], other_votes[0] = inputs[0], votes[0]
    torch.testing.assert_close(route(router, other_votes, other_inputs).poses[0], together.poses[0])
