"""Self-routing (Hahn, Pyeon, Kim, NeurIPS 2019).

What the official code computes (coder3000/SR-CapsNet, ``modules.py``, ``SelfRouting2d``),
for a fully-connected layer (their class layer is ``SelfRouting2d`` with the kernel as large as
the feature map and no padding, so every child feeds one output position):

1. Each child i computes its own routing logits from its pose with a routing matrix and
   bias of its own: logit_ij = W2_i[j] · u_i + b2_ij (``W2`` [children, parents, in_dim],
   ``b2`` [children, parents], both initialised to 0, so routing starts uniform).
2. r_i = softmax over the **parents** j of logit_i.  No iterations, no agreement.
3. With child activations a_i: parent activation a_j = Σ_i a_i r_ij / Σ_i a_i.
4. Parent pose (their ``pose_out=True`` layers): the weighted average of the votes,
   p_j = Σ_i c_ij û_{j|i} with c_ij = a_i r_ij / Σ_i' a_i' r_i'j.  No squash.

Child activations.  The official models take a_i from a branch of their own,
sigmoid(BatchNorm(conv(features))), beside the pose branch.  Our children are squashed
capsules with no separate activation, so by default a_i is the child's length,
sqrt(|u_i|² + eps) (in (0, 1) like a sigmoid; eps inside the root keeps the gradient finite
and a_i > 0, so nothing divides 0 by 0 when a capsule, or the whole input, is 0).
``child_activation="ones"`` sets every a_i = 1 (c_ij = r_ij / Σ_i r_ij); and a caller with an
activation branch of its own (as in the official models) passes ``child_activations`` to
:meth:`SelfRouting.forward`, which overrides both (they must be positive, as a sigmoid's are).

Not here: the official class layer sets ``pose_out=False`` (it returns activations only and
the model classifies with log(a_j) and an NLL loss); we return the poses as its hidden
layers do, since our decoder reads the class poses.  Also not here: the votes' own
transformation (their ``W1``; our owning layer makes the votes), convolutional capsule
layers, the BatchNorm between capsule layers and on the primary poses and activations
(batch statistics: an example's output would depend on its batch), and the ResNet backbone.
Note the parents' activations sum to 1 over the parents (each r_i does).

Pure torch: nothing here knows about Lightning or Hydra.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from capsnet.nn.routing.base import Routed, Router

CHILD_ACTIVATIONS = ("length", "ones")


class SelfRouting(Router):
    """Each child routes itself: a per-child linear map of its pose, softmaxed over the parents.

    Args:
        in_caps, out_caps, in_dim, out_dim: see :class:`Router`.
        child_activation: how a child's activation a_i is derived from its capsule u_i where
            the caller passes none: ``"length"`` (default), sqrt(|u_i|² + eps); ``"ones"``, 1.
        eps: inside the square root of the length.

    Parameters (the official ``W2`` and ``b2``, zero-initialised as there):
        weight: [in_caps, out_caps, in_dim]; bias: [in_caps, out_caps].
    """

    name = "self_routing"
    couplings_sum_to_one = True
    needs_inputs = True

    def __init__(
        self,
        *,
        in_caps: int,
        out_caps: int,
        in_dim: int,
        out_dim: int,
        child_activation: str = "length",
        eps: float = 1e-8,
    ) -> None:
        super().__init__(in_caps=in_caps, out_caps=out_caps, in_dim=in_dim, out_dim=out_dim)
        if child_activation not in CHILD_ACTIVATIONS:
            raise ValueError(f"child_activation must be one of {CHILD_ACTIVATIONS}, got {child_activation!r}")
        self.child_activation = child_activation
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(in_caps, out_caps, in_dim))  # W2_i: pose -> logits over parents
        self.bias = nn.Parameter(torch.zeros(in_caps, out_caps))  # b2_ij

    def extra_repr(self) -> str:
        return (
            f"in_caps={self.in_caps}, out_caps={self.out_caps}, in_dim={self.in_dim}, out_dim={self.out_dim}, "
            f"child_activation={self.child_activation!r}"
        )

    def child_activations(self, inputs: Tensor) -> Tensor:
        """a_i from the child capsules.  Shapes: inputs [B, I, in_dim] -> [B, I]."""
        if self.child_activation == "ones":
            return inputs.new_ones(inputs.shape[:2])
        eps = max(self.eps, torch.finfo(inputs.dtype).tiny)  # 1e-8 would be 0 in float16
        return torch.sqrt(inputs.pow(2).sum(dim=-1) + eps)

    def forward(self, votes: Tensor, inputs: Tensor | None = None, child_activations: Tensor | None = None) -> Routed:
        """Route; ``child_activations`` (positive) replaces the ones derived from ``inputs``.

        Shapes: votes [B, I, J, D], inputs [B, I, in_dim], child_activations [B, I]
            -> poses [B, J, D], couplings [B, I, J] (r_ij), activations [B, J].
        """
        if inputs is None:
            raise ValueError("self-routing computes its couplings from the child capsules: pass inputs")
        batch, children, parents, dim = votes.shape
        assert (children, parents, dim) == (self.in_caps, self.out_caps, self.out_dim), (
            f"expected votes [B, {self.in_caps}, {self.out_caps}, {self.out_dim}], got {tuple(votes.shape)}"
        )
        assert inputs.shape == (batch, self.in_caps, self.in_dim), (
            f"expected inputs [{batch}, {self.in_caps}, {self.in_dim}], got {tuple(inputs.shape)}"
        )
        weight, bias = self.weight.to(votes.dtype), self.bias.to(votes.dtype)
        # One small matmul per child i: (I, B, in_dim) @ (I, in_dim, J) -> (I, B, J).
        logits = torch.bmm(inputs.to(votes.dtype).transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1) + bias
        routing = torch.softmax(logits, dim=2)  # r_ij, over the parents j, (B, I, J)
        if child_activations is None:
            child_activations = self.child_activations(inputs.to(votes.dtype))
        a_in = child_activations.to(votes.dtype).unsqueeze(-1)  # (B, I, 1)
        weighted = a_in * routing  # a_i r_ij, (B, I, J)
        weighted_sum = weighted.sum(dim=1)  # Σ_i a_i r_ij, (B, J)
        coeff = weighted / weighted_sum.unsqueeze(1)  # c_ij, a distribution over the children, (B, I, J)
        poses = torch.matmul(coeff.transpose(1, 2).unsqueeze(2), votes.transpose(1, 2)).squeeze(2)  # (B, J, D)
        activations = weighted_sum / a_in.sum(dim=1)  # (B, J)
        return Routed(poses=poses, couplings=routing, activations=activations)
