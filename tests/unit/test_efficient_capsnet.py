"""Efficient-CapsNet (Mazzia et al. 2021): the paper's parameter count, counted by hand from
the official graph, and the model's contract (the same as capsnet.nn.models.CapsNet's).

Architecture: repository EscVM/Efficient-CapsNet, ``models/efficient_capsnet_graph_mnist.py``
(``efficient_capsnet_graph``, ``generator_graph``) and ``utils/layers.py`` (``PrimaryCaps``,
``FCCaps``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from capsnet.nn.efficient_capsnet import EfficientCapsNet
from capsnet.nn.models import CapsNetOutput, count_parameters
from capsnet.nn.routing.self_attention import SelfAttentionRouting
from capsnet.nn.routing.squash import efficient_squash
from capsnet.nn.routing.uniform import UniformRouting

CONF = Path(__file__).resolve().parents[2] / "conf"

# Trainable parameters on MNIST (28×28×1), layer by layer, as Keras counts them.
# Batch norm: γ and β per channel are trainable; the moving mean and variance are not
# (Keras "non-trainable params", torch buffers).
CONV1 = 5 * 5 * 1 * 32 + 32  # Conv2D(32, 5): 832                     → 24×24×32
BN1 = 2 * 32  # 64
CONV2 = 3 * 3 * 32 * 64 + 64  # Conv2D(64, 3): 18,496                  → 22×22×64
BN2 = 2 * 64  # 128
CONV3 = 3 * 3 * 64 * 64 + 64  # Conv2D(64, 3): 36,928                  → 20×20×64
BN3 = 2 * 64  # 128
CONV4 = 3 * 3 * 64 * 128 + 128  # Conv2D(128, 3, 2): 73,856            → 9×9×128
BN4 = 2 * 128  # 256
PRIMARY = 9 * 9 * 1 * 128 + 128  # depthwise Conv2D(128, 9, groups=128): 10,496 → 1×1×128 = 16 capsules × 8D
FC_CAPS_W = 10 * 16 * 8 * 16  # FCCaps W [N=10, input_N=16, input_D=8, D=16]: 20,480
FC_CAPS_B = 10 * 16 * 1  # FCCaps b [10, 16, 1], the log priors: 160
ENCODER = CONV1 + BN1 + CONV2 + BN2 + CONV3 + BN3 + CONV4 + BN4 + PRIMARY + FC_CAPS_W + FC_CAPS_B
# generator_graph: Dense(512) Dense(1024) Dense(784) on the 160 masked capsule numbers
DECODER = (160 * 512 + 512) + (512 * 1024 + 1024) + (1024 * 784 + 784)


def test_hand_count_is_the_papers() -> None:
    assert ENCODER == 161_824  # the paper's figure: the capsule network without the decoder
    assert DECODER == 1_411_344


def test_parameter_count_on_mnist() -> None:
    """161,824 without the decoder, as reported; the decoder adds 1,411,344."""
    bare = EfficientCapsNet(input_size=28, in_channels=1, num_classes=10, reconstruction=False)
    assert count_parameters(bare) == ENCODER == 161_824
    full = EfficientCapsNet(input_size=28, in_channels=1, num_classes=10)
    assert count_parameters(full) == ENCODER + DECODER == 1_573_168
    assert count_parameters(full.decoder) == DECODER
    # the non-trainable batch-norm statistics Keras lists apart: 2 × (32 + 64 + 64 + 128)
    running = sum(b.numel() for name, b in full.named_buffers() if "running" in name)
    assert running == 576


@pytest.fixture(scope="module")
def model64() -> EfficientCapsNet:
    """The MNIST model in float64 and eval mode, batch-norm statistics moved off their start."""
    torch.manual_seed(2)
    model = EfficientCapsNet(input_size=28, in_channels=1, num_classes=10).double()
    with torch.no_grad():
        model(torch.rand(8, 1, 28, 28, dtype=torch.float64))  # train mode: updates the running statistics
        model.routing.log_priors.normal_(std=0.1)  # trained-looking priors
    return model.eval()


def test_shapes_and_output_contract(model64: EfficientCapsNet) -> None:
    model = model64
    assert model.num_primary_capsules == 16
    assert isinstance(model.routing, SelfAttentionRouting) and model.routing.log_priors.shape == (16, 10)
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    out = model(x)
    assert isinstance(out, CapsNetOutput)
    assert out.lengths.shape == (4, 10) and out.poses.shape == (4, 10, 16)
    assert out.reconstructions.shape == (4, 1, 28, 28)
    assert ((out.lengths > 0) & (out.lengths < 1)).all()
    assert ((out.reconstructions >= 0) & (out.reconstructions <= 1)).all()
    poses, couplings = model.encode(x)
    assert poses.shape == (4, 10, 16) and couplings.shape == (4, 16, 10)
    assert EfficientCapsNet(reconstruction=False)(torch.rand(2, 1, 28, 28)).reconstructions is None


def test_convolutions_are_relu_then_batch_norm_as_keras() -> None:
    features = EfficientCapsNet().features
    kinds = [type(m) for m in features]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d] * 4
    for bn in features[2::3]:
        assert bn.eps == 1e-3 and bn.momentum == 0.01  # Keras: epsilon 1e-3, momentum 0.99
    assert [m.stride for m in features[::3]] == [(1, 1), (1, 1), (1, 1), (2, 2)]


def test_primary_capsule_n_is_channels_8n_to_8n_plus_8() -> None:
    """Keras' Reshape((16, 8)) of the 1×1×128 depthwise output: consecutive channels."""
    primary = EfficientCapsNet(reconstruction=False).primary_caps
    features = torch.randn(2, 128, 9, 9)
    channels = primary.conv(features).flatten(1)  # (2, 128)
    expected = efficient_squash(torch.stack([channels[:, 8 * n : 8 * n + 8] for n in range(16)], dim=1))
    torch.testing.assert_close(primary(features), expected)


def test_primary_capsules_follow_keras_channels_last_order() -> None:
    """On a 2×2 map Keras' Reshape reads (h, w, f) row-major: capsule (h·W + w)·F/D + f/D."""
    model = EfficientCapsNet(reconstruction=False, primary_kernel=8)  # 9×9 → 2×2×128: 64 capsules
    assert model.num_primary_capsules == 64
    features = torch.randn(2, 128, 9, 9)
    out = model.primary_caps.conv(features)  # (2, 128, 2, 2)
    capsules = model.primary_caps(features)
    for h, w, group in [(0, 0, 0), (0, 1, 0), (1, 0, 3), (1, 1, 15)]:
        n = (h * 2 + w) * 16 + group
        torch.testing.assert_close(capsules[:, n], efficient_squash(out[:, 8 * group : 8 * group + 8, h, w]))


def test_reconstruction_masks_label_or_longest(model64: EfficientCapsNet) -> None:
    model = model64
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    out = model(x)
    torch.testing.assert_close(out.reconstructions, model.reconstruct(out.poses, out.lengths.argmax(dim=1)))
    other = (out.lengths.argmax(dim=1) + 1) % 10
    with_label = model(x, other).reconstructions
    torch.testing.assert_close(with_label, model.reconstruct(out.poses, other))
    assert (with_label - out.reconstructions).abs().max() > 1e-6
    with pytest.raises(RuntimeError, match="no decoder"):
        EfficientCapsNet(reconstruction=False).reconstruct(out.poses.float(), other)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(1)
    model = EfficientCapsNet()
    x = torch.rand(4, 1, 28, 28)
    out = model(x, torch.tensor([0, 1, 2, 3]))
    (out.lengths.sum() + out.reconstructions.pow(2).sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_batch_independence_in_eval_mode(model64: EfficientCapsNet) -> None:
    """With batch norm on its running statistics, an example's outputs do not depend on its batch."""
    model = model64
    assert not model.training and model.features[2].num_batches_tracked == 1
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    x[1:] *= torch.tensor([5.0, 0.0, 0.3], dtype=torch.float64).view(3, 1, 1, 1)
    together = model(x)
    for b in range(4):
        alone = model(x[b : b + 1])
        for got, want in zip(alone, together, strict=True):
            torch.testing.assert_close(got, want[b : b + 1], rtol=0, atol=1e-12)


def test_no_nan_on_blank_images() -> None:
    model = EfficientCapsNet()
    x = torch.zeros(2, 1, 28, 28, requires_grad=True)
    out = model(x, torch.tensor([3, 4]))
    assert all(torch.isfinite(t).all() for t in out)
    (out.lengths.sum() + out.reconstructions.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_keras_initialisation() -> None:
    """he_normal on the FC caps W uses Keras' fans for a 4-D kernel: J·I·in_dim = 1280."""
    torch.manual_seed(3)
    model = EfficientCapsNet()
    w = model.votes.weight
    std = math.sqrt(2 / (10 * 16 * 8))  # the std of the truncated draw is sqrt(2 / fan_in)
    assert w.abs().max() <= 2 * std / 0.87962566103423978
    assert abs(w.std().item() / std - 1) < 0.03
    conv2 = model.features[3].weight
    assert abs(conv2.std().item() / math.sqrt(2 / (3 * 3 * 32)) - 1) < 0.03
    assert not model.features[0].bias.any() and not model.primary_caps.conv.bias.any()


def test_multimnist_graph_shapes() -> None:
    """The official MultiMNIST graph (36×36): third conv stride 2, primary caps 5×5 stride 2."""
    model = EfficientCapsNet(input_size=36, conv_strides=(1, 1, 2, 2), primary_kernel=5, primary_stride=2)
    assert model.num_primary_capsules == 16
    out = model(torch.rand(2, 1, 36, 36))
    assert out.poses.shape == (2, 10, 16) and out.reconstructions.shape == (2, 1, 36, 36)


def test_another_router_plugs_in() -> None:
    model = EfficientCapsNet(reconstruction=False, routing=functools.partial(UniformRouting, squash="efficient"))
    assert isinstance(model.routing, UniformRouting)
    assert count_parameters(model) == ENCODER - FC_CAPS_B  # no priors
    _, couplings = model.encode(torch.rand(2, 1, 28, 28))
    torch.testing.assert_close(couplings, torch.full((2, 16, 10), 0.1))


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["model=efficient_capsnet", *overrides])


@pytest.mark.parametrize(("recon", "params"), [("true", 1_573_168), ("false", 161_824)])
def test_config_builds_the_model(recon: str, params: int) -> None:
    cfg = _compose(f"recon={recon}")
    assert cfg.model.name == "efficient_capsnet"
    kwargs = {k: v for k, v in cfg.model.items() if k != "name"}
    model = instantiate(kwargs, input_size=28, in_channels=1, num_classes=10, task="single", _convert_="all")
    assert isinstance(model, EfficientCapsNet) and count_parameters(model) == params


def test_config_takes_a_router_from_conf_routing() -> None:
    cfg = OmegaConf.to_container(_compose("recon=false").model, resolve=True)
    cfg.pop("name")
    cfg["routing"] = OmegaConf.to_container(OmegaConf.load(CONF / "routing" / "uniform.yaml"))
    model = instantiate(cfg, input_size=28, in_channels=1, num_classes=10, task="single", _convert_="all")
    assert isinstance(model.routing, UniformRouting) and count_parameters(model) == 161_824 - 160
