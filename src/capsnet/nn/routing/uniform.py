"""No routing: every child sends its vote to every parent with the same weight 1/J.

The "is routing needed?" control of the routing zoo (e.g. AffCapsNets, arXiv 1911.07968,
reports MNIST-trained capsule networks without routing).  It equals dynamic routing
(Sabour et al. 2017, Procedure 1) with one iteration: fresh logits b = 0 give c_ij = 1/J.

Pure torch.
"""

from __future__ import annotations

from torch import Tensor

from capsnet.nn.routing.base import Routed, Router
from capsnet.nn.routing.squash import squash_fn


class UniformRouting(Router):
    """v_j = squash(Σ_i c_ij û_{j|i}) with c_ij = 1/J for every child i and parent j.

    No parameters, no iterations.

    Args:
        in_caps, out_caps, in_dim, out_dim: see :class:`Router`.
        squash: ``"hinton"`` (Eq. 1, the default: this router is then dynamic routing with
            r = 1) or ``"efficient"`` (Efficient-CapsNet's, to compare with
            :class:`~capsnet.nn.routing.self_attention.SelfAttentionRouting` on equal terms).
    """

    name = "uniform"
    couplings_sum_to_one = True

    def __init__(self, *, in_caps: int, out_caps: int, in_dim: int, out_dim: int, squash: str = "hinton") -> None:
        super().__init__(in_caps=in_caps, out_caps=out_caps, in_dim=in_dim, out_dim=out_dim)
        self.squash_name = squash
        self.squash = squash_fn(squash)

    def forward(self, votes: Tensor, inputs: Tensor | None = None) -> Routed:
        """Shapes: votes [B, I, J, D] -> poses [B, J, D], couplings [B, I, J] (all 1/J)."""
        assert votes.shape[1:] == (self.in_caps, self.out_caps, self.out_dim), (
            f"expected votes [B, {self.in_caps}, {self.out_caps}, {self.out_dim}], got {tuple(votes.shape)}"
        )
        couplings = votes.new_full(votes.shape[:3], 1.0 / self.out_caps)  # c_ij = 1/J, (B, I, J)
        s = votes.sum(dim=1) / self.out_caps  # s_j = Σ_i û_{j|i} / J, (B, J, D)
        return Routed(self.squash(s), couplings)

    def extra_repr(self) -> str:
        return f"in_caps={self.in_caps}, out_caps={self.out_caps}, out_dim={self.out_dim}, squash={self.squash_name!r}"
