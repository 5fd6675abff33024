"""EM routing against float64 loop-by-loop transcriptions of the official code and of the
paper's Procedure 1, the numerical traps, and the properties every router must have."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from capsnet.nn.routing import Routed
from capsnet.nn.routing.em import ConvGeometry, EMRouter, em_routing, lambda_schedule

LOG_2PI = math.log(2 * math.pi)
RTOL, ATOL = 1e-9, 1e-12  # float64 batched vs loops; the observed gap is ~1e-14 relative


def _log_sigmoid(x: float) -> float:
    return min(0.0, x) - math.log(1.0 + math.exp(-abs(x)))  # the official activation_update


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---- oracle 1: update_em_routing (the fully connected / class capsule layer) ---------------
def reference_fc_official(
    votes: np.ndarray,
    act: np.ndarray,
    beta_u: np.ndarray,
    beta_a: np.ndarray,
    iterations: int,
    final_beta: float,
    min_var: float = 0.0005,
    mass_eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``update_em_routing`` of google-research/google-research ``capsule_em/em_layers.py``
    (leaky=False), written out with loops over examples b, parents j, children i and pose
    elements h, in float64.  votes [B, I, J, D] (``wx``), act [B, I] -> (sigmoid of the last
    ``logit`` [B, J], last ``center`` [B, J, D], the posterior of the last iteration [B, I, J]).
    """
    batch, children, parents, dim = votes.shape
    a_out = np.zeros((batch, parents))
    mu_out = np.zeros((batch, parents, dim))
    post_out = np.zeros((batch, children, parents))
    for b in range(batch):
        update = np.zeros((children, parents))  # tf.fill(..., 0.0)
        center = np.zeros((parents, dim))  # out_center starts at 0
        logit = np.zeros(parents)
        for it in range(iterations):
            beta = final_beta * (1 - 0.95 ** (it + 1))
            posterior = np.zeros((children, parents))
            for i in range(children):  # tf.nn.softmax(update, dim=2): over the parents
                peak = max(update[i])
                exps = [math.exp(update[i, j] - peak) for j in range(parents)]
                for j in range(parents):
                    posterior[i, j] = exps[j] / sum(exps)
            new_update = np.zeros((children, parents))
            for j in range(parents):
                masses = sum(posterior[i, j] * act[b, i] for i in range(children)) + mass_eps
                for h in range(dim):
                    s = sum(posterior[i, j] * act[b, i] * votes[b, i, j, h] for i in range(children))
                    center[j, h] = 0.9 * s / masses + 0.1 * center[j, h]
                variance = np.zeros(dim)
                for h in range(dim):
                    noise_sum = sum(
                        posterior[i, j] * act[b, i] * (votes[b, i, j, h] - center[j, h]) ** 2 for i in range(children)
                    )
                    variance[h] = min_var + noise_sum / masses
                log_variance = [math.log(v) for v in variance]
                p_i = -sum(log_variance)
                win = masses * (p_i - beta_u[j] * dim * (LOG_2PI + 1.0))
                logit[j] = beta * (win - beta_a[j] * 5000)
                activation_update = _log_sigmoid(logit[j])
                sigma_update = (dim * LOG_2PI + sum(log_variance)) / 2.0
                for i in range(children):
                    exp_update = sum((votes[b, i, j, h] - center[j, h]) ** 2 / (2 * variance[h]) for h in range(dim))
                    new_update[i, j] = activation_update - sigma_update - exp_update
            update = new_update
            post_out[b] = posterior
        a_out[b] = [_sigmoid(x) for x in logit]
        mu_out[b] = center
    return a_out, mu_out, post_out


# ---- oracle 2: update_conv_routing (a convolutional capsule layer) ---------------------------
def _extract_patches(image: np.ndarray, k: int, stride: int, rate: int) -> np.ndarray:
    """tf.extract_image_patches of one single-channel image [H, W], padding VALID:
    -> [H', W', k·k], each patch flattened row-major over (kernel row, kernel column)."""
    span = k + (k - 1) * (rate - 1)
    rows = math.ceil((image.shape[0] - span + 1) / stride)
    cols = math.ceil((image.shape[1] - span + 1) / stride)
    out = np.zeros((rows, cols, k * k))
    for r in range(rows):
        for c in range(cols):
            for a in range(k):
                for e in range(k):
                    out[r, c, a * k + e] = image[r * stride + a * rate, c * stride + e * rate]
    return out


def reference_conv_official(
    wx: np.ndarray,
    a_patches: np.ndarray,
    beta_u: np.ndarray,
    beta_a: np.ndarray,
    iterations: int,
    final_beta: float,
    min_var: float = 0.0005,
) -> tuple[np.ndarray, np.ndarray]:
    """``update_conv_routing`` of google-research/google-research
    ``capsule_em/em_layers.py``, in float64 loops, in the official layout:
    wx [batch, indim, outdim, atoms, n, n, k, k], a_patches [batch, indim, n, n, k, k]
    -> (sigmoid of the last logit [batch, outdim, n, n], last center [batch, outdim, atoms, n, n]).

    Its posterior normalisation is transcribed op by op: transpose to [.., n, k, n, k],
    reshape into one (n·k)×(n·k) image per (batch, indim, outdim), pad (k−1)² on every side,
    ``extract_image_patches`` with ksize k, stride k, rate k−1, sum each patch, then
    ``extract_image_patches`` with ksize k, stride 1 to bring the sums back."""
    batch, indim, outdim, atoms, n, _, k, _ = wx.shape
    act_out = np.zeros((batch, outdim, n, n))
    center_out = np.zeros((batch, outdim, atoms, n, n))
    for b in range(batch):
        posterior = np.full((indim, outdim, n, n, k, k), 1.0 / outdim)  # softmax of zeros over outdim
        center = np.zeros((outdim, atoms, n, n))
        logit = np.zeros((outdim, n, n))
        for it in range(iterations):
            beta = final_beta * (1 - 0.95 ** (it + 1))
            prior_update = np.zeros((indim, outdim, n, n, k, k))
            for j in range(outdim):
                for oh in range(n):
                    for ow in range(n):
                        window = [(i, uh, uw) for i in range(indim) for uh in range(k) for uw in range(k)]
                        conf = {
                            w: posterior[w[0], j, oh, ow, w[1], w[2]] * a_patches[b, w[0], oh, ow, w[1], w[2]]
                            for w in window
                        }
                        masses = sum(conf.values()) + 0.0000001
                        vote = {w: wx[b, w[0], j, :, oh, ow, w[1], w[2]] for w in window}
                        for h in range(atoms):
                            s = sum(conf[w] * vote[w][h] for w in window)
                            center[j, h, oh, ow] = 0.9 * s / masses + 0.1 * center[j, h, oh, ow]
                        mu = center[j, :, oh, ow]
                        variance = [
                            min_var + sum(conf[w] * (vote[w][h] - mu[h]) ** 2 for w in window) / masses
                            for h in range(atoms)
                        ]
                        log_variance = [math.log(v) for v in variance]
                        p_i = -sum(log_variance)
                        win = masses * (p_i - beta_u[j] * atoms * (LOG_2PI + 1.0))
                        logit[j, oh, ow] = beta * (win - beta_a[j] * 5000)
                        activation_update = _log_sigmoid(logit[j, oh, ow])
                        sigma_update = (atoms * LOG_2PI - p_i) / 2.0
                        for i, uh, uw in window:
                            exp_update = sum(
                                (vote[(i, uh, uw)][h] - mu[h]) ** 2 / (2 * variance[h]) for h in range(atoms)
                            )
                            prior_update[i, j, oh, ow, uh, uw] = activation_update - sigma_update - exp_update
            new_posterior = np.zeros_like(posterior)
            pad = (k - 1) * (k - 1)
            for i in range(indim):
                for j in range(outdim):
                    block = prior_update[i, j]  # [n, n, k, k]
                    prior_exp = np.exp(block - block.max())  # max over h, w, k, k
                    image = np.zeros((n * k + 2 * pad, n * k + 2 * pad))
                    for oh in range(n):
                        for ow in range(n):
                            for uh in range(k):
                                for uw in range(k):
                                    image[pad + oh * k + uh, pad + ow * k + uw] = prior_exp[oh, ow, uh, uw]
                    sum_prior = _extract_patches(image, k, k, k - 1).sum(axis=-1)
                    back = _extract_patches(sum_prior, k, 1, 1).reshape(n, n, k, k) + 0.0000001
                    new_posterior[i, j] = prior_exp / back
            posterior = new_posterior
        act_out[b] = 1.0 / (1.0 + np.exp(-logit))
        center_out[b] = center
    return act_out, center_out


# ---- oracle 3: Procedure 1 of the paper on an explicit child→parent graph -------------------
def reference_graph(
    edges: list[tuple[int, int, np.ndarray]],
    act: np.ndarray,
    parent_type: list[int],
    beta_u: np.ndarray,
    beta_a: np.ndarray,
    iterations: int,
    final_lambda: float,
    cost: str,
    min_var: float = 0.0005,
    mass_eps: float = 1e-5,
    momentum: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Procedure 1 (paper) on one example given as edges (child, parent, vote): R starts
    uniform over each child's parents; M-step per parent over its incoming edges; E-step
    per child over its outgoing edges.  With the official code's σ² floor, mass ε, μ
    momentum and λ schedule; ``cost`` "official" or "paper".  -> (a [P], μ [P, D], R per edge)."""
    parents = len(parent_type)
    dim = len(edges[0][2])
    fan = {}
    for child, _, _ in edges:
        fan[child] = fan.get(child, 0) + 1
    r = [1.0 / fan[child] for child, _, _ in edges]
    center = np.zeros((parents, dim))
    logit = np.zeros(parents)
    used = list(r)
    for it in range(iterations):
        lam = final_lambda * (1 - 0.95 ** (it + 1))
        used = list(r)
        variance = np.zeros((parents, dim))
        for p in range(parents):
            incoming = [e for e in range(len(edges)) if edges[e][1] == p]
            mass = sum(r[e] * act[edges[e][0]] for e in incoming) + mass_eps
            for h in range(dim):
                s = sum(r[e] * act[edges[e][0]] * edges[e][2][h] for e in incoming)
                center[p, h] = (1 - momentum) * s / mass + momentum * center[p, h]
            for h in range(dim):
                spread = sum(r[e] * act[edges[e][0]] * (edges[e][2][h] - center[p, h]) ** 2 for e in incoming)
                variance[p, h] = min_var + spread / mass
            t = parent_type[p]
            log_var_sum = sum(math.log(v) for v in variance[p])
            if cost == "official":
                logit[p] = lam * (mass * (-log_var_sum - beta_u[t] * dim * (LOG_2PI + 1.0)) - 5000 * beta_a[t])
            else:  # cost_h = (β_u + log σ_h) Σ_i R_ij a_i; a = logistic(λ(β_a − Σ_h cost_h))
                costs = [(beta_u[t] + math.log(math.sqrt(variance[p, h]))) * mass for h in range(dim)]
                logit[p] = lam * (beta_a[t] - sum(costs))
        if it == iterations - 1:
            break
        log_p = []
        for _, p, vote in edges:  # log(a_j p_j), p_j the Gaussian density of the vote
            quad = sum((vote[h] - center[p, h]) ** 2 / (2 * variance[p, h]) for h in range(dim))
            norm = 0.5 * sum(math.log(2 * math.pi * variance[p, h]) for h in range(dim))
            log_p.append(_log_sigmoid(logit[p]) - norm - quad)
        for child in fan:
            mine = [e for e in range(len(edges)) if edges[e][0] == child]
            peak = max(log_p[e] for e in mine)
            total = sum(math.exp(log_p[e] - peak) for e in mine)
            for e in mine:
                r[e] = math.exp(log_p[e] - peak) / total
    return np.array([_sigmoid(x) for x in logit]), center.copy(), used


def conv_edges(votes: np.ndarray, geometry: ConvGeometry) -> tuple[list[tuple[int, int, np.ndarray]], list[int]]:
    """The edges of one example's convolutional votes [N, C, J, D], enumerated by loops
    over output positions, child types, kernel offsets and parent types."""
    k, s, (hi, wi), (ho, wo) = geometry.kernel, geometry.stride, geometry.in_size, geometry.out_size
    parents_per_type = ho * wo
    edges = []
    for oh in range(ho):
        for ow in range(wo):
            for i in range(geometry.in_types):
                for uh in range(k):
                    for uw in range(k):
                        child = (i * hi + oh * s + uh) * wi + ow * s + uw
                        c = (i * k + uh) * k + uw
                        for j in range(votes.shape[2]):
                            parent = j * parents_per_type + oh * wo + ow
                            edges.append((child, parent, votes[oh * wo + ow, c, j]))
    parent_type = [p // parents_per_type for p in range(votes.shape[2] * parents_per_type)]
    return edges, parent_type


def _random_inputs(shape: tuple[int, ...], seed: int, scale: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    votes = scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    acts = torch.rand(*shape[:3], generator=g, dtype=torch.float64)
    return votes, acts


def _betas(parents: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return (
        0.5 + 0.3 * torch.rand(parents, generator=g, dtype=torch.float64),
        0.5 + 0.3 * torch.rand(parents, generator=g, dtype=torch.float64),
    )


def test_official_groups_are_the_children_only_at_stride_one() -> None:
    """The official E-step groups kernel entries (o, u) by o + u; the child is at s·o + u."""
    for stride, same in ((1, True), (2, False)):
        geometry = ConvGeometry(in_types=2, in_size=(7, 7), kernel=3, stride=stride)
        child = geometry.child_index.reshape(-1).tolist()
        group = geometry.official_group.reshape(-1).tolist()
        partition_by_child = {frozenset(e for e, c in enumerate(child) if c == x) for x in set(child)}
        partition_by_group = {frozenset(e for e, g in enumerate(group) if g == x) for x in set(group)}
        assert (partition_by_child == partition_by_group) is same


# ---- the oracles against the batched implementation ---------------------------------------
@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_fully_connected_matches_official_loops(iterations: int) -> None:
    votes, acts = _random_inputs((2, 1, 12, 4, 16), iterations)
    beta_u, beta_a = _betas(4, iterations)
    out = em_routing(votes, acts, beta_u, beta_a, iterations=iterations, final_lambda=0.01)
    a_ref, mu_ref, post_ref = reference_fc_official(
        votes[:, 0].numpy(), acts[:, 0].numpy(), beta_u.numpy(), beta_a.numpy(), iterations, 0.01
    )
    assert out.poses.dtype == torch.float64
    np.testing.assert_allclose(out.activations[:, 0].numpy(), a_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out.poses[:, 0].numpy(), mu_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out.couplings[:, 0].numpy(), post_ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("in_size", "stride", "iterations"), [(7, 2, 3), (5, 1, 3), (5, 1, 1)])
def test_convolutional_matches_official_loops(in_size: int, stride: int, iterations: int) -> None:
    geometry = ConvGeometry(in_types=2, in_size=(in_size, in_size), kernel=3, stride=stride)
    (ho, wo), parents = geometry.out_size, 3
    votes, acts = _random_inputs((2, ho * wo, geometry.window, parents, 16), 7 + stride)
    beta_u, beta_a = _betas(parents, stride)
    out = em_routing(
        votes, acts, beta_u, beta_a, iterations=iterations, geometry=geometry, normalisation="official", mass_eps=1e-7
    )
    # my layout [B, (oh, ow), (i, uh, uw), j, D] -> the official [B, i, j, D, oh, ow, uh, uw]
    wx = votes.view(2, ho, wo, 2, 3, 3, parents, 16).permute(0, 3, 6, 7, 1, 2, 4, 5).numpy()
    a_patches = acts.view(2, ho, wo, 2, 3, 3).permute(0, 3, 1, 2, 4, 5).numpy()
    a_ref, mu_ref = reference_conv_official(wx, a_patches, beta_u.numpy(), beta_a.numpy(), iterations, 0.01)
    np.testing.assert_allclose(
        out.activations.view(2, ho, wo, parents).permute(0, 3, 1, 2).numpy(), a_ref, rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        out.poses.view(2, ho, wo, parents, 16).permute(0, 3, 4, 1, 2).numpy(), mu_ref, rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("cost", ["official", "paper"])
@pytest.mark.parametrize("stride", [1, 2])
def test_convolutional_paper_normalisation_matches_procedure_1(cost: str, stride: int) -> None:
    geometry = ConvGeometry(in_types=2, in_size=(5, 5), kernel=3, stride=stride)
    (ho, wo), parents = geometry.out_size, 3
    votes, _ = _random_inputs((2, ho * wo, geometry.window, parents, 16), 20 + stride)
    child_acts = torch.rand(
        2, geometry.num_children, generator=torch.Generator().manual_seed(stride), dtype=torch.float64
    )
    acts = torch.zeros(2, ho * wo, geometry.window, dtype=torch.float64)  # each window's copy of its children's a
    for oh in range(ho):
        for ow in range(wo):
            for c in range(geometry.window):
                i, uh, uw = c // 9, (c // 3) % 3, c % 3
                acts[:, oh * wo + ow, c] = child_acts[:, (i * 5 + oh * stride + uh) * 5 + ow * stride + uw]
    beta_u, beta_a = _betas(parents, 3)
    out = em_routing(votes, acts, beta_u, beta_a, iterations=3, geometry=geometry, normalisation="paper", cost=cost)
    for b in range(2):
        edges, parent_type = conv_edges(votes[b].numpy(), geometry)
        a_ref, mu_ref, r_ref = reference_graph(
            edges, child_acts[b].numpy(), parent_type, beta_u.numpy(), beta_a.numpy(), 3, 0.01, cost
        )
        # parent p = j·(ho·wo) + n
        np.testing.assert_allclose(out.activations[b].T.reshape(-1).numpy(), a_ref, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(out.poses[b].permute(1, 0, 2).reshape(-1, 16).numpy(), mu_ref, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(out.couplings[b].reshape(-1).numpy(), r_ref, rtol=RTOL, atol=ATOL)


def test_fully_connected_paper_cost_matches_procedure_1() -> None:
    votes, acts = _random_inputs((2, 1, 10, 4, 16), 31)
    beta_u, beta_a = _betas(4, 31)
    out = em_routing(votes, acts, beta_u, beta_a, iterations=3, final_lambda=0.01, cost="paper")
    for b in range(2):
        edges = [(i, j, votes[b, 0, i, j].numpy()) for i in range(10) for j in range(4)]
        a_ref, mu_ref, r_ref = reference_graph(
            edges, acts[b, 0].numpy(), [0, 1, 2, 3], beta_u.numpy(), beta_a.numpy(), 3, 0.01, "paper"
        )
        np.testing.assert_allclose(out.activations[b, 0].numpy(), a_ref, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(out.poses[b, 0].numpy(), mu_ref, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(out.couplings[b, 0].reshape(-1).numpy(), r_ref, rtol=RTOL, atol=ATOL)


def test_the_options_change_the_result() -> None:
    """cost, normalisation and momentum are not silently ignored (the oracles pin their values)."""
    geometry = ConvGeometry(in_types=2, in_size=(5, 5), kernel=3, stride=1)
    votes, acts = _random_inputs((1, 9, geometry.window, 3, 16), 40)
    beta_u, beta_a = _betas(3, 4)
    base = em_routing(votes, acts, beta_u, beta_a, geometry=geometry).activations
    for change in ({"cost": "paper"}, {"normalisation": "official"}, {"center_momentum": 0.0}, {"min_var": 0.01}):
        other = em_routing(votes, acts, beta_u, beta_a, geometry=geometry, **change).activations
        assert not torch.allclose(base, other, rtol=1e-6, atol=0), change


def test_lambda_schedule_hand_computed() -> None:
    # official: final_beta · (1 − 0.95^(i+1)), i = 0, 1, 2
    np.testing.assert_allclose(lambda_schedule(3, 0.01), [0.01 * 0.05, 0.01 * 0.0975, 0.01 * 0.142625], rtol=1e-12)
    assert lambda_schedule(2, 0.3, growth=0.0) == [0.3, 0.3]


def test_one_iteration_hand_computed() -> None:
    """One parent, two children voting ±x (D = 1), both fully active: m = 2 + ε,
    μ = 0.9 · 0 = 0, σ² = min_var + x², logit = λ₀(m(−log σ² − β_u(ln 2π + 1)) − 5000 β_a)."""
    x, beta_u, beta_a, eps = 0.3, 0.2, 0.001, 1e-5
    votes = torch.tensor([x, -x], dtype=torch.float64).view(1, 1, 2, 1, 1)
    out = em_routing(
        votes,
        torch.ones(1, 1, 2, dtype=torch.float64),
        torch.tensor([beta_u], dtype=torch.float64),
        torch.tensor([beta_a], dtype=torch.float64),
        iterations=1,
    )
    mass, var, lam = 2 + eps, 0.0005 + 2 * x * x / (2 + eps), 0.01 * 0.05
    logit = lam * (mass * (-math.log(var) - beta_u * (LOG_2PI + 1)) - 5000 * beta_a)
    assert out.poses.item() == pytest.approx(0.0, abs=1e-15)
    assert out.logits.item() == pytest.approx(logit, rel=1e-12)
    assert out.activations.item() == pytest.approx(_sigmoid(logit), rel=1e-12)


# ---- the numerical traps ------------------------------------------------------------------
def naive_procedure_1(votes: torch.Tensor, act: torch.Tensor, iterations: int, lam: float = 0.01) -> dict:
    """Procedure 1 as printed, the way ports write it: σ = sqrt(Σ R a (V − μ)² / Σ R a)
    with no floor and no ε, p_j = exp(−Σ_h (V_h − μ_h)² / 2σ_h²) / sqrt(Π_h 2πσ_h²) in linear
    space, R = a p / Σ a p.  votes [B, I, J, D], β_u = β_a = 0."""
    batch, children, parents, _ = votes.shape
    r = torch.full((batch, children, parents), 1.0 / parents, dtype=votes.dtype)
    infinite_density = False
    for t in range(iterations):
        ra = r * act[..., None]
        mass = ra.sum(dim=1, keepdim=True)
        mu = (ra[..., None] * votes).sum(dim=1, keepdim=True) / mass[..., None]
        var = (ra[..., None] * (votes - mu) ** 2).sum(dim=1, keepdim=True) / mass[..., None]
        cost = var.sqrt().log() * mass[..., None]
        a = torch.sigmoid(lam * (0.0 - cost.sum(dim=-1)))
        if t < iterations - 1:
            p = torch.exp(-((votes - mu) ** 2 / (2 * var)).sum(dim=-1)) / torch.sqrt((2 * math.pi * var).prod(dim=-1))
            infinite_density |= bool(torch.isinf(p).any())
            r = a * p / (a * p).sum(dim=-1, keepdim=True)
    return {"mu": mu.squeeze(1), "a": a.squeeze(1), "infinite_density": infinite_density}


def _clustered_votes() -> tuple[torch.Tensor, torch.Tensor]:
    """8 children voting for 10 parents: each parent's votes a tight cluster (σ 0.03) in
    16-D, float32 (an ordinary late-training situation: agreeing votes)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(1, 1, 10, 16, generator=g)
    votes = centres + 0.03 * torch.randn(1, 8, 10, 16, generator=g)
    return votes, torch.rand(1, 8, generator=g)


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_naive_formula_hits_nan_at_three_iterations_ours_does_not() -> None:
    """The ports' NaN at 3+ iterations, reproduced: after two M-steps the variances are
    ~1e-5, the product of 16 of them underflows in float32, the density normaliser
    1/sqrt(Π 2πσ²) is inf and R = inf/inf = NaN at the third M-step.  Remedy: σ² floor
    (min_var) + E-step in log space (log σ² summed, logsigmoid, log-sum-exp)."""
    votes, act = _clustered_votes()
    naive = {it: naive_procedure_1(votes, act, it) for it in (1, 2, 3, 4)}
    assert _finite(naive[1]["mu"], naive[1]["a"]) and _finite(naive[2]["mu"], naive[2]["a"])
    assert not _finite(naive[3]["mu"], naive[3]["a"]) and not _finite(naive[4]["mu"], naive[4]["a"])
    assert naive[3]["infinite_density"] and not naive[2]["infinite_density"]
    ones = torch.ones(10)
    for it in range(1, 8):
        for cost in ("official", "paper"):
            out = em_routing(votes.unsqueeze(1), act.unsqueeze(1), 0.5 * ones, 0.5 * ones, iterations=it, cost=cost)
            assert out.poses.dtype == torch.float32
            assert _finite(out.poses, out.activations, out.couplings), (it, cost)
            torch.testing.assert_close(out.couplings.sum(dim=-1), torch.ones(1, 1, 8))


def test_naive_formula_nans_on_zero_votes_ours_does_not() -> None:
    """Zero (or identical) votes: σ = 0 exactly, (V − μ)²/σ² = 0/0."""
    votes, act = torch.zeros(2, 6, 3, 16), torch.rand(2, 6)
    assert not _finite(naive_procedure_1(votes, act, 2)["mu"])
    assert not _finite(naive_procedure_1(votes, act, 3)["a"])
    beta_u = torch.full((3,), 0.5, requires_grad=True)
    beta_a = torch.full((3,), 0.5, requires_grad=True)
    for it in (1, 2, 3, 5):
        v = votes.unsqueeze(1).clone().requires_grad_(True)
        a = act.unsqueeze(1).clone().requires_grad_(True)
        out = em_routing(v, a, beta_u, beta_a, iterations=it)
        assert _finite(out.poses, out.activations, out.couplings)
        (out.activations.sum() + out.poses.sum()).backward()
        assert _finite(v.grad, a.grad, beta_u.grad, beta_a.grad)


@pytest.mark.parametrize("normalisation", ["paper", "official"])
def test_convolutional_zero_votes_and_inactive_children_stay_finite(normalisation: str) -> None:
    geometry = ConvGeometry(in_types=2, in_size=(5, 5), kernel=3, stride=2)
    votes = torch.zeros(2, 4, geometry.window, 3, 16, requires_grad=True)
    acts = torch.zeros(2, 4, geometry.window)  # every child inactive: masses = ε only
    acts[1] = 1.0
    acts.requires_grad_(True)
    ones = torch.full((3,), 0.5, requires_grad=True)
    for it in (1, 3, 5):
        out = em_routing(votes, acts, ones, ones, iterations=it, geometry=geometry, normalisation=normalisation)
        assert _finite(out.poses, out.activations, out.couplings)
        out.activations.sum().backward()
        assert _finite(votes.grad, acts.grad, ones.grad)


def test_float32_far_votes_stay_finite() -> None:
    """Votes 100 apart: every log-density is ~ −1e7; linear-space densities are all 0."""
    g = torch.Generator().manual_seed(3)
    votes = 100 * torch.randn(2, 1, 20, 4, 16, generator=g)
    out = em_routing(votes, torch.rand(2, 1, 20, generator=g), torch.zeros(4), torch.zeros(4), iterations=4)
    assert _finite(out.poses, out.activations, out.couplings)


# ---- properties ---------------------------------------------------------------------------
def test_shapes() -> None:
    geometry = ConvGeometry(in_types=4, in_size=(6, 6), kernel=3, stride=1)
    votes = torch.randn(3, 16, 36, 5, 16)
    out = em_routing(votes, torch.rand(3, 16, 36), torch.zeros(5), torch.zeros(5), geometry=geometry)
    assert out.poses.shape == (3, 16, 5, 16)
    assert out.activations.shape == out.logits.shape == (3, 16, 5)
    assert out.couplings.shape == (3, 16, 36, 5)
    assert ((out.activations > 0) & (out.activations < 1)).all()


@pytest.mark.parametrize("stride", [1, 2])
def test_responsibilities_sum_to_one_over_parents(stride: int) -> None:
    geometry = ConvGeometry(in_types=2, in_size=(7, 7), kernel=3, stride=stride)
    (ho, wo), parents = geometry.out_size, 4
    votes, acts = _random_inputs((2, ho * wo, geometry.window, parents, 16), 50)
    beta_u, beta_a = _betas(parents, 5)
    # paper: per child, over every parent (type and position) that covers it; children
    # found by loops, independently of ConvGeometry.child_index
    out = em_routing(votes, acts, beta_u, beta_a, iterations=3, geometry=geometry)
    sums: dict[tuple[int, int, int, int], float] = {}
    for n in range(ho * wo):
        for c in range(geometry.window):
            i, uh, uw = c // 9, (c // 3) % 3, c % 3
            for b in range(2):
                key = (b, i, (n // wo) * stride + uh, (n % wo) * stride + uw)
                sums[key] = sums.get(key, 0.0) + float(out.couplings[b, n, c].sum())
    np.testing.assert_allclose(list(sums.values()), 1.0, rtol=1e-12)
    assert len(sums) == 2 * 2 * ((ho - 1) * stride + 3) ** 2
    # fully connected: a softmax over the parents
    fc = em_routing(votes[:, :1], acts[:, :1], beta_u, beta_a, iterations=3)
    torch.testing.assert_close(fc.couplings.sum(dim=-1), torch.ones(2, 1, geometry.window, dtype=torch.float64))
    # official, stride 1: per parent type, over the positions covering the child, a total of
    # S / (S + 1e-7), S the group's exponentials shifted by the maximum over the whole
    # (child type, parent type) block: 1 for the group holding that maximum, less (down to ~0)
    # for groups far below it (the official code's leak, kept)
    if stride == 1:
        off = em_routing(votes, acts, beta_u, beta_a, iterations=3, geometry=geometry, normalisation="official")
        per_type: dict[tuple[int, int, int, int], float] = {}
        for n in range(ho * wo):
            for c in range(geometry.window):
                i, uh, uw = c // 9, (c // 3) % 3, c % 3
                for j in range(parents):
                    key = (i, (n // wo) + uh, (n % wo) + uw, j)
                    per_type[key] = per_type.get(key, 0.0) + float(off.couplings[0, n, c, j])
        totals = np.array(list(per_type.values()))
        assert len(totals) == 2 * 7 * 7 * parents
        assert (totals > 0).all() and (totals <= 1 + 1e-12).all()
        block_max = {
            (k[0], k[3]): max(v for q, v in per_type.items() if (q[0], q[3]) == (k[0], k[3])) for k in per_type
        }
        np.testing.assert_allclose(list(block_max.values()), 1.0, atol=1e-6)
        assert totals.min() < 0.9  # the leak is real on these votes


@pytest.mark.parametrize("conv", [False, True])
def test_gradients_reach_votes_activations_and_betas(conv: bool) -> None:
    geometry = ConvGeometry(in_types=2, in_size=(5, 5), kernel=3, stride=2) if conv else None
    positions, window = (4, geometry.window) if conv else (1, 12)
    votes, acts = _random_inputs((2, positions, window, 3, 16), 60)
    votes.requires_grad_(True)
    acts.requires_grad_(True)
    beta_u, beta_a = (b.requires_grad_(True) for b in _betas(3, 6))
    out = em_routing(votes, acts, beta_u, beta_a, iterations=3, geometry=geometry)
    (out.activations.sum() + out.poses.pow(2).sum()).backward()
    for name, tensor in {"votes": votes, "activations": acts, "beta_u": beta_u, "beta_a": beta_a}.items():
        assert tensor.grad is not None and _finite(tensor.grad), name
        assert tensor.grad.abs().sum() > 0, name


def test_gradient_matches_finite_differences() -> None:
    votes, acts = _random_inputs((1, 1, 6, 2, 4), 70)
    beta_u, beta_a = _betas(2, 7)
    inputs = tuple(t.clone().requires_grad_(True) for t in (votes, acts, beta_u, beta_a))

    def f(v: torch.Tensor, a: torch.Tensor, bu: torch.Tensor, ba: torch.Tensor) -> torch.Tensor:
        out = em_routing(v, a, bu, ba, iterations=3, final_lambda=1.0, activation_scale=1.0)
        return out.activations.sum() + out.poses.sum()

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("normalisation", ["paper", "official"])
def test_batch_independence(normalisation: str) -> None:
    geometry = ConvGeometry(in_types=2, in_size=(5, 5), kernel=3, stride=1)
    votes, acts = _random_inputs((4, 9, geometry.window, 3, 16), 80)
    beta_u, beta_a = _betas(3, 8)
    kwargs = {"iterations": 3, "geometry": geometry, "normalisation": normalisation}
    together = em_routing(votes, acts, beta_u, beta_a, **kwargs)
    for b in range(4):
        alone = em_routing(votes[b : b + 1], acts[b : b + 1], beta_u, beta_a, **kwargs)
        for x, y in zip(alone, together, strict=True):
            torch.testing.assert_close(x, y[b : b + 1], rtol=1e-13, atol=1e-15)


def test_rejects_bad_settings() -> None:
    votes, acts = torch.zeros(1, 1, 2, 2, 4), torch.zeros(1, 1, 2)
    with pytest.raises(ValueError, match="iterations must be >= 1"):
        em_routing(votes, acts, torch.zeros(2), torch.zeros(2), iterations=0)
    with pytest.raises(ValueError, match="cost must be one of"):
        em_routing(votes, acts, torch.zeros(2), torch.zeros(2), cost="other")
    with pytest.raises(ValueError, match="do not match"):
        em_routing(votes, torch.zeros(1, 1, 3), torch.zeros(2), torch.zeros(2))


# ---- the Router interface ---------------------------------------------------------------
def test_router_interface_uses_child_lengths_as_activations() -> None:
    router = EMRouter(in_caps=10, out_caps=4, in_dim=8, out_dim=16).double()
    assert router.needs_inputs and router.couplings_sum_to_one
    g = torch.Generator().manual_seed(90)
    votes = 0.3 * torch.randn(3, 10, 4, 16, generator=g, dtype=torch.float64)
    inputs = 0.3 * torch.randn(3, 10, 8, generator=g, dtype=torch.float64)
    routed = router(votes, inputs)
    assert isinstance(routed, Routed)
    assert routed.poses.shape == (3, 4, 16) and routed.activations.shape == (3, 4)
    torch.testing.assert_close(routed.couplings.sum(dim=-1), torch.ones(3, 10, dtype=torch.float64))
    # the same as routing with a_i = |u_i| (the class-layer defaults: λ = 0.01/4, β_u = 2, β_a = 1)
    a_ref, mu_ref, _ = reference_fc_official(
        votes.numpy(), inputs.norm(dim=-1).numpy(), np.full(4, 2.0), np.full(4, 1.0), 3, 0.01 / 4
    )
    np.testing.assert_allclose(routed.activations.detach().numpy(), a_ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(routed.poses.detach().numpy(), mu_ref, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="needs the child capsules"):
        router(votes)


def test_router_batch_independence_and_gradients_at_zero_inputs() -> None:
    router = EMRouter(in_caps=6, out_caps=3, in_dim=8, out_dim=16)
    votes = torch.randn(4, 6, 3, 16)
    inputs = torch.randn(4, 6, 8)
    inputs[0] = 0.0  # zero-length children: a_i = 0, |u|'s gradient at 0 is finite
    inputs.requires_grad_(True)
    together = router(votes, inputs)
    for b in range(4):
        alone = router(votes[b : b + 1], inputs[b : b + 1])
        torch.testing.assert_close(alone.poses, together.poses[b : b + 1])
        torch.testing.assert_close(alone.activations, together.activations[b : b + 1])
    together.activations.sum().backward()
    assert _finite(inputs.grad, router.beta_u.grad, router.beta_a.grad)
    assert router.beta_u.grad.abs().sum() > 0 and router.beta_a.grad.abs().sum() > 0
