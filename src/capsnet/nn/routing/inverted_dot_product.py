"""Inverted dot-product attention routing (Tsai, Srivastava, Goh, Salakhutdinov, ICLR 2020).

What the official code computes for a fully-connected capsule layer
(apple/ml-capsules-inverted-attention-routing, ``src/layers.py``, ``CapsuleFC.forward``), on
the votes û_{j|i} our owning layer has already made:

1. First pass (their ``next_capsule_value is None`` branch): routing coefficients are a
   softmax over the parents of all-zero logits, i.e. 1/J, so
   p_j = LayerNorm(Σ_i (1/J) û_{j|i}).  This is the paper's Procedure 2 with the parent poses
   initialised to 0 (a zero pose agrees equally with every vote).
2. Each further pass: agreement a_ij = (p_j · û_{j|i}) / sqrt(D); r_i = softmax over the
   **parents** j of a_i (the "inverted" attention: parents compete for each child); the code
   then divides r_i once more by (Σ_j r_ij + 1e-10); p_j = LayerNorm(Σ_i r_ij û_{j|i}).
3. ``nn.LayerNorm(out_d_capsules)``: a learnable layer norm over the pose dimension, with
   PyTorch's defaults (eps 1e-5, weight 1, bias 0), applied after every pass, and a dropout
   (rate ``dp``, default 0.0 in ``main_capsule.py``) just before it.

The number of passes is ``--num_routing`` in ``main_capsule.py``: argparse default 1 (only
the uniform first pass, no routing), but every result the README reports for routing
(CIFAR-10 94.85%, CIFAR-100 76.27%) is run with ``--num_routing 2``; 2 is the default here.

Paper and code differ in two details, both options here, the code being the default:
  * the code scales the agreement by 1/sqrt(D) (``scale_agreement``); the paper's Eq. 2 and
    Procedure 1 do not.
  * the code's extra division of the couplings by (Σ_j r_ij + 1e-10) (``renorm_eps``; 0
    skips it).  It changes the couplings by about 1e-10 relative, no more.

Not here (they belong to the owning model, or our body has no place for them): their
matrix poses (4×4 pose matrices, ``matrix_pose``), the votes' weights and initialisation,
convolutional capsule layers, the concurrent routing of several capsule layers at once (with
a single routed layer, concurrent and sequential routing coincide), the LayerNorm'd primary
capsules, the ResNet backbone, and the classifier: the official model reads class logits
with a shared ``nn.Linear(D, 1)`` on the class poses and a cross-entropy loss.  The parents
returned here are layer-normalised, so their lengths are about sqrt(D) times the layer
norm's scale, not probabilities in (0, 1).

Pure torch: nothing here knows about Lightning or Hydra.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from capsnet.nn.routing.base import Routed, Router

#: the official code's guard in its second normalisation of the couplings (``CapsuleFC``)
OFFICIAL_RENORM_EPS = 1e-10


class InvertedDotProductRouting(Router):
    """Parents attend to their children's votes; each child's routing is a softmax over parents.

    Args:
        in_caps, out_caps, in_dim, out_dim: see :class:`Router`.
        iters: passes over the votes, >= 1; 1 is the uniform first pass alone (no routing).
            Default 2: the iteration count of every routing result the official README
            reports (its argparse default is 1).
        scale_agreement: divide the agreement p_j · û_{j|i} by sqrt(out_dim), as the official
            code does (default); False gives the paper's Eq. 2.
        renorm_eps: the official code divides the softmaxed couplings again by
            (Σ_j r_ij + renorm_eps), with 1e-10 (default); 0 skips that division.
        dropout: dropout rate on the summed parent poses before each layer norm (the official
            ``dp``, default 0.0).  Only active in training mode.
        layer_norm_eps: the layer norm's eps (PyTorch's default, which the official code uses).
        classifier: class scores from the official shared ``Linear(out_dim, 1)`` on each
            parent pose, through a sigmoid (``activations``), so the margin loss has scores in
            [0, 1]: the layer-normed poses are all about sqrt(out_dim) long, so their lengths
            say nothing of the class.  (The official model trains the linear's logits with a
            cross-entropy; the harness keeps one loss for every router.)  False: lengths.

    Parameters: the layer norm's weight and bias, [out_dim] each; the classifier's
    [out_dim] weight and bias.
    """

    name = "inverted_dot_product"
    couplings_sum_to_one = True
    needs_inputs = False

    def __init__(
        self,
        *,
        in_caps: int,
        out_caps: int,
        in_dim: int,
        out_dim: int,
        iters: int = 2,
        scale_agreement: bool = True,
        renorm_eps: float = OFFICIAL_RENORM_EPS,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
        classifier: bool = True,
    ) -> None:
        super().__init__(in_caps=in_caps, out_caps=out_caps, in_dim=in_dim, out_dim=out_dim)
        if iters < 1:
            raise ValueError(f"routing iterations must be >= 1, got {iters}")
        if renorm_eps < 0:
            raise ValueError(f"renorm_eps must be >= 0, got {renorm_eps}")
        self.iters = iters
        self.scale = 1.0 / math.sqrt(out_dim) if scale_agreement else 1.0
        self.renorm_eps = renorm_eps
        self.layer_norm = nn.LayerNorm(out_dim, eps=layer_norm_eps)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(out_dim, 1) if classifier else None

    def extra_repr(self) -> str:
        return (
            f"in_caps={self.in_caps}, out_caps={self.out_caps}, out_dim={self.out_dim}, iters={self.iters}, "
            f"scale={self.scale:.4g}, renorm_eps={self.renorm_eps:g}"
        )

    def _normalise(self, s: Tensor) -> Tensor:
        """Dropout, then the learnable layer norm over the pose dimension, in ``s``'s dtype.

        Shapes: s [B, J, D] -> [B, J, D].
        """
        ln = self.layer_norm
        weight, bias = ln.weight.to(s.dtype), ln.bias.to(s.dtype)
        return F.layer_norm(self.drop(s), ln.normalized_shape, weight, bias, ln.eps)

    def forward(self, votes: Tensor, inputs: Tensor | None = None) -> Routed:
        """Shapes: votes [B, I, J, D] -> poses [B, J, D], couplings [B, I, J]; ``inputs`` unused."""
        batch, children, parents, dim = votes.shape
        assert (children, parents, dim) == (self.in_caps, self.out_caps, self.out_dim), (
            f"expected votes [B, {self.in_caps}, {self.out_caps}, {self.out_dim}], got {tuple(votes.shape)}"
        )
        # Parent-major, so both contractions over i are batched matmuls (free when votes is a
        # transposed view of a parent-major tensor, as DigitCaps makes it).
        votes_pm = votes.transpose(1, 2)  # (B, J, I, D)
        # First pass: softmax over parents of zero logits = 1/J (equivalently, poses start at 0).
        coupling = votes.new_full((batch, parents, children), 1.0 / parents)  # r_ij, (B, J, I)
        poses = self._normalise(torch.matmul(coupling.unsqueeze(2), votes_pm).squeeze(2))  # (B, J, D)
        for _ in range(self.iters - 1):
            agreement = torch.matmul(votes_pm, poses.unsqueeze(-1)).squeeze(-1) * self.scale  # (B, J, I)
            coupling = torch.softmax(agreement, dim=1)  # over the parents j, (B, J, I)
            if self.renorm_eps:
                coupling = coupling / (coupling.sum(dim=1, keepdim=True) + self.renorm_eps)
            poses = self._normalise(torch.matmul(coupling.unsqueeze(2), votes_pm).squeeze(2))  # (B, J, D)
        activations = None
        if self.classifier is not None:  # (B, J): one shared linear read-out per parent pose
            weight, bias = self.classifier.weight.to(poses.dtype), self.classifier.bias.to(poses.dtype)
            activations = torch.sigmoid(F.linear(poses, weight, bias).squeeze(-1))
        return Routed(poses=poses, couplings=coupling.transpose(1, 2), activations=activations)  # couplings (B, I, J)
