"""Every offered speed switch computes what the plain textbook implementation computes."""

from __future__ import annotations

import itertools
import sys
from contextlib import nullcontext

import pytest
import torch

from capsnet.nn.losses import margin_loss, reconstruction_loss
from capsnet.run.module import CapsNetModule
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from plain_capsnet import PlainCapsNet, copy_weights

LOSS = {
    "m_pos": 0.9,
    "m_neg": 0.1,
    "lam": 0.5,
    "recon_weight": 0.0005,
    "official_scaling": False,
    "mask_with_label_at_test": False,
}
OPTIM = {"lr": 1e-3, "decay_rate": 0.96, "decay_steps": 2000}
DATA = {"image_size": 28, "in_channels": 1, "num_classes": 10, "task": "single"}


def _plain_grads(plain: PlainCapsNet) -> dict[str, torch.Tensor]:
    return {
        "conv1": plain.conv1.weight.grad,
        "primary": plain.primary.weight.grad,
        "W": plain.W.grad.permute(0, 3, 1, 2).reshape(1152, 8, 160),  # back to our (I, 8, J*16)
        "decoder": plain.decoder[0].weight.grad,
    }


def _our_grads(module: CapsNetModule) -> dict[str, torch.Tensor]:
    net = module.net
    return {
        "conv1": net.conv1[0].weight.grad,
        "primary": net.primary_caps.conv.weight.grad,
        "W": net.digit_caps.weight.grad,
        "decoder": net.decoder.net[0].weight.grad,
    }


@pytest.mark.parametrize(
    ("channels_last", "bf16", "compiled", "iterations"),
    [(*combo, 3) for combo in itertools.product([False, True], [False, True], [False, True])]
    + [(False, False, False, 1)],
)
def test_switches_match_plain_implementation(channels_last: bool, bf16: bool, compiled: bool, iterations: int) -> None:
    torch.manual_seed(0)
    model_cfg = {"name": "capsnet", "routing_iterations": iterations, "reconstruction": True}
    module = CapsNetModule(model_cfg, DATA, LOSS, OPTIM, channels_last=channels_last, compile=compiled).train()
    plain = PlainCapsNet(iterations)
    copy_weights(module.net, plain)
    module.configure_model()
    x = torch.rand(6, 1, 28, 28)
    y = torch.randint(0, 10, (6,))

    lengths_p, recon_p = plain(x, y)
    loss_p = margin_loss(lengths_p, y) + reconstruction_loss(recon_p, x)
    loss_p.backward()

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        lengths, parts = module.objective(module.net, module._layout(x), y, None, training=True, step=0)
        loss = sum(parts.values())
    loss.backward()

    # float32 paths agree to float rounding; bfloat16 convolutions to bfloat16 rounding.
    rtol = 3e-2 if bf16 else 1e-4
    torch.testing.assert_close(lengths.float(), lengths_p.detach(), rtol=rtol, atol=rtol * 0.1)
    torch.testing.assert_close(loss.float(), loss_p.detach(), rtol=rtol, atol=0)
    ours, theirs = _our_grads(module), _plain_grads(plain)
    for name in ours:
        g, ref = ours[name].float().flatten(), theirs[name].flatten()
        cosine = torch.nn.functional.cosine_similarity(g, ref, dim=0)
        assert cosine > (0.99 if bf16 else 0.99999), f"{name}: gradient cosine {cosine:.6f}"
        assert (g.norm() / ref.norm() - 1).abs() < (0.05 if bf16 else 1e-4), name
