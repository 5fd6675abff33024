"""The three capsule-network building blocks: PrimaryCaps, DigitCaps and the decoder."""

from __future__ import annotations

from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor, nn

from capsnet.nn.routing import Routed, Router
from capsnet.nn.routing.dynamic import DynamicRouting
from capsnet.nn.routing.squash import squash


class PrimaryCaps(nn.Module):
    """A 9×9 stride-2 convolution whose channels are cut into 8-D capsules, then squashed.

    No ReLU: the squash is the non-linearity (§4).

    Args:
        scale: multiplies the convolution before its bias.  1 is the paper's plain
            convolution; the official code's primary capsules are a routing layer with one
            input capsule, whose uniform coupling 1/32 (1/33 with leaky routing) scales the
            convolution, so for the same Adam rate its kernel moves about 32× less per step.
    """

    def __init__(
        self,
        *,
        in_channels: int = 256,
        capsule_types: int = 32,
        capsule_dim: int = 8,
        kernel_size: int = 9,
        stride: int = 2,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.capsule_types = capsule_types
        self.capsule_dim = capsule_dim
        self.scale = scale
        self.conv = nn.Conv2d(in_channels, capsule_types * capsule_dim, kernel_size=kernel_size, stride=stride)

    def forward(self, features: Tensor) -> Tensor:
        """Shapes: features [B, C, H, W] -> capsules [B, types*H'*W', capsule_dim]."""
        if self.scale == 1.0:
            out = self.conv(features)
        else:  # (W * x) · scale + b, the official code's order
            out = self.conv._conv_forward(features, self.conv.weight, None) * self.scale
            out = out + self.conv.bias.view(1, -1, 1, 1)
        capsules = rearrange(out, "b (n d) h w -> b (n h w) d", n=self.capsule_types)
        return squash(capsules)


class DigitCaps(nn.Module):
    """One 8×16 matrix per (primary capsule i, digit capsule j), then a router.

    The prediction vectors (votes) are computed as one batched matmul over i, written
    straight into the parent-major layout routing consumes, so no [B, I, J, 16, 8]
    broadcast is ever materialised.  The router is a plug-in (``routing=<name>``): a
    callable that builds a :class:`~capsnet.nn.routing.Router` from the shapes it routes
    between, e.g. ``functools.partial(DynamicRouting, iters=3)``.
    """

    def __init__(
        self,
        *,
        in_capsules: int,
        in_dim: int = 8,
        out_capsules: int = 10,
        out_dim: int = 16,
        router: Callable[..., Router] = DynamicRouting,
        bias: bool = False,
        weight_std: float = 0.05,
    ) -> None:
        super().__init__()
        self.in_capsules, self.in_dim = in_capsules, in_dim
        self.out_capsules, self.out_dim = out_capsules, out_dim
        # W_ij stored as (I, in_dim, J*out_dim) so û = u @ W is a single bmm over i.
        self.weight = nn.Parameter(torch.randn(in_capsules, in_dim, out_capsules * out_dim) * weight_std)
        self.bias = nn.Parameter(torch.zeros(out_capsules, out_dim)) if bias else None
        self.router = router(in_caps=in_capsules, out_caps=out_capsules, in_dim=in_dim, out_dim=out_dim)
        if bias and not self.router.takes_parent_bias:
            raise ValueError(
                f"model.digit_bias=true needs a router that adds a per-parent bias (routing=dynamic); "
                f"{type(self.router).__name__} does not"
            )

    def predictions(self, u: Tensor, weight: Tensor | None = None) -> Tensor:
        """Prediction vectors û_{j|i} = W_ij u_i (``weight`` defaults to W itself).

        Shapes: u [B, I, in_dim] -> u_hat [B, I, J, out_dim] (a view of a parent-major tensor).
        """
        weight = self.weight if weight is None else weight
        batch = u.shape[0]
        assert u.shape[1:] == (self.in_capsules, self.in_dim), (
            f"expected {self.in_capsules} capsules of {self.in_dim}D, got {tuple(u.shape[1:])}"
        )
        u_hat = torch.bmm(u.transpose(0, 1), weight)  # (I, B, J*D)
        u_hat = u_hat.view(self.in_capsules, batch, self.out_capsules, self.out_dim)
        u_pm = u_hat.permute(1, 2, 0, 3).contiguous()  # (B, J, I, D)
        return u_pm.transpose(1, 2)  # (B, I, J, D) view

    def forward(self, u: Tensor, iterations: int | None = None) -> Routed:
        """Shapes: u [B, I, in_dim] -> Routed(poses [B, J, out_dim], couplings [B, I, J], ...).

        Under mixed precision (autocast) the routing still runs in float32: its softmax of
        summed agreements is the precision-sensitive part, and a small share of the time.
        Under a pure precision (bf16-true, 16-true, float64) it runs in the module's own dtype.
        ``iterations`` overrides an iterative router's count for this call.
        """
        device_type = u.device.type
        dtype = torch.float32 if torch.is_autocast_enabled(device_type) else self.weight.dtype
        with torch.autocast(device_type=device_type, enabled=False):
            u = u.to(dtype)
            votes = self.predictions(u, self.weight.to(dtype))
            extra: dict[str, object] = {}
            if self.bias is not None:
                extra["bias"] = self.bias.to(dtype)
            if iterations is not None:
                extra["iterations"] = iterations
            return self.router(votes, u if self.router.needs_inputs else None, **extra)


class Decoder(nn.Module):
    """FC 512 → FC 1024 → FC H·W·C with a sigmoid, fed the masked digit capsules (§4.1)."""

    def __init__(
        self,
        *,
        num_capsules: int = 10,
        capsule_dim: int = 16,
        out_shape: tuple[int, int, int] = (1, 28, 28),
        output: str = "sigmoid",
    ) -> None:
        super().__init__()
        assert output in ("sigmoid", "linear"), f"decoder output must be sigmoid or linear, got {output!r}"
        self.out_shape = out_shape
        channels, height, width = out_shape
        self.net = nn.Sequential(
            nn.Linear(num_capsules * capsule_dim, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, channels * height * width),
            # sigmoid for pixels in [0, 1] (§4.1); linear for standardised images (CIFAR-10)
            nn.Sigmoid() if output == "sigmoid" else nn.Identity(),
        )

    def forward(self, poses: Tensor, labels: Tensor) -> Tensor:
        """Decode one capsule per example; all other capsules are zeroed.

        Shapes: poses [B, K, D], labels [B] long -> images [B, C, H, W].
        """
        mask = torch.zeros(poses.shape[:2], dtype=poses.dtype, device=poses.device)
        mask.scatter_(1, labels.view(-1, 1), 1.0)
        flat = (poses * mask.unsqueeze(-1)).flatten(1)
        return self.net(flat).view(-1, *self.out_shape)
