"""Self-routing against an independent float64 reference.

The reference below is written from the official code, coder3000/SR-CapsNet, file
``modules.py``, class ``SelfRouting2d``, method ``forward``, for one output position (the
class layer there has a kernel as large as its input and no padding: every child feeds every
parent), transcribed to plain loops over examples, children and parents:

* logit_ij = Σ_c W2[i, j, c] u_ic + b2[i, j]  (``torch.matmul(self.W2, pose) + self.b2``);
* r_i = softmax over the parents j (``torch.softmax(logit, dim=3)``, dim 3 = B, the parents);
* ar_ij = a_i r_ij; parent activation Σ_i ar_ij / Σ_i a_i (``ar_sum / a.sum(dim=2)``);
* parent pose Σ_i (ar_ij / Σ_i' ar_i'j) û_{j|i} (the ``pose_out=True`` branch, where the
  official votes are ``W1 @ pose``; ours come from the owning layer).

Child activations a_i: the official models feed sigmoid(BN(conv)) from a separate branch; the
router derives them from the child capsules as sqrt(|u_i|² + eps) by default (or 1), and the
reference does the same.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from capsnet.nn.routing.base import Routed
from capsnet.nn.routing.self_routing import SelfRouting

CONF = Path(__file__).resolve().parents[2] / "conf" / "routing" / "self_routing.yaml"
ORACLE_ATOL = 1e-12  # float64 agreement with the loop-by-loop reference (observed: <= 1e-15)


def reference_routing(
    votes: np.ndarray,
    inputs: np.ndarray,
    w2: np.ndarray,
    b2: np.ndarray,
    child_activation: str = "length",
    given_activations: np.ndarray | None = None,
    eps: float = 1e-8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One example at a time, one child and one parent at a time, float64."""
    batch, children, parents, dim = votes.shape
    in_dim = inputs.shape[2]
    poses = np.zeros((batch, parents, dim))
    routing = np.zeros((batch, children, parents))
    activations = np.zeros((batch, parents))
    for b in range(batch):
        a = np.zeros(children)
        for i in range(children):
            if given_activations is not None:
                a[i] = given_activations[b, i]
            elif child_activation == "ones":
                a[i] = 1.0
            else:
                a[i] = math.sqrt(sum(inputs[b, i, c] ** 2 for c in range(in_dim)) + eps)
            logits = [sum(w2[i, j, c] * inputs[b, i, c] for c in range(in_dim)) + b2[i, j] for j in range(parents)]
            top = max(logits)
            expd = [math.exp(x - top) for x in logits]
            for j in range(parents):
                routing[b, i, j] = expd[j] / sum(expd)
        for j in range(parents):
            ar = [a[i] * routing[b, i, j] for i in range(children)]
            ar_sum = sum(ar)
            activations[b, j] = ar_sum / sum(a)
            for d in range(dim):
                poses[b, j, d] = sum(ar[i] / ar_sum * votes[b, i, j, d] for i in range(children))
    return poses, routing, activations


def make_router(
    children: int = 7, parents: int = 4, in_dim: int = 5, dim: int = 6, seed: int = 0, **kwargs
) -> SelfRouting:
    """A float64 router with random routing weights (the official zero init routes uniformly)."""
    router = SelfRouting(in_caps=children, out_caps=parents, in_dim=in_dim, out_dim=dim, **kwargs).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(children, parents, in_dim, generator=gen, dtype=torch.float64))
        router.bias.copy_(0.5 * torch.randn(children, parents, generator=gen, dtype=torch.float64))
    return router


def random_capsules(
    batch: int = 3, children: int = 7, parents: int = 4, in_dim: int = 5, dim: int = 6, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Votes, and squashed-like child capsules (lengths spread over (0, 1))."""
    rng = np.random.default_rng(seed)
    votes = rng.normal(size=(batch, children, parents, dim))
    raw = rng.normal(size=(batch, children, in_dim))
    norm_sq = (raw**2).sum(-1, keepdims=True)
    inputs = raw * np.sqrt(norm_sq) / (1 + norm_sq)  # squash
    return torch.from_numpy(votes), torch.from_numpy(inputs)


@pytest.mark.parametrize("child_activation", ["length", "ones", "given"])
def test_matches_float64_reference(child_activation: str) -> None:
    votes, inputs = random_capsules(seed=len(child_activation))
    given = None
    if child_activation == "given":  # a separate activation branch, as the official models have
        given = torch.sigmoid(torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
        router = make_router(seed=3)
    else:
        router = make_router(seed=3, child_activation=child_activation)
    routed = router(votes, inputs, child_activations=given)
    ref_poses, ref_routing, ref_activations = reference_routing(
        votes.numpy(),
        inputs.numpy(),
        router.weight.detach().numpy(),
        router.bias.detach().numpy(),
        child_activation="length" if given is not None else child_activation,
        given_activations=None if given is None else given.numpy(),
    )
    assert routed.poses.dtype == torch.float64
    np.testing.assert_allclose(routed.poses.detach().numpy(), ref_poses, rtol=0, atol=ORACLE_ATOL)
    np.testing.assert_allclose(routed.couplings.detach().numpy(), ref_routing, rtol=0, atol=ORACLE_ATOL)
    np.testing.assert_allclose(routed.activations.detach().numpy(), ref_activations, rtol=0, atol=ORACLE_ATOL)


def test_child_activation_modes_differ() -> None:
    """The reference comparison would pass for modes that ignored their setting: check the
    activation source changes poses and activations (but not the couplings r)."""
    votes, inputs = random_capsules(seed=9)
    by_length = make_router(child_activation="length")(votes, inputs)
    by_ones = make_router(child_activation="ones")(votes, inputs)
    torch.testing.assert_close(by_length.couplings, by_ones.couplings)
    assert (by_length.poses - by_ones.poses).abs().max() > 1e-3
    assert (by_length.activations - by_ones.activations).abs().max() > 1e-3


def test_zero_initialisation_routes_uniformly() -> None:
    """The official W2 = 0, b2 = 0 start: r_ij = 1/J, parent activations 1/J, and each pose the
    activation-weighted mean of its votes."""
    router = SelfRouting(in_caps=7, out_caps=4, in_dim=5, out_dim=6).double()
    assert (router.weight == 0).all() and (router.bias == 0).all()
    votes, inputs = random_capsules(seed=2)
    routed = router(votes, inputs)
    torch.testing.assert_close(routed.couplings, torch.full_like(routed.couplings, 0.25), rtol=0, atol=1e-15)
    torch.testing.assert_close(routed.activations, torch.full_like(routed.activations, 0.25))
    a = torch.sqrt(inputs.pow(2).sum(-1) + 1e-8)  # (B, I)
    expected = (a[:, :, None, None] * votes).sum(1) / a.sum(1)[:, None, None]
    torch.testing.assert_close(routed.poses, expected)


def test_shapes_and_distributions() -> None:
    router = make_router(children=9, parents=5, in_dim=3, dim=4)
    routed = router(*random_capsules(batch=2, children=9, parents=5, in_dim=3, dim=4))
    assert isinstance(routed, Routed)
    assert routed.poses.shape == (2, 5, 4)
    assert routed.couplings.shape == (2, 9, 5)
    assert routed.activations.shape == (2, 5)
    assert SelfRouting.couplings_sum_to_one and SelfRouting.needs_inputs
    torch.testing.assert_close(routed.couplings.sum(dim=2), torch.ones(2, 9, dtype=torch.float64))
    assert not torch.allclose(routed.couplings.sum(dim=1), torch.ones(2, 5, dtype=torch.float64))
    # parent activations: in (0, 1) and, since every r_i sums to 1, summing to 1 over the parents
    assert ((routed.activations > 0) & (routed.activations < 1)).all()
    torch.testing.assert_close(routed.activations.sum(dim=1), torch.ones(2, dtype=torch.float64))


def test_gradient_reaches_votes_inputs_and_every_parameter() -> None:
    gen = torch.Generator().manual_seed(0)
    zero_init = SelfRouting(in_caps=7, out_caps=4, in_dim=5, out_dim=6).double()  # the official start
    for router in (make_router(), zero_init):
        votes, inputs = random_capsules(seed=4)
        votes.requires_grad_(True)
        inputs.requires_grad_(True)
        routed = router(votes, inputs)
        loss = (routed.poses * torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)).sum()
        loss = loss + (routed.activations * torch.randn(3, 4, generator=gen, dtype=torch.float64)).sum()
        loss.backward()
        assert votes.grad.abs().min() > 0
        assert inputs.grad.abs().sum(-1).min() > 0  # every child capsule
        for name, param in router.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert {name for name, _ in router.named_parameters()} == {"weight", "bias"}


@pytest.mark.parametrize("child_activation", ["length", "ones"])
def test_no_nan_at_zero_votes_and_inputs(child_activation: str) -> None:
    router = make_router(child_activation=child_activation)
    votes = torch.zeros(2, 7, 4, 6, dtype=torch.float64, requires_grad=True)
    inputs = torch.zeros(2, 7, 5, dtype=torch.float64, requires_grad=True)
    routed = router(votes, inputs)
    for out in routed:
        assert torch.isfinite(out).all()
    (routed.poses.sum() + routed.activations.sum()).backward()
    assert torch.isfinite(votes.grad).all() and torch.isfinite(inputs.grad).all()
    for param in router.parameters():
        assert torch.isfinite(param.grad).all()


def test_batch_independence() -> None:
    router = make_router().train()
    votes, inputs = random_capsules(batch=5, seed=6)
    batched = router(votes, inputs)
    for b in range(5):
        alone = router(votes[b : b + 1], inputs[b : b + 1])
        for got, want in zip(batched, alone, strict=True):
            torch.testing.assert_close(got[b : b + 1], want, rtol=0, atol=1e-13)
    other_votes, other_inputs = votes.clone(), inputs.clone()
    other_votes[1:] *= 10
    other_inputs[1:] = torch.flip(other_inputs[1:], dims=[0])
    for got, want in zip(router(other_votes, other_inputs), batched, strict=True):
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-13)


def test_needs_inputs_and_checks_settings() -> None:
    votes, inputs = random_capsules()
    with pytest.raises(ValueError, match="pass inputs"):
        make_router()(votes)
    with pytest.raises(ValueError, match="child_activation"):
        SelfRouting(in_caps=2, out_caps=2, in_dim=2, out_dim=2, child_activation="sigmoid")
    with pytest.raises(AssertionError, match="expected inputs"):
        make_router()(votes, inputs[:, :, :4])


def test_follows_votes_dtype_with_float32_parameters() -> None:
    router = SelfRouting(in_caps=7, out_caps=4, in_dim=5, out_dim=6)  # float32 parameters
    routed = router(*random_capsules())
    assert all(out.dtype == torch.float64 for out in routed)


def test_config_builds_the_router() -> None:
    partial = instantiate(OmegaConf.load(CONF))
    router = partial(in_caps=7, out_caps=4, in_dim=5, out_dim=6)
    assert isinstance(router, SelfRouting)
    assert router.child_activation == "length" and router.eps == 1e-8
    assert router.weight.shape == (7, 4, 5) and router.bias.shape == (7, 4)
