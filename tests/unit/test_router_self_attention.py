"""Self-attention routing (Efficient-CapsNet) against an independent float64 loop-by-loop
transcription of the official code, plus the properties every router shares.

Reference: repository EscVM/Efficient-CapsNet (Mazzia, Salvetti, Chiaberge, Sci. Rep. 2021),
file ``utils/layers.py``: ``FCCaps.call`` (agreement, scaling, softmax axis, priors, sum) and
``Squash.call`` (the squash with eps = 10e-21).  The maths, per example and parent j, with
d the parents' dimension (``FCCaps.D``) and votes û_{j|i}:

    A_j[i, k] = û_{j|i} · û_{j|k}                    (the I×I self-attention matrix)
    b_ij      = Σ_k A_j[i, k] / sqrt(d)
    c_ij      = exp(b_ij) / Σ_j' exp(b_ij')          (softmax over the parents: axis 1 of [B, J, I, 1])
    s_j       = Σ_i (c_ij + B_ij) û_{j|i}            (B: the learnable priors FCCaps.b, added after the softmax)
    v_j       = (1 - 1/(exp(|s_j|) + eps)) · s_j / (|s_j| + eps),  eps = 1e-20
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
from capsnet.nn.routing.self_attention import SelfAttentionRouting
from capsnet.nn.routing.squash import efficient_squash

CONF = Path(__file__).resolve().parents[2] / "conf"
OFFICIAL_EPS = 10e-21  # utils/layers.py, Squash(eps=10e-21)
HINTON_EPS = 1e-8  # capsnet.nn.routing.dynamic.SQUASH_EPS
TOL = 1e-12  # achieved on these inputs: max |difference| <= 1.3e-15 (float64 rounding)


def reference_self_attention(u_hat: np.ndarray, priors: np.ndarray | None, squash: str = "efficient"):
    """The official FCCaps routing written out loop by loop, one example at a time (float64).

    ``u_hat`` [B, I, J, D]; ``priors`` [I, J] (FCCaps.b, transposed) or None for none.
    ``squash``: "efficient" (the official Squash) or "hinton" (Eq. 1 of Sabour et al., with the
    project's ε = 1e-8 inside the |s| of s / |s|).
    Returns (v [B, J, D], the weights applied to the votes c + B [B, I, J]).
    """
    batch, children, parents, dim = u_hat.shape
    v_out = np.zeros((batch, parents, dim))
    c_out = np.zeros((batch, children, parents))
    for b in range(batch):
        logits = np.zeros((children, parents))
        for j in range(parents):
            attention = np.zeros((children, children))
            for i in range(children):
                for k in range(children):
                    attention[i, k] = sum(u_hat[b, i, j, d] * u_hat[b, k, j, d] for d in range(dim))
            for i in range(children):
                logits[i, j] = sum(attention[i, k] for k in range(children)) / math.sqrt(dim)
        c = np.zeros((children, parents))
        for i in range(children):
            exps = [math.exp(logits[i, j]) for j in range(parents)]
            for j in range(parents):
                c[i, j] = exps[j] / sum(exps) + (0.0 if priors is None else priors[i, j])
        for j in range(parents):
            s = np.zeros(dim)
            for i in range(children):
                s += c[i, j] * u_hat[b, i, j]
            norm = math.sqrt(sum(x * x for x in s))
            if squash == "efficient":
                v_out[b, j] = (1 - 1 / (math.exp(norm) + OFFICIAL_EPS)) * s / (norm + OFFICIAL_EPS)
            else:
                # the project's Eq. 1 keeps eps = 1e-8 inside the square root of s / |s| (PAPER.md)
                v_out[b, j] = s / math.sqrt(norm**2 + HINTON_EPS) * (norm**2 / (1 + norm**2))
        c_out[b] = c
    return v_out, c_out


def _router(in_caps: int = 16, out_caps: int = 10, in_dim: int = 8, out_dim: int = 16, **kw) -> SelfAttentionRouting:
    return SelfAttentionRouting(in_caps=in_caps, out_caps=out_caps, in_dim=in_dim, out_dim=out_dim, **kw).double()


def _random_priors(router: SelfAttentionRouting, seed: int) -> np.ndarray:
    priors = np.random.default_rng(seed).normal(scale=0.2, size=tuple(router.log_priors.shape))
    with torch.no_grad():
        router.log_priors.copy_(torch.from_numpy(priors))
    return priors


@pytest.mark.parametrize("scale", [0.1, 0.3, 1.0])
@pytest.mark.parametrize("squash", ["efficient", "hinton"])
def test_matches_the_official_code_float64(scale: float, squash: str) -> None:
    """MNIST's shapes (16 primary capsules → 10 parents of 16D), trained-looking priors."""
    rng = np.random.default_rng(int(scale * 10))
    u_hat = rng.normal(scale=scale, size=(3, 16, 10, 16))
    router = _router(squash=squash)
    priors = _random_priors(router, seed=1)
    routed = router(torch.from_numpy(u_hat))
    v_ref, c_ref = reference_self_attention(u_hat, priors, squash)
    assert routed.poses.dtype == torch.float64
    np.testing.assert_allclose(routed.poses.detach().numpy(), v_ref, rtol=0, atol=TOL)
    np.testing.assert_allclose(routed.couplings.detach().numpy(), c_ref, rtol=0, atol=TOL)


def test_matches_the_official_code_without_priors_other_shapes() -> None:
    rng = np.random.default_rng(7)
    u_hat = rng.normal(scale=0.5, size=(2, 7, 4, 5))  # d = 5: the scale is 1/sqrt(5)
    routed = _router(in_caps=7, out_caps=4, in_dim=3, out_dim=5, priors=False)(torch.from_numpy(u_hat))
    v_ref, c_ref = reference_self_attention(u_hat, None)
    np.testing.assert_allclose(routed.poses.numpy(), v_ref, rtol=0, atol=TOL)
    np.testing.assert_allclose(routed.couplings.numpy(), c_ref, rtol=0, atol=TOL)


def test_the_reference_separates_the_official_choices() -> None:
    """The comparison above can fail: softmax over the children, or no 1/sqrt(d), differ."""
    rng = np.random.default_rng(3)
    u_hat = torch.from_numpy(rng.normal(scale=0.5, size=(2, 16, 10, 16)))
    v_ref, _ = reference_self_attention(u_hat.numpy(), None)
    logits = torch.einsum("bijd,bjd->bij", u_hat, u_hat.sum(dim=1))
    for wrong in (torch.softmax(logits / 4, dim=1), torch.softmax(logits, dim=2)):
        v_wrong = efficient_squash(torch.einsum("bij,bijd->bjd", wrong, u_hat))
        assert np.abs(v_wrong.numpy() - v_ref).max() > 1e-3


def test_shapes_and_parameters() -> None:
    router = _router(in_caps=16, out_caps=10, in_dim=8, out_dim=16)
    assert isinstance(router, Router)
    assert [name for name, _ in router.named_parameters()] == ["log_priors"]
    assert router.log_priors.shape == (16, 10) and not router.log_priors.any()  # official: zeros at start
    routed = router(torch.randn(4, 16, 10, 16, dtype=torch.float64))
    assert routed.poses.shape == (4, 10, 16)
    assert routed.couplings.shape == (4, 16, 10)
    assert routed.activations is None
    assert list(_router(priors=False).parameters()) == []


def test_couplings_are_softmax_over_parents_plus_priors() -> None:
    router = _router()
    assert SelfAttentionRouting.couplings_sum_to_one is False and router.couplings_sum_to_one is False
    assert _router(priors=False).couplings_sum_to_one is True
    votes = torch.randn(3, 16, 10, 16, dtype=torch.float64)
    # priors at their zero start: a distribution over the parents, not over the children
    c0 = router(votes).couplings
    torch.testing.assert_close(c0.sum(dim=2), torch.ones(3, 16, dtype=torch.float64), rtol=0, atol=1e-12)
    assert not torch.allclose(c0.sum(dim=1), torch.ones(3, 10, dtype=torch.float64))
    # trained priors: each child's couplings sum to 1 + Σ_j B_ij
    priors = torch.from_numpy(_random_priors(router, seed=2))
    c = router(votes).couplings
    torch.testing.assert_close(c - priors, c0, rtol=0, atol=1e-12)
    torch.testing.assert_close(c.sum(dim=2), (1 + priors.sum(dim=1)).expand(3, 16), rtol=0, atol=1e-12)


@pytest.mark.parametrize("squash", ["efficient", "hinton"])
def test_gradients_reach_votes_and_priors(squash: str) -> None:
    router = _router(squash=squash)
    _random_priors(router, seed=4)
    votes = torch.randn(2, 16, 10, 16, dtype=torch.float64, requires_grad=True)
    routed = router(votes)
    (routed.poses.pow(2).sum() + routed.poses[:, 0].sum()).backward()
    for grad in (votes.grad, router.log_priors.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().min() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("squash", ["efficient", "hinton"])
def test_no_nan_at_zero_votes(squash: str, dtype: torch.dtype) -> None:
    router = SelfAttentionRouting(in_caps=16, out_caps=10, in_dim=8, out_dim=16, squash=squash).to(dtype)
    votes = torch.zeros(2, 16, 10, 16, dtype=dtype, requires_grad=True)
    routed = router(votes)
    assert torch.isfinite(routed.poses).all() and not routed.poses.any()
    torch.testing.assert_close(routed.couplings, torch.full_like(routed.couplings, 0.1))
    (routed.poses.sum() + routed.poses.norm(dim=-1).sum()).backward()
    assert torch.isfinite(votes.grad).all() and torch.isfinite(router.log_priors.grad).all()
    if squash == "efficient":  # its Jacobian at 0 is the identity (Eq. 1's is 0: |v| ~ |s|^2 there)
        assert votes.grad.abs().sum() > 0


def test_batch_independence() -> None:
    """An example routes the same alone as beside others, even very different others."""
    router = _router()
    _random_priors(router, seed=5)
    gen = torch.Generator().manual_seed(0)
    votes = torch.randn(5, 16, 10, 16, generator=gen, dtype=torch.float64)
    votes[1:] *= torch.tensor([10.0, 0.01, 3.0, 0.0], dtype=torch.float64).view(4, 1, 1, 1)
    together = router(votes)
    for b in range(5):
        alone = router(votes[b : b + 1])
        torch.testing.assert_close(together.poses[b : b + 1], alone.poses, rtol=0, atol=1e-14)
        torch.testing.assert_close(together.couplings[b : b + 1], alone.couplings, rtol=0, atol=1e-14)


def test_efficient_squash_hand_computed_and_safe_at_zero() -> None:
    v = efficient_squash(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    length = 1 - math.exp(-5)  # |s| = 5
    torch.testing.assert_close(v, torch.tensor([[0.6 * length, 0.8 * length]], dtype=torch.float64))
    for dtype in (torch.float64, torch.float32, torch.float16):
        jac = torch.autograd.functional.jacobian(efficient_squash, torch.zeros(4, dtype=dtype))
        torch.testing.assert_close(jac.double(), torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-2)


def test_config_builds_the_official_router() -> None:
    cfg = OmegaConf.load(CONF / "routing" / "self_attention.yaml")
    assert cfg._target_ == "capsnet.nn.routing.self_attention.SelfAttentionRouting" and cfg._partial_ is True
    router = instantiate(cfg)(in_caps=16, out_caps=10, in_dim=8, out_dim=16)
    assert isinstance(router, SelfAttentionRouting)
    assert router.squash is efficient_squash and router.log_priors is not None
