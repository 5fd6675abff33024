"""Inverted dot-product attention routing against an independent float64 reference.

The reference below is written from the official code, apple/ml-capsules-inverted-attention-
routing, file ``src/layers.py``, class ``CapsuleFC``, method ``forward`` (vector poses,
``matrix_pose`` false), transcribed to plain loops over examples, children and parents:

* first pass (no parent poses yet): couplings softmax_j(0) = 1/J;
* later passes: agreement a_ij = Σ_d p_jd û_{j|i,d}, times 1/sqrt(D) (``self.scale``);
  r_i = softmax over the parents j; then r_i / (Σ_j r_ij + 1e-10);
* every pass: s_j = Σ_i r_ij û_{j|i}; dropout (rate 0 here); p_j = LayerNorm(s_j) over the D
  pose entries with learnable weight and bias (``nn.LayerNorm(out_d_capsules)``).

The official code forms the agreement from the child poses and its weights in one einsum
('bna, namd, bmd->bnm'); Σ_a u_a W_ad p_d is the same sum as the vote û = uW dotted with p,
and the votes are what our router receives.  The number of passes is ``num_routing`` in
``src/capsule_model.py`` (one first pass, then num_routing - 1 routing passes).
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
from capsnet.nn.routing.inverted_dot_product import InvertedDotProductRouting

CONF = Path(__file__).resolve().parents[2] / "conf" / "routing" / "inverted_dot_product.yaml"
ORACLE_ATOL = 1e-12  # float64 agreement with the reference (observed: <= 2e-15); tight enough to see the 1e-10 renorm


def reference_routing(
    votes: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    iters: int,
    scale: bool = True,
    renorm_eps: float = 1e-10,
    ln_eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    """One example at a time, one child and one parent at a time, float64."""
    batch, children, parents, dim = votes.shape
    factor = 1.0 / math.sqrt(dim) if scale else 1.0
    poses_out = np.zeros((batch, parents, dim))
    couplings_out = np.zeros((batch, children, parents))
    for b in range(batch):
        pose = np.zeros((parents, dim))
        r = np.zeros((children, parents))
        for t in range(iters):
            for i in range(children):
                if t == 0:
                    for j in range(parents):
                        r[i, j] = 1.0 / parents
                    continue
                logits = [factor * sum(pose[j, d] * votes[b, i, j, d] for d in range(dim)) for j in range(parents)]
                top = max(logits)
                expd = [math.exp(x - top) for x in logits]
                total = sum(expd)
                row = [e / total for e in expd]
                row_sum = sum(row)
                for j in range(parents):
                    r[i, j] = row[j] / (row_sum + renorm_eps) if renorm_eps else row[j]
            for j in range(parents):
                s = [sum(r[i, j] * votes[b, i, j, d] for i in range(children)) for d in range(dim)]
                mean = sum(s) / dim
                var = sum((x - mean) ** 2 for x in s) / dim  # biased, as LayerNorm
                for d in range(dim):
                    pose[j, d] = (s[d] - mean) / math.sqrt(var + ln_eps) * gamma[d] + beta[d]
        poses_out[b], couplings_out[b] = pose, r
    return poses_out, couplings_out


def make_router(
    children: int = 7, parents: int = 4, dim: int = 6, seed: int = 0, **kwargs
) -> InvertedDotProductRouting:
    """A float64 router whose layer norm is not the identity (random weight and bias); the
    routing layer alone (no class read-out) unless ``classifier=True``."""
    kwargs.setdefault("classifier", False)
    router = InvertedDotProductRouting(in_caps=children, out_caps=parents, in_dim=5, out_dim=dim, **kwargs).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.layer_norm.weight.copy_(1 + 0.5 * torch.randn(dim, generator=gen, dtype=torch.float64))
        router.layer_norm.bias.copy_(0.3 * torch.randn(dim, generator=gen, dtype=torch.float64))
    return router


def random_votes(batch: int = 3, children: int = 7, parents: int = 4, dim: int = 6, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(scale=1.0, size=(batch, children, parents, dim)))


@pytest.mark.parametrize(
    ("iters", "options"),
    [
        (1, {}),
        (2, {}),
        (3, {}),
        (5, {}),
        (3, {"scale_agreement": False}),  # the paper's Eq. 2
        (3, {"renorm_eps": 0.0}),
    ],
)
def test_matches_float64_reference(iters: int, options: dict) -> None:
    votes = random_votes(seed=iters)
    router = make_router(seed=iters, iters=iters, **options)
    routed = router(votes)
    ref_poses, ref_couplings = reference_routing(
        votes.numpy(),
        router.layer_norm.weight.detach().numpy(),
        router.layer_norm.bias.detach().numpy(),
        iters,
        scale=options.get("scale_agreement", True),
        renorm_eps=options.get("renorm_eps", 1e-10),
    )
    assert routed.poses.dtype == torch.float64
    np.testing.assert_allclose(routed.poses.detach().numpy(), ref_poses, rtol=0, atol=ORACLE_ATOL)
    np.testing.assert_allclose(routed.couplings.detach().numpy(), ref_couplings, rtol=0, atol=ORACLE_ATOL)


def test_routing_moves_couplings_and_options_matter() -> None:
    """The reference comparison above would also pass for a router stuck at 1/J: check the
    couplings leave uniform, and that each paper-vs-code option changes the result."""
    votes = random_votes(seed=11)
    base = make_router(iters=3)(votes)
    assert (base.couplings - 0.25).abs().max() > 1e-2
    unscaled = make_router(iters=3, scale_agreement=False)(votes)
    assert (unscaled.poses - base.poses).abs().max() > 1e-3
    plain = make_router(iters=3, renorm_eps=0.0)(votes)
    # the official 1e-10 guard changes the couplings by ~1e-10 relative, and no more
    diff = (plain.couplings - base.couplings).abs().max().item()
    assert 0 < diff < 1e-9


def test_one_pass_is_layer_norm_of_uniform_sum() -> None:
    votes = random_votes(seed=5)
    router = make_router(iters=1)
    routed = router(votes)
    torch.testing.assert_close(routed.couplings, torch.full_like(routed.couplings, 0.25), rtol=0, atol=0)
    torch.testing.assert_close(routed.poses, router.layer_norm(votes.sum(dim=1) / 4))


def test_shapes_and_couplings_over_parents() -> None:
    router = make_router(children=9, parents=5, dim=4, iters=3)
    routed = router(random_votes(batch=2, children=9, parents=5, dim=4))
    assert isinstance(routed, Routed)
    assert routed.poses.shape == (2, 5, 4)
    assert routed.couplings.shape == (2, 9, 5)
    assert routed.activations is None
    assert InvertedDotProductRouting.couplings_sum_to_one and not InvertedDotProductRouting.needs_inputs
    torch.testing.assert_close(routed.couplings.sum(dim=2), torch.ones(2, 9, dtype=torch.float64))
    assert not torch.allclose(routed.couplings.sum(dim=1), torch.ones(2, 5, dtype=torch.float64))
    assert (routed.couplings > 0).all()


def test_gradient_reaches_votes_and_every_parameter() -> None:
    router = make_router(iters=3)
    votes = random_votes(seed=2).requires_grad_(True)
    weights = torch.randn(3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (router(votes).poses * weights).sum().backward()
    assert votes.grad is not None and votes.grad.abs().min() > 0
    for name, param in router.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert {name for name, _ in router.named_parameters()} == {"layer_norm.weight", "layer_norm.bias"}


def test_gradient_flows_through_the_agreement() -> None:
    """With 3 passes the couplings depend on the votes: the gradient differs from routing
    with the couplings held fixed at their final values."""
    router = make_router(iters=3)
    votes = random_votes(seed=4).requires_grad_(True)
    (g_routed,) = torch.autograd.grad(router(votes).poses.sum(), votes)
    with torch.no_grad():
        c = router(votes).couplings
    fixed = router._normalise(torch.einsum("bij,bijd->bjd", c, votes))
    (g_fixed,) = torch.autograd.grad(fixed.sum(), votes)
    torch.testing.assert_close(fixed, router(votes).poses)
    assert (g_routed - g_fixed).abs().max() > 1e-6


@pytest.mark.parametrize("iters", [1, 3])
def test_no_nan_at_zero_votes(iters: int) -> None:
    router = make_router(iters=iters)
    votes = torch.zeros(2, 7, 4, 6, dtype=torch.float64, requires_grad=True)
    routed = router(votes)
    assert torch.isfinite(routed.poses).all() and torch.isfinite(routed.couplings).all()
    routed.poses.sum().backward()
    assert torch.isfinite(votes.grad).all()
    for param in router.parameters():
        assert torch.isfinite(param.grad).all()


def test_batch_independence() -> None:
    """An example routes the same alone and inside a batch (train mode: layer norm has no
    batch statistics, unlike the batch norms of several ports)."""
    router = make_router(iters=3).train()
    votes = random_votes(batch=5, seed=6)
    batched = router(votes)
    for b in range(5):
        alone = router(votes[b : b + 1])
        torch.testing.assert_close(batched.poses[b : b + 1], alone.poses, rtol=0, atol=1e-13)
        torch.testing.assert_close(batched.couplings[b : b + 1], alone.couplings, rtol=0, atol=1e-13)
    # and changing the other examples changes nothing for example 0
    other = votes.clone()
    other[1:] = 10 * torch.randn_like(other[1:])
    torch.testing.assert_close(router(other).poses[0], batched.poses[0], rtol=0, atol=1e-13)


def test_dropout_only_in_training() -> None:
    votes = random_votes(seed=8)
    reference = make_router(iters=2)(votes)
    router = make_router(iters=2, dropout=0.5)
    torch.testing.assert_close(router.eval()(votes).poses, reference.poses)
    torch.manual_seed(0)
    assert not torch.allclose(router.train()(votes).poses, reference.poses)


def test_follows_votes_dtype_with_float32_parameters() -> None:
    router = InvertedDotProductRouting(in_caps=7, out_caps=4, in_dim=5, out_dim=6)  # float32 layer norm
    routed = router(random_votes())
    assert routed.poses.dtype == torch.float64 and routed.couplings.dtype == torch.float64


def test_rejects_bad_settings_and_shapes() -> None:
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        InvertedDotProductRouting(in_caps=2, out_caps=2, in_dim=2, out_dim=2, iters=0)
    with pytest.raises(ValueError, match="renorm_eps"):
        InvertedDotProductRouting(in_caps=2, out_caps=2, in_dim=2, out_dim=2, renorm_eps=-1.0)
    with pytest.raises(AssertionError, match="expected votes"):
        make_router()(random_votes(parents=3))


def test_config_builds_the_router_with_the_official_defaults() -> None:
    cfg = OmegaConf.load(CONF)
    partial = instantiate(cfg)
    router = partial(in_caps=7, out_caps=4, in_dim=5, out_dim=6)
    assert isinstance(router, InvertedDotProductRouting)
    assert router.iters == 2
    assert router.scale == pytest.approx(1 / math.sqrt(6))
    assert router.renorm_eps == 1e-10
    assert router.drop.p == 0.0 and router.layer_norm.eps == 1e-5
    assert router.layer_norm.normalized_shape == (6,)


def test_the_class_read_out_is_a_shared_linear_through_a_sigmoid() -> None:
    """The harness's class scores for this router: sigmoid(w · p_j + b) with one (w, b)
    shared by every class (the official model's Linear(out_dim, 1)), computed by hand here."""
    router = make_router(children=7, parents=4, dim=6, iters=2, classifier=True)
    votes = random_votes(batch=2, children=7, parents=4, dim=6, seed=8).requires_grad_(True)
    routed = router(votes)
    w, b = router.classifier.weight[0], router.classifier.bias[0]
    by_hand = torch.tensor(
        [[1 / (1 + math.exp(-float(routed.poses[n, j] @ w + b))) for j in range(4)] for n in range(2)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(routed.activations, by_hand, rtol=1e-12, atol=1e-14)
    routed.activations.sum().backward()
    assert router.classifier.weight.grad.abs().sum() > 0 and votes.grad.abs().sum() > 0
