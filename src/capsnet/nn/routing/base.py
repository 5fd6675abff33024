"""The interface every routing algorithm implements.

Pure torch: nothing here knows about Lightning or Hydra.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn


class Routed(NamedTuple):
    """What a router returns.

    Attributes:
        poses: the parent capsules v_j.
        couplings: how much each child sends to each parent (the routing the algorithm
            settled on), or None for an algorithm without such coefficients.
        activations: the parents' activations where the algorithm computes them apart from
            the poses (EM routing, self-routing); None means "the length of each pose".

    Shapes:
        poses: [B, J, D_out]; couplings: [B, I, J]; activations: [B, J].
    """

    poses: Tensor
    couplings: Tensor | None
    activations: Tensor | None = None


class Router(nn.Module):
    """Routes the votes of I child capsules to J parent capsules.

    Subclasses take the shapes they route between as keyword arguments (the layer that owns
    the router passes them) plus their own settings (iterations, ...), which come from the
    router's config.  A router may hold parameters of its own (priors, a layer norm, ...).

    Class attributes say what the model and the shared router test may rely on:
        name: the router's name in records and the results table (``routing=<name>``).
        couplings_sum_to_one: each child's couplings are a distribution over the parents.
        needs_inputs: ``forward`` needs the child capsules themselves, not only their votes.
        takes_parent_bias: ``forward`` takes ``bias`` [J, D], added to each parent's sum
            (the official code's digit-capsule bias).
        iterative: ``forward`` takes ``iterations``, to route with another count than ``iters``.

    Args:
        in_caps: I, the number of child capsules.
        out_caps: J, the number of parent capsules.
        in_dim: the child capsules' dimension.
        out_dim: the parents' (and the votes') dimension.
    """

    name: str = ""
    couplings_sum_to_one: bool = True
    needs_inputs: bool = False
    takes_parent_bias: bool = False
    iterative: bool = False

    def __init__(self, *, in_caps: int, out_caps: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_caps, self.out_caps, self.in_dim, self.out_dim = in_caps, out_caps, in_dim, out_dim

    def forward(self, votes: Tensor, inputs: Tensor | None = None) -> Routed:
        """Route ``votes`` (û_{j|i}) to the parents.

        Every example is routed on its own: nothing may depend on the other examples of
        the batch, and nothing carries over from one call to the next.

        Shapes:
            votes: [B, I, J, out_dim]; inputs: [B, I, in_dim] (the child capsules u_i).
        """
        raise NotImplementedError
