"""Squash and dynamic routing against an independent float64 re-implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capsnet.nn.routing.dynamic import capsule_lengths, dynamic_routing, squash


def reference_routing(u_hat: np.ndarray, iterations: int, leaky: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Procedure 1 written out loop by loop, one example at a time, in float64 numpy.
    ``leaky``: the official code's softmax over [0, b_i1, ..., b_iJ], the first share dropped."""
    batch, children, parents, dim = u_hat.shape
    v_out = np.zeros((batch, parents, dim))
    c_out = np.zeros((batch, children, parents))
    for b in range(batch):
        logits = np.zeros((children, parents))
        for it in range(iterations):
            denominator = np.exp(logits).sum(axis=1, keepdims=True) + (1.0 if leaky else 0.0)  # exp(0) = 1
            c = np.exp(logits) / denominator
            v = np.zeros((parents, dim))
            for j in range(parents):
                s = sum(c[i, j] * u_hat[b, i, j] for i in range(children))
                norm = np.sqrt((s**2).sum())
                v[j] = norm**2 / (1 + norm**2) * s / norm
            if it < iterations - 1:
                for i in range(children):
                    for j in range(parents):
                        logits[i, j] += u_hat[b, i, j] @ v[j]
        v_out[b], c_out[b] = v, c
    return v_out, c_out


@pytest.mark.parametrize("iterations", [1, 3, 5, 7, 10])
def test_routing_matches_float64_reference(iterations: int) -> None:
    rng = np.random.default_rng(iterations)
    u_hat = rng.normal(scale=0.3, size=(3, 12, 10, 16))
    v, c = dynamic_routing(torch.from_numpy(u_hat), iterations)
    v_ref, c_ref = reference_routing(u_hat, iterations)
    assert v.dtype == torch.float64
    np.testing.assert_allclose(v.numpy(), v_ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(c.numpy(), c_ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("iterations", [1, 3, 5])
def test_leaky_routing_matches_float64_reference(iterations: int) -> None:
    rng = np.random.default_rng(10 + iterations)
    u_hat = rng.normal(scale=0.3, size=(3, 12, 10, 16))
    v, c = dynamic_routing(torch.from_numpy(u_hat), iterations, leaky=True)
    v_ref, c_ref = reference_routing(u_hat, iterations, leaky=True)
    np.testing.assert_allclose(v.numpy(), v_ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(c.numpy(), c_ref, rtol=1e-6, atol=1e-9)
    assert (c.sum(dim=2) < 1).all()  # the leak keeps a share of every child
    if iterations == 1:  # uniform over J parents and the leak: 1 / (J + 1) each
        np.testing.assert_allclose(c.numpy(), 1 / 11)


def test_one_iteration_is_uniform_coupling() -> None:
    u_hat = torch.randn(4, 20, 10, 16)
    v, c = dynamic_routing(u_hat, 1)
    torch.testing.assert_close(c, torch.full_like(c, 0.1))
    torch.testing.assert_close(v, squash(u_hat.sum(dim=1) / 10))  # s_j = Σ_i (1/10) û_j|i


def test_coupling_sums_to_one_over_parents() -> None:
    _, c = dynamic_routing(torch.randn(2, 30, 10, 16), 3)
    torch.testing.assert_close(c.sum(dim=2), torch.ones(2, 30))
    assert not torch.allclose(c.sum(dim=1), torch.ones(2, 10))


def test_logits_are_per_example_not_shared_across_batch() -> None:
    u_hat = torch.randn(5, 40, 10, 16, dtype=torch.float64)
    v_batch, c_batch = dynamic_routing(u_hat, 3)
    for b in range(5):
        v_alone, c_alone = dynamic_routing(u_hat[b : b + 1], 3)
        torch.testing.assert_close(v_batch[b : b + 1], v_alone)
        torch.testing.assert_close(c_batch[b : b + 1], c_alone)


def test_gradient_flows_through_agreement_unless_detached() -> None:
    u_hat = torch.randn(2, 16, 10, 8, dtype=torch.float64, requires_grad=True)
    grads = {}
    for detach in (False, True):
        (g,) = torch.autograd.grad(dynamic_routing(u_hat, 3, detach_agreement=detach)[0].sum(), u_hat)
        grads[detach] = g
    assert not torch.allclose(grads[False], grads[True])
    v_same = dynamic_routing(u_hat, 3, detach_agreement=True)[0]
    torch.testing.assert_close(v_same, dynamic_routing(u_hat, 3)[0])


def test_routing_bias_is_added_before_squash() -> None:
    u_hat = torch.randn(2, 8, 10, 16, dtype=torch.float64)
    bias = torch.randn(10, 16, dtype=torch.float64)
    v, _ = dynamic_routing(u_hat, 1, bias=bias)
    torch.testing.assert_close(v, squash(u_hat.sum(dim=1) / 10 + bias))


def test_routing_rejects_zero_iterations() -> None:
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        dynamic_routing(torch.randn(1, 2, 10, 16), 0)


def test_routing_runs_in_bfloat16() -> None:
    u_hat = torch.randn(2, 16, 10, 16)
    v, c = dynamic_routing(u_hat.bfloat16(), 3)
    assert v.dtype == torch.bfloat16 and c.dtype == torch.bfloat16
    torch.testing.assert_close(v.float(), dynamic_routing(u_hat, 3)[0], atol=2e-2, rtol=5e-2)


def test_squash_hand_computed() -> None:
    v = squash(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    # |s| = 5 → length 25/26, direction (0.6, 0.8)
    torch.testing.assert_close(v, torch.tensor([[25 / 26 * 0.6, 25 / 26 * 0.8]], dtype=torch.float64))


def test_squash_gradient_finite_at_zero() -> None:
    s = torch.zeros(4, 16, requires_grad=True)
    squash(s).sum().backward()
    assert torch.isfinite(s.grad).all()
    s2 = torch.zeros(4, 16, requires_grad=True)
    capsule_lengths(squash(s2)).sum().backward()
    assert torch.isfinite(s2.grad).all()


def test_squash_lengths_below_one() -> None:
    lengths = capsule_lengths(squash(torch.randn(1000, 8) * 10))
    assert (lengths < 1).all() and (lengths > 0).all()
