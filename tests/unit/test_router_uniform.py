"""Uniform coupling (no routing) against an independent float64 loop-by-loop reference,
against today's dynamic routing with one iteration, and the properties every router shares.

Reference: repository Sarasra/models (Sabour's official CapsNet code), file
``research/capsules/models/layers/layers.py``, ``_update_routing`` run for one iteration
(``num_routing=1``, ``leaky=False``) with zero ``biases`` (this router has none): the routing
logits start at 0, so the route is a softmax over the output capsules of zeros, 1/J; the
preactivation is Σ_i route_ij · vote_ij, and ``_squash`` is (s / |s|) · |s|² / (1 + |s|²); the
reference keeps the project's ε = 1e-8 inside the |s| of s / |s| (PAPER.md: NaN-free at 0).
The "efficient" option ends with Efficient-CapsNet's squash instead (repository
EscVM/Efficient-CapsNet, ``utils/layers.py``, ``Squash``: (1 - 1/(exp(|s|) + eps)) s / (|s| + eps)).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from capsnet.nn.routing.base import Router
from capsnet.nn.routing.dynamic import dynamic_routing
from capsnet.nn.routing.uniform import UniformRouting

CONF = Path(__file__).resolve().parents[2] / "conf"
HINTON_EPS = 1e-8  # capsnet.nn.routing.dynamic.SQUASH_EPS
TOL = 1e-12  # achieved on these inputs: max |difference| <= 3e-16 (float64 rounding)


def reference_uniform(u_hat: np.ndarray, squash: str = "hinton") -> tuple[np.ndarray, np.ndarray]:
    """One routing iteration from zero logits, loop by loop, one example at a time (float64)."""
    batch, children, parents, dim = u_hat.shape
    v_out = np.zeros((batch, parents, dim))
    c_out = np.zeros((batch, children, parents))
    for b in range(batch):
        logits = np.zeros((children, parents))
        c = np.zeros((children, parents))
        for i in range(children):
            exps = [math.exp(logits[i, j]) for j in range(parents)]
            for j in range(parents):
                c[i, j] = exps[j] / sum(exps)
        for j in range(parents):
            s = np.zeros(dim)
            for i in range(children):
                s += c[i, j] * u_hat[b, i, j]
            norm = math.sqrt(sum(x * x for x in s))
            if squash == "hinton":
                # the project's Eq. 1 keeps eps = 1e-8 inside the square root of s / |s| (PAPER.md)
                v_out[b, j] = s / math.sqrt(norm**2 + HINTON_EPS) * (norm**2 / (1 + norm**2))
            else:
                v_out[b, j] = (1 - 1 / (math.exp(norm) + 10e-21)) * s / (norm + 10e-21)
        c_out[b] = c
    return v_out, c_out


def _router(in_caps: int = 12, out_caps: int = 10, in_dim: int = 8, out_dim: int = 16, **kw) -> UniformRouting:
    return UniformRouting(in_caps=in_caps, out_caps=out_caps, in_dim=in_dim, out_dim=out_dim, **kw)


@pytest.mark.parametrize("squash", ["hinton", "efficient"])
@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_matches_the_reference_float64(squash: str, scale: float) -> None:
    u_hat = np.random.default_rng(int(scale * 10)).normal(scale=scale, size=(3, 12, 10, 16))
    routed = _router(squash=squash)(torch.from_numpy(u_hat))
    v_ref, c_ref = reference_uniform(u_hat, squash)
    assert routed.poses.dtype == torch.float64
    np.testing.assert_allclose(routed.poses.numpy(), v_ref, rtol=0, atol=TOL)
    np.testing.assert_allclose(routed.couplings.numpy(), c_ref, rtol=0, atol=TOL)


def test_equals_dynamic_routing_with_one_iteration() -> None:
    u_hat = torch.randn(4, 12, 10, 16, dtype=torch.float64)
    routed = _router()(u_hat)
    v, c = dynamic_routing(u_hat, 1)
    torch.testing.assert_close(routed.poses, v, rtol=0, atol=1e-15)
    torch.testing.assert_close(routed.couplings, c, rtol=0, atol=1e-15)
    # ... and not with three: the control differs from routing
    assert (routed.poses - dynamic_routing(u_hat, 3)[0]).abs().max() > 1e-3


def test_shapes_and_couplings() -> None:
    router = _router(in_caps=12, out_caps=5, in_dim=8, out_dim=4)
    assert isinstance(router, Router) and router.couplings_sum_to_one is True
    assert list(router.parameters()) == []
    routed = router(torch.randn(3, 12, 5, 4))
    assert routed.poses.shape == (3, 5, 4) and routed.couplings.shape == (3, 12, 5) and routed.activations is None
    torch.testing.assert_close(routed.couplings, torch.full((3, 12, 5), 0.2))
    torch.testing.assert_close(routed.couplings.sum(dim=2), torch.ones(3, 12))
    with pytest.raises(AssertionError, match="expected votes"):
        router(torch.randn(3, 12, 4, 4))


@pytest.mark.parametrize("squash", ["hinton", "efficient"])
def test_gradients_reach_every_vote(squash: str) -> None:
    votes = torch.randn(2, 12, 10, 16, dtype=torch.float64, requires_grad=True)
    routed = _router(squash=squash)(votes)
    (routed.poses.pow(2).sum() + routed.poses.sum()).backward()
    assert torch.isfinite(votes.grad).all() and votes.grad.abs().min() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("squash", ["hinton", "efficient"])
def test_no_nan_at_zero_votes(squash: str, dtype: torch.dtype) -> None:
    votes = torch.zeros(2, 12, 10, 16, dtype=dtype, requires_grad=True)
    routed = _router(squash=squash)(votes)
    assert torch.isfinite(routed.poses).all() and not routed.poses.any()
    (routed.poses.sum() + routed.poses.norm(dim=-1).sum()).backward()
    assert torch.isfinite(votes.grad).all()


def test_batch_independence() -> None:
    votes = torch.randn(5, 12, 10, 16, dtype=torch.float64)
    votes[1:] *= torch.tensor([10.0, 0.01, 3.0, 0.0], dtype=torch.float64).view(4, 1, 1, 1)
    router = _router()
    together = router(votes)
    for b in range(5):
        alone = router(votes[b : b + 1])
        torch.testing.assert_close(together.poses[b : b + 1], alone.poses, rtol=0, atol=1e-15)
        torch.testing.assert_close(together.couplings[b : b + 1], alone.couplings, rtol=0, atol=0)


def test_config_builds_the_router() -> None:
    cfg = OmegaConf.load(CONF / "routing" / "uniform.yaml")
    assert cfg._target_ == "capsnet.nn.routing.uniform.UniformRouting" and cfg._partial_ is True
    router = instantiate(cfg)(in_caps=12, out_caps=10, in_dim=8, out_dim=16)
    assert isinstance(router, UniformRouting) and router.squash_name == "hinton"
    with pytest.raises(ValueError, match="squash must be one of"):
        _router(squash="relu")
