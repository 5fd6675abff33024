"""Routing-by-agreement (Sabour et al. 2017, Procedure 1), as a function and as a Router.

Pure torch: nothing here knows about Lightning or Hydra.
"""

from __future__ import annotations

import torch
from torch import Tensor

from capsnet.nn.routing.base import Routed, Router
from capsnet.nn.routing.squash import SQUASH_EPS, capsule_lengths, squash

__all__ = ["SQUASH_EPS", "DynamicRouting", "capsule_lengths", "dynamic_routing", "squash"]


def _leaky_softmax(logits: Tensor) -> Tensor:
    """Softmax over the parents (dim 1) beside one extra zero logit, whose share is dropped."""
    leak = logits.new_zeros(logits.shape[0], 1, logits.shape[2])
    return torch.softmax(torch.cat([leak, logits], dim=1), dim=1)[:, 1:]


def dynamic_routing(
    u_hat: Tensor,
    iterations: int,
    bias: Tensor | None = None,
    detach_agreement: bool = False,
    leaky: bool = False,
) -> tuple[Tensor, Tensor]:
    """Route prediction vectors from child capsules i to parent capsules j (Procedure 1).

    Every example gets fresh logits ``b = 0``; the coupling coefficients are a softmax over
    the *parents* j. With ``iterations == 1`` the coupling is uniform (1/J): no routing.

    Args:
        u_hat: prediction vectors û_{j|i}.
        iterations: r >= 1 routing iterations.
        bias: optional per-parent bias [J, D] added to s_j (the official code's digit bias).
        detach_agreement: stop the gradient through the agreement updates of b (a later
            variant, not the paper's; off by default).
        leaky: the official code's leaky routing (§7's "none-of-the-above" category): the
            softmax over parents gets one more logit fixed at 0, whose share is dropped, so a
            child's couplings sum to less than 1.

    Returns:
        ``(v, c)``: parent capsules and the final coupling coefficients.

    Shapes:
        u_hat: [B, I, J, D]; bias: [J, D]; v: [B, J, D]; c: [B, I, J].
    """
    if iterations < 1:
        raise ValueError(f"routing iterations must be >= 1, got {iterations}")
    # Work parent-major so both contractions over i are batched matmuls.  When u_hat is
    # a transposed view of a parent-major tensor (as DigitCaps makes it), this is free.
    u_pm = u_hat.transpose(1, 2)  # (B, J, I, D)
    u_agree = u_pm.detach() if detach_agreement else u_pm
    batch, parents, children, _ = u_pm.shape
    logits = u_pm.new_zeros(batch, parents, children)  # b_ij, (B, J, I), fresh per example
    for iteration in range(iterations):
        coupling = _leaky_softmax(logits) if leaky else torch.softmax(logits, dim=1)  # over parents j, (B, J, I)
        s = torch.matmul(coupling.unsqueeze(2), u_pm).squeeze(2)  # (B, J, D)
        if bias is not None:
            s = s + bias
        v = squash(s)
        if iteration < iterations - 1:
            v_agree = v.detach() if detach_agreement else v
            agreement = torch.matmul(u_agree, v_agree.unsqueeze(-1)).squeeze(-1)  # (B, J, I)
            logits = logits + agreement
    return v, coupling.transpose(1, 2)


class DynamicRouting(Router):
    """Procedure 1 (``routing=dynamic``): ``iters`` rounds of routing by agreement.

    Args:
        in_caps, out_caps, in_dim, out_dim: see :class:`Router`.
        iters: r >= 1 routing iterations (the paper: 1 and 3; r = 1 is uniform coupling).
        leaky: the official code's leaky routing (§7's "none-of-the-above" category).
        detach_agreement: no gradient through the logit updates (later work; not the paper's).
    """

    name = "dynamic"
    iterative = True
    takes_parent_bias = True  # the official code's per-parent bias, added before each squash

    def __init__(
        self,
        *,
        in_caps: int,
        out_caps: int,
        in_dim: int,
        out_dim: int,
        iters: int = 3,
        leaky: bool = False,
        detach_agreement: bool = False,
    ) -> None:
        super().__init__(in_caps=in_caps, out_caps=out_caps, in_dim=in_dim, out_dim=out_dim)
        if iters < 1:
            raise ValueError(f"routing iterations must be >= 1, got {iters}")
        self.iters, self.leaky, self.detach_agreement = iters, leaky, detach_agreement
        self.couplings_sum_to_one = not leaky  # the leaked share is dropped

    def forward(
        self, votes: Tensor, inputs: Tensor | None = None, *, bias: Tensor | None = None, iterations: int | None = None
    ) -> Routed:
        """Shapes: votes [B, I, J, D] -> poses [B, J, D], couplings [B, I, J]; ``bias`` [J, D].

        ``iterations`` overrides ``iters`` for this call (the routing-convergence figure)."""
        v, c = dynamic_routing(
            votes,
            self.iters if iterations is None else iterations,
            bias=bias,
            detach_agreement=self.detach_agreement,
            leaky=self.leaky,
        )
        return Routed(v, c)

    def extra_repr(self) -> str:
        return f"iters={self.iters}, leaky={self.leaky}, detach_agreement={self.detach_agreement}"
