"""The squash non-linearity (Eq. 1) and routing-by-agreement (Procedure 1).

Pure torch: nothing here knows about Lightning or Hydra.
"""

from __future__ import annotations

import torch
from torch import Tensor

SQUASH_EPS = 1e-8


def squash(s: Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> Tensor:
    """Shrink a vector to length ``|s|^2 / (1 + |s|^2)`` keeping its direction (Eq. 1).

    ``eps`` sits inside the square root so the gradient stays finite at ``s = 0``; the
    plain ``s / |s|`` gives NaN gradients there.

    Shapes:
        s: [..., D] (capsule dimension at ``dim``) -> same shape.
    """
    norm_sq = s.pow(2).sum(dim=dim, keepdim=True)
    scale = norm_sq / (1.0 + norm_sq) / torch.sqrt(norm_sq + _representable(eps, s.dtype))
    return scale * s


def capsule_lengths(v: Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> Tensor:
    """Length of each capsule (the class probability in the paper), safe at zero."""
    return torch.sqrt(v.pow(2).sum(dim=dim) + _representable(eps, v.dtype))


def _representable(eps: float, dtype: torch.dtype) -> float:
    """``eps``, raised to the smallest normal number of ``dtype`` where it would round to 0
    (1e-8 is 0 in float16, which would bring back the NaN gradient at s = 0)."""
    return max(eps, torch.finfo(dtype).tiny) if dtype.is_floating_point else eps


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
