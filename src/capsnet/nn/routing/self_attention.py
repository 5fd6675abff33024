"""Efficient-CapsNet's self-attention routing (Mazzia, Salvetti, Chiaberge, Sci. Rep. 2021).

Transcribed from the official TensorFlow 2 code, repository EscVM/Efficient-CapsNet, file
``utils/layers.py``, layer ``FCCaps.call`` (the votes themselves, û = W u, stay with the
layer that owns the router).  For each example and each parent j, with votes û_{j|i} of
dimension d (the *parent* capsules' dimension, ``FCCaps.D``):

1. agreement of each vote with all votes for the same parent (the row sums of the
   self-attention matrix A_j = Û_j Û_jᵀ):  b_ij = Σ_k û_{j|i} · û_{j|k}  (k runs over every
   child, i itself included);
2. scaled: b_ij / sqrt(d);
3. softmax over the **parents** j (``tf.nn.softmax(c, axis=1)`` on a [B, J, I, 1] tensor);
4. plus the learnable "log priors" B_ij (``FCCaps.b``, shape [J, I, 1], zeros at start),
   added *after* the softmax, so a child's couplings need not sum to one once B is trained;
5. s_j = Σ_i (c_ij + B_ij) û_{j|i}, v_j = squash(s_j) with Efficient-CapsNet's squash
   ``(1 - e^{-|s|}) s / |s|`` (``utils/layers.py``, class ``Squash``).

One pass, no iterations; the gradient flows through the attention (no stop-gradient).

Pure torch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from capsnet.nn.routing.base import Routed, Router
from capsnet.nn.routing.squash import squash_fn


class SelfAttentionRouting(Router):
    """Self-attention routing with learnable log priors, as the official ``FCCaps`` computes it.

    Args:
        in_caps, out_caps, in_dim, out_dim: see :class:`Router`; the priors are [in_caps, out_caps].
        squash: ``"efficient"`` (default, the official code's) or ``"hinton"`` (Eq. 1 of
            Sabour et al., the project's :func:`capsnet.nn.routing.dynamic.squash`).
        priors: learn the log priors B (default, official); ``False`` drops them, and the
            couplings are then a softmax over the parents.

    ``couplings_sum_to_one`` is False: the priors are added after the softmax.  (With
    ``priors=False`` the instance says True.)  ``Routed.couplings`` are the weights actually
    applied to the votes, c_ij + B_ij.
    """

    name = "self_attention"
    couplings_sum_to_one = False

    def __init__(
        self,
        *,
        in_caps: int,
        out_caps: int,
        in_dim: int,
        out_dim: int,
        squash: str = "efficient",
        priors: bool = True,
    ) -> None:
        super().__init__(in_caps=in_caps, out_caps=out_caps, in_dim=in_dim, out_dim=out_dim)
        self.squash_name = squash
        self.squash = squash_fn(squash)
        # B_ij, official FCCaps.b: shape [J, I, 1], zero-initialised; stored here as [I, J],
        # the layout of the couplings.
        self.log_priors = nn.Parameter(torch.zeros(in_caps, out_caps)) if priors else None
        if not priors:
            self.couplings_sum_to_one = True
        self.scale = 1.0 / math.sqrt(out_dim)  # official: c / sqrt(FCCaps.D), D the parents' dimension

    def forward(self, votes: Tensor, inputs: Tensor | None = None) -> Routed:
        """Shapes: votes [B, I, J, D] -> poses [B, J, D], couplings [B, I, J]."""
        assert votes.shape[1:] == (self.in_caps, self.out_caps, self.out_dim), (
            f"expected votes [B, {self.in_caps}, {self.out_caps}, {self.out_dim}], got {tuple(votes.shape)}"
        )
        # Σ_k û_{j|k}: all votes for parent j summed, per example, (B, J, D).  Then
        # Σ_k A_j[i, k] = û_{j|i} · Σ_k û_{j|k} without building the I×I matrices A_j.
        total = votes.sum(dim=1)
        logits = torch.einsum("bijd,bjd->bij", votes, total) * self.scale  # (B, I, J)
        couplings = torch.softmax(logits, dim=2)  # over the parents j, (B, I, J)
        if self.log_priors is not None:
            couplings = couplings + self.log_priors  # (B, I, J) + (I, J)
        s = torch.einsum("bij,bijd->bjd", couplings, votes)  # s_j = Σ_i c_ij û_{j|i}, (B, J, D)
        return Routed(self.squash(s), couplings)

    def extra_repr(self) -> str:
        return (
            f"in_caps={self.in_caps}, out_caps={self.out_caps}, out_dim={self.out_dim}, "
            f"squash={self.squash_name!r}, priors={self.log_priors is not None}"
        )
