"""EM routing (Hinton, Sabour, Frosst, "Matrix capsules with EM routing", ICLR 2018).

The M-step and E-step follow the official code, google-research/google-research
``capsule_em/em_layers.py``: ``update_em_routing`` (a fully connected layer: the class
capsules) and ``update_conv_routing`` (a convolutional capsule layer).  For one parent j
with votes V_ij ∈ R^D of children i with activations a_i and assignments R_ij:

M-step (iteration t = 0 … T−1, inverse temperature λ_t = λ·(1 − 0.95^(t+1))):
    m_j   = Σ_i R_ij a_i + ε_mass
    μ_j   = 0.9 · Σ_i R_ij a_i V_ij / m_j + 0.1 · μ_j(previous iteration; 0 at first)
    σ²_jh = min_var + Σ_i R_ij a_i (V_ijh − μ_jh)² / m_j
    logit_j = λ_t · (m_j · (−Σ_h log σ²_jh − β_u,j · D · (ln 2π + 1)) − 5000 · β_a,j)
    a_j   = sigmoid(logit_j)
E-step:
    log p_ij = log a_j − ½ (D ln 2π + Σ_h log σ²_jh) − Σ_h (V_ijh − μ_jh)² / (2 σ²_jh)
    R_ij  = the p_ij normalised over the parents a child votes for (see ``normalisation``)
The output is (μ_j, a_j) of the last M-step.

That is the paper's Procedure 1 with the official code's constants and re-parametrisation.
Against the paper's text: the paper's cost is Σ_h (β_u + log σ_jh) m_j and its activation
sigmoid(λ(β_a − Σ_h cost_h)); the official code puts Σ_h log σ²_h = 2 Σ_h log σ_h, scales
β_u by D (ln 2π + 1) (twice the Gaussian entropy's constant), flips the sign of β_a and
scales it by 5000, smooths μ with momentum 0.1 and floors σ² with ``min_var``.  The paper
gives no λ schedule; the official one is above (λ = 0.01 in the convolutional layers,
0.01 / 4 in the class layer).  ``cost="paper"`` computes the paper's cost instead (with the
same σ² floor); ``center_momentum=0`` drops the smoothing of μ.

Numerical traps and the remedies used here (tests: tests/unit/test_em_routing.py):
  * σ² → 0 (identical or zero votes, a parent fed by a single child, or assignments that
    collapse onto one child after a few iterations): log σ² = −∞ and (V − μ)² / σ² = 0/0.
    Remedy: the official additive floor σ² = min_var + … (never a clamp, so the gradient
    keeps flowing), and log σ² is used directly (no sqrt, no product of D densities).
  * the D = 16 dimensional Gaussian density in linear space: once the variances have
    shrunk (~1e-5 after two iterations on agreeing votes), Π_h 2πσ²_h underflows in
    float32, the normaliser 1/sqrt(Π_h 2πσ²_h) is inf and R = inf/inf; or every a_j p_j of
    a child underflows and R = 0/0 — the NaN that ports hit at 3+ iterations.  Remedy: the
    E-step stays in log space (log a_j = logsigmoid, Σ_h log σ²_h, log p_ij as above) and
    is normalised by a max-shifted log-sum-exp.
  * m_j = 0 (every child inactive): μ = 0/0.  Remedy: ε_mass (official: 1e-5 in the class
    layer, 1e-7 in the convolutional layers).

Normalisation of the E-step in a convolutional layer (``ConvGeometry``):
  * ``"paper"``: each child's R sums to 1 over every parent whose kernel covers it (all
    parent types at all those positions), as Procedure 1 and the paper's account of
    convolutional capsules describe; the first M-step uses R = 1 / (number of such parents).
  * ``"official"``: what ``update_conv_routing`` computes: each child's R is normalised
    separately for every parent type, over the positions whose kernels cover it, via a
    padded, dilated ``extract_image_patches``; that trick groups kernel entries (o, u) by
    o + u, which is the child's position only at stride 1 (at stride 2 it groups entries
    of different children).  Exponentials are shifted by their maximum over positions and
    kernel offsets per (example, child type, parent type) and the sum gets + 1e-7, so a
    group whose shifted exponentials sum to S gets R summing to S / (S + 1e-7): 1 for the
    group holding the block's maximum, down to ~0 for groups far below it (kept here, and
    tested).  The first M-step uses R = 1 / J (a softmax of zeros over parent types).
  In a fully connected layer both are the softmax over the J parents.

Shapes (one layout for both kinds of layer): the parents sit at N positions (N = 1 when
fully connected), each position's parents see a window of C children:
    votes [B, N, C, J, D]; activations [B, N, C]; β_u, β_a [J]
    -> poses [B, N, J, D], activations [B, N, J], couplings [B, N, C, J].
For a convolutional layer the window index is c = (i·K + u_h)·K + u_w (child type i,
kernel offset u) and the position index n = o_h·W_out + o_w.

Every example is routed on its own: nothing is shared across the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsnet.nn.routing.base import Routed, Router

LOG_2PI = math.log(2 * math.pi)
COSTS = ("official", "paper")
NORMALISATIONS = ("official", "paper")
# The official code's constants (capsule_em/em_layers.py, experiment.py).
OFFICIAL_MIN_VAR = 0.0005
OFFICIAL_FINAL_LAMBDA = 0.01  # --final_beta; the class layer uses final_beta / 4
OFFICIAL_LAMBDA_GROWTH = 0.95  # λ_t = final · (1 − 0.95^(t+1))
OFFICIAL_ACTIVATION_SCALE = 5000.0
OFFICIAL_CENTER_MOMENTUM = 0.1
OFFICIAL_POSTERIOR_EPS = 1e-7  # the convolutional E-step's + 0.0000001


def lambda_schedule(iterations: int, final_lambda: float, growth: float = OFFICIAL_LAMBDA_GROWTH) -> list[float]:
    """The inverse temperature of each iteration: final · (1 − growth^(t+1)), t = 0 … T−1
    (official code; ``growth=0`` gives a constant λ)."""
    return [final_lambda * (1.0 - growth ** (t + 1)) for t in range(iterations)]


@dataclass(frozen=True)
class ConvGeometry:
    """Where the children of a K×K, stride-s convolutional capsule layer sit.

    Args:
        in_types: I, child capsule types.
        in_size: (H_in, W_in) of the child grid.
        kernel: K.
        stride: s.
    """

    in_types: int
    in_size: tuple[int, int]
    kernel: int
    stride: int

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple((n - self.kernel) // self.stride + 1 for n in self.in_size)  # type: ignore[return-value]

    @property
    def window(self) -> int:
        """C: children per parent position."""
        return self.in_types * self.kernel * self.kernel

    def _grid(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(type, o_h, o_w, u_h, u_w) of every (n, c) entry, each broadcast to [N, C]."""
        k, (ho, wo) = self.kernel, self.out_size
        o_h, o_w = torch.meshgrid(torch.arange(ho), torch.arange(wo), indexing="ij")
        i, u_h, u_w = torch.meshgrid(torch.arange(self.in_types), torch.arange(k), torch.arange(k), indexing="ij")
        shape = (ho * wo, self.window)
        return (
            i.reshape(1, -1).expand(shape),
            o_h.reshape(-1, 1).expand(shape),
            o_w.reshape(-1, 1).expand(shape),
            u_h.reshape(1, -1).expand(shape),
            u_w.reshape(1, -1).expand(shape),
        )

    @cached_property
    def child_index(self) -> Tensor:
        """[N, C] int64: the child (type, row, column), flattened, each entry votes from."""
        i, o_h, o_w, u_h, u_w = self._grid()
        h_in, w_in = self.in_size
        return (i * h_in + o_h * self.stride + u_h) * w_in + o_w * self.stride + u_w

    @property
    def num_children(self) -> int:
        return self.in_types * self.in_size[0] * self.in_size[1]

    @cached_property
    def official_group(self) -> Tensor:
        """[N, C] int64: the official code's normalisation groups (type, o_h + u_h, o_w + u_w)."""
        i, o_h, o_w, u_h, u_w = self._grid()
        ho, wo = self.out_size
        span_h, span_w = ho + self.kernel - 1, wo + self.kernel - 1
        return (i * span_h + o_h + u_h) * span_w + o_w + u_w

    @property
    def num_official_groups(self) -> int:
        ho, wo = self.out_size
        return self.in_types * (ho + self.kernel - 1) * (wo + self.kernel - 1)


class EMResult(NamedTuple):
    """What EM routing returns (see the module docstring for shapes).

    Attributes:
        poses: μ of the last M-step (the parents' poses).
        activations: sigmoid(logit) of the last M-step.
        couplings: the assignments R the last M-step used (before the factor a_i).
        logits: the activations' pre-sigmoid values.
    """

    poses: Tensor
    activations: Tensor
    couplings: Tensor
    logits: Tensor


def _scatter(values: Tensor, index: Tensor, size: int, reduce: str) -> Tensor:
    """Reduce ``values`` [B, M, ...] over dim 1 into ``size`` slots by ``index`` [M]."""
    shape = (values.shape[0], size, *values.shape[2:])
    idx = index.view(1, -1, *([1] * (values.dim() - 2))).expand_as(values)
    out = values.new_zeros(shape)
    if reduce == "sum":
        return out.scatter_add(1, idx, values)
    return out.scatter_reduce(1, idx, values, reduce="amax", include_self=False)


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """values [B, G, ...] at ``index`` [M] along dim 1 -> [B, M, ...]."""
    return values.index_select(1, index)


def em_routing(
    votes: Tensor,
    activations: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    *,
    iterations: int = 3,
    final_lambda: float = OFFICIAL_FINAL_LAMBDA,
    lambda_growth: float = OFFICIAL_LAMBDA_GROWTH,
    min_var: float = OFFICIAL_MIN_VAR,
    mass_eps: float = 1e-5,
    center_momentum: float = OFFICIAL_CENTER_MOMENTUM,
    activation_scale: float = OFFICIAL_ACTIVATION_SCALE,
    cost: str = "official",
    geometry: ConvGeometry | None = None,
    normalisation: str = "paper",
    posterior_eps: float = OFFICIAL_POSTERIOR_EPS,
) -> EMResult:
    """EM routing of ``votes`` weighted by the children's ``activations`` (module docstring).

    Args:
        iterations: T, EM iterations (the paper: 3).
        final_lambda, lambda_growth: the inverse temperature schedule (``lambda_schedule``).
        min_var: the floor added to every variance.
        mass_eps: added to every parent's mass Σ_i R_ij a_i.
        center_momentum: share of the previous iteration's μ kept (official: 0.1).
        activation_scale: the factor on β_a in the official cost (5000).
        cost: "official" or "paper" (the activation's cost, see the module docstring).
        geometry: the convolutional layer's layout; None for a fully connected layer
            (then N must be 1, or N independent fully connected routings).
        normalisation: "paper" or "official" E-step grouping in a convolutional layer.
        posterior_eps: the official convolutional E-step's + 1e-7.

    Shapes:
        votes [B, N, C, J, D]; activations [B, N, C]; beta_u, beta_a [J].
    """
    if iterations < 1:
        raise ValueError(f"EM routing: iterations must be >= 1, got {iterations}")
    if cost not in COSTS:
        raise ValueError(f"EM routing: cost must be one of {COSTS}, got {cost!r}")
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"EM routing: normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    batch, positions, window, parents, dim = votes.shape
    if activations.shape != (batch, positions, window):
        raise ValueError(f"EM routing: activations {tuple(activations.shape)} do not match votes {tuple(votes.shape)}")
    if geometry is not None and (positions, window) != (math.prod(geometry.out_size), geometry.window):
        raise ValueError(f"EM routing: votes {tuple(votes.shape)} do not match {geometry}")
    conv = geometry is not None
    official_groups = conv and normalisation == "official"

    # Initial assignments: uniform over the parents each child votes for.
    if conv and not official_groups:
        child = geometry.child_index.to(votes.device).reshape(-1)
        fan_out = torch.bincount(child, minlength=geometry.num_children).to(votes.dtype) * parents
        posterior = (1.0 / fan_out)[child].view(1, positions, window, 1).expand(batch, -1, -1, parents)
    else:
        posterior = votes.new_full((batch, positions, window, parents), 1.0 / parents)

    a_in = activations.unsqueeze(-1)  # [B, N, C, 1]
    center = votes.new_zeros(batch, positions, 1, parents, dim)
    logit = votes.new_zeros(batch, positions, parents)
    used = posterior
    for t, lam in enumerate(lambda_schedule(iterations, final_lambda, lambda_growth)):
        used = posterior
        # ---- M-step --------------------------------------------------------------------
        vote_conf = posterior * a_in  # [B, N, C, J]
        masses = vote_conf.sum(dim=2, keepdim=True) + mass_eps  # [B, N, 1, J]
        weights = vote_conf / masses  # [B, N, C, J]
        # Weighted sums over the window as contractions (no [B, N, C, J, D] product kept)
        mean = torch.einsum("bncj,bncjd->bnjd", weights, votes).unsqueeze(2)  # [B, N, 1, J, D]
        center = (1.0 - center_momentum) * mean + center_momentum * center
        noise = (votes - center).pow(2)  # [B, N, C, J, D]
        variance = min_var + torch.einsum("bncj,bncjd->bnjd", weights, noise).unsqueeze(2)  # [B, N, 1, J, D]
        log_var = variance.log()
        mass = masses.squeeze(2)  # [B, N, J]
        sum_log_var = log_var.sum(dim=-1).squeeze(2)  # [B, N, J]
        if cost == "official":
            win = mass * (-sum_log_var - beta_u * dim * (LOG_2PI + 1.0))
            logit = lam * (win - activation_scale * beta_a)
        else:  # Σ_h (β_u + log σ_h) m_j, with log σ = ½ log σ²
            logit = lam * (beta_a - mass * (dim * beta_u + 0.5 * sum_log_var))
        if t == iterations - 1:
            break  # the last E-step's assignments are never used
        # ---- E-step (log space) --------------------------------------------------------
        log_p = (
            F.logsigmoid(logit).unsqueeze(2)
            - 0.5 * (dim * LOG_2PI + sum_log_var).unsqueeze(2)
            - torch.einsum("bncjd,bnjd->bncj", noise, 0.5 / variance.squeeze(2))
        )  # [B, N, C, J]
        if not conv:
            posterior = torch.softmax(log_p, dim=-1)
        elif official_groups:
            posterior = _official_conv_posterior(log_p, geometry, posterior_eps)
        else:
            posterior = _paper_conv_posterior(log_p, geometry)
    return EMResult(poses=center.squeeze(2), activations=torch.sigmoid(logit), couplings=used, logits=logit)


def _paper_conv_posterior(log_p: Tensor, geometry: ConvGeometry) -> Tensor:
    """R normalised, per child, over every (position, type) parent it votes for: a
    log-sum-exp over the child's group, shifted by the group's (detached) maximum."""
    batch, positions, window, parents = log_p.shape
    child = geometry.child_index.to(log_p.device).reshape(-1)
    flat = log_p.reshape(batch, positions * window, parents)
    with torch.no_grad():
        shift = _gather(_scatter(flat.amax(dim=-1), child, geometry.num_children, "amax"), child)
    shifted = flat - shift.unsqueeze(-1)
    total = _gather(_scatter(shifted.exp().sum(dim=-1), child, geometry.num_children, "sum"), child)
    return (shifted - total.log().unsqueeze(-1)).exp().view_as(log_p)


def _official_conv_posterior(log_p: Tensor, geometry: ConvGeometry, eps: float) -> Tensor:
    """``update_conv_routing``'s E-step normalisation: per parent type, over the entries
    that share a group (type, o_h + u_h, o_w + u_w); exponentials shifted by their maximum
    over positions and kernel offsets per (example, child type, parent type); + eps."""
    batch, positions, window, parents = log_p.shape
    k2 = geometry.kernel * geometry.kernel
    by_type = log_p.view(batch, positions, geometry.in_types, k2, parents)
    shift = by_type.amax(dim=(1, 3), keepdim=True)  # [B, 1, I, 1, J]
    prior_exp = (by_type - shift).exp().reshape(batch, positions * window, parents)
    group = geometry.official_group.to(log_p.device).reshape(-1)
    total = _gather(_scatter(prior_exp, group, geometry.num_official_groups, "sum"), group)
    return (prior_exp / (total + eps)).view_as(log_p)


class EMRouter(Router):
    """EM routing with learned β_u and β_a per parent type, usable two ways.

    * ``route(votes, activations, geometry)``: the matrix-capsule layers' call, with the
      children's own activations (and a ``ConvGeometry`` in a convolutional layer).
    * ``forward(votes, inputs)``: the ``Router`` interface, for vector capsules.  EM needs
      an activation per child; our children are squashed vector capsules, so a_i is the
      length |u_i| ∈ [0, 1) of each child (the probability that the entity exists, as in
      dynamic routing).  The parents' activations come back as ``Routed.activations``;
      ``Routed.poses`` are the means μ_j (dimension ``out_dim``: EM needs no 4×4 matrix).

    The defaults are the official code's class-capsule layer (β_u = 2, β_a = 1 initially,
    λ = 0.01 / 4, ε_mass = 1e-5); its convolutional capsule layers use β_u = β_a = 0.5,
    λ = 0.01, ε_mass = 1e-7 (see ``capsnet.nn.matrix_capsules``).

    Args (besides ``Router``'s shapes): see ``em_routing``; ``beta_u_init`` and
    ``beta_a_init`` start β_u and β_a.
    """

    name = "em"
    couplings_sum_to_one = True
    needs_inputs = True

    def __init__(
        self,
        *,
        in_caps: int,
        out_caps: int,
        in_dim: int,
        out_dim: int,
        iters: int = 3,
        final_lambda: float = OFFICIAL_FINAL_LAMBDA / 4,
        lambda_growth: float = OFFICIAL_LAMBDA_GROWTH,
        min_var: float = OFFICIAL_MIN_VAR,
        mass_eps: float = 1e-5,
        center_momentum: float = OFFICIAL_CENTER_MOMENTUM,
        activation_scale: float = OFFICIAL_ACTIVATION_SCALE,
        cost: str = "official",
        normalisation: str = "paper",
        posterior_eps: float = OFFICIAL_POSTERIOR_EPS,
        beta_u_init: float = 2.0,
        beta_a_init: float = 1.0,
    ) -> None:
        super().__init__(in_caps=in_caps, out_caps=out_caps, in_dim=in_dim, out_dim=out_dim)
        if iters < 1:
            raise ValueError(f"EM routing: iterations must be >= 1, got {iters}")
        if cost not in COSTS:
            raise ValueError(f"EM routing: cost must be one of {COSTS}, got {cost!r}")
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"EM routing: normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
        self.iters, self.final_lambda, self.lambda_growth = iters, final_lambda, lambda_growth
        self.min_var, self.mass_eps, self.center_momentum = min_var, mass_eps, center_momentum
        self.activation_scale, self.cost, self.normalisation = activation_scale, cost, normalisation
        self.posterior_eps = posterior_eps
        self.beta_u = nn.Parameter(torch.full((out_caps,), float(beta_u_init)))
        self.beta_a = nn.Parameter(torch.full((out_caps,), float(beta_a_init)))

    def route(self, votes: Tensor, activations: Tensor, geometry: ConvGeometry | None = None) -> EMResult:
        """EM routing of votes [B, N, C, J, D] with child activations [B, N, C]."""
        return em_routing(
            votes,
            activations,
            self.beta_u.to(votes.dtype),
            self.beta_a.to(votes.dtype),
            iterations=self.iters,
            final_lambda=self.final_lambda,
            lambda_growth=self.lambda_growth,
            min_var=self.min_var,
            mass_eps=self.mass_eps,
            center_momentum=self.center_momentum,
            activation_scale=self.activation_scale,
            cost=self.cost,
            geometry=geometry,
            normalisation=self.normalisation,
            posterior_eps=self.posterior_eps,
        )

    def forward(self, votes: Tensor, inputs: Tensor | None = None) -> Routed:
        """Route votes [B, I, J, out_dim] of the vector capsules ``inputs`` [B, I, in_dim];
        a_i = |u_i|."""
        if inputs is None:
            raise ValueError("EMRouter needs the child capsules (inputs) for their activations |u_i|")
        activations = torch.linalg.vector_norm(inputs, dim=-1)
        result = self.route(votes.unsqueeze(1), activations.unsqueeze(1))
        return Routed(
            poses=result.poses.squeeze(1),
            couplings=result.couplings.squeeze(1),
            activations=result.activations.squeeze(1),
        )

    def extra_repr(self) -> str:
        return (
            f"in_caps={self.in_caps}, out_caps={self.out_caps}, iters={self.iters}, "
            f"final_lambda={self.final_lambda}, cost={self.cost!r}, normalisation={self.normalisation!r}"
        )


__all__ = ["ConvGeometry", "EMResult", "EMRouter", "em_routing", "lambda_schedule"]
