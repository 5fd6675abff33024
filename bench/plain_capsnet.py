"""The plain CapsNet the benchmark and the equivalence tests compare against.

Written the way most ports write it: eager float32, an einsum for the prediction vectors
and broadcast-multiply-and-sum routing, materialising [B, 1152, 10, 16] products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsnet.nn.models import CapsNet


def plain_squash(s: Tensor) -> Tensor:
    norm_sq = (s**2).sum(-1, keepdim=True)
    return norm_sq / (1 + norm_sq) * s / torch.sqrt(norm_sq + 1e-8)


class PlainCapsNet(nn.Module):
    def __init__(self, routing_iterations: int) -> None:
        super().__init__()
        self.iterations = routing_iterations
        self.conv1 = nn.Conv2d(1, 256, 9)
        self.primary = nn.Conv2d(256, 256, 9, stride=2)
        self.W = nn.Parameter(torch.randn(1152, 10, 16, 8) * 0.05)
        self.decoder = nn.Sequential(
            nn.Linear(160, 512), nn.ReLU(), nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 784), nn.Sigmoid()
        )

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = F.relu(self.conv1(x))
        p = self.primary(h)  # (B, 256, 6, 6)
        b_, _, hh, ww = p.shape
        u = p.view(b_, 32, 8, hh, ww).permute(0, 1, 3, 4, 2).reshape(b_, -1, 8)
        u = plain_squash(u)
        u_hat = torch.einsum("ijdk,bik->bijd", self.W, u)  # (B, 1152, 10, 16)
        logits = torch.zeros(b_, 1152, 10, device=x.device)
        for it in range(self.iterations):
            c = F.softmax(logits, dim=2)
            v = plain_squash((c.unsqueeze(-1) * u_hat).sum(dim=1))  # (B, 10, 16)
            if it < self.iterations - 1:
                logits = logits + (u_hat * v.unsqueeze(1)).sum(-1)
        lengths = torch.sqrt((v**2).sum(-1) + 1e-8)
        mask_idx = y if y is not None else lengths.argmax(1)
        mask = F.one_hot(mask_idx, 10).float()
        recon = self.decoder((v * mask.unsqueeze(-1)).flatten(1)).view(-1, 1, 28, 28)
        return lengths, recon


def copy_weights(ours: CapsNet, plain: PlainCapsNet) -> None:
    """Give the plain model our weights (W re-laid out from (I, 8, J*16) to (I, J, 16, 8))."""
    with torch.no_grad():
        plain.conv1.load_state_dict(ours.conv1[0].state_dict())
        plain.primary.load_state_dict(ours.primary_caps.conv.state_dict())
        plain.W.copy_(ours.digit_caps.weight.view(1152, 8, 10, 16).permute(0, 2, 3, 1))
        plain.decoder.load_state_dict(ours.decoder.net.state_dict())
