"""The switches that follow the authors' TensorFlow code (Sarasra/models research/capsules),
checked against values computed by hand: the initialisation of ``model.init=official``
(models/layers/variables.py: weight_variable, bias_variable; the decoder is
tf.contrib.layers.fully_connected with its defaults) and the 1/32 primary-capsule coupling of
``model.primary_scale=official`` (the primary capsules are a routing layer with one input)."""

from __future__ import annotations

import math
from functools import partial

import torch

from capsnet.nn.layers import PrimaryCaps
from capsnet.nn.models import CapsNet
from capsnet.nn.routing.dynamic import DynamicRouting
from capsnet.nn.routing.squash import squash


def test_official_init_truncated_normals_biases_and_glorot_decoder() -> None:
    torch.manual_seed(0)
    net = CapsNet(init="official", digit_bias=True)
    for weight in (net.conv1[0].weight, net.primary_caps.conv.weight, net.digit_caps.weight):
        assert weight.abs().max() <= 0.2  # truncated at two stddevs of 0.1
        # a normal of stddev 0.1 truncated at ±2σ has stddev 0.1 · sqrt(1 - 2·2φ(2)/(2Φ(2) - 1)) = 0.08796
        assert abs(float(weight.std()) - 0.08796) < 0.002, float(weight.std())
    for bias in (net.conv1[0].bias, net.primary_caps.conv.bias, net.digit_caps.bias):
        assert torch.equal(bias, torch.full_like(bias, 0.1))
    linears = [m for m in net.decoder.net if isinstance(m, torch.nn.Linear)]
    for layer, (fan_in, fan_out) in zip(linears, [(160, 512), (512, 1024), (1024, 784)], strict=True):
        bound = math.sqrt(6 / (fan_in + fan_out))  # Glorot uniform: U(-b, b), variance b²/3
        assert layer.weight.abs().max() <= bound and float(layer.weight.abs().max()) > 0.95 * bound
        assert abs(float(layer.weight.var()) - bound**2 / 3) < 0.05 * bound**2 / 3
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_paper_init_is_the_default_and_draws_w_from_the_configured_normal() -> None:
    torch.manual_seed(0)
    net = CapsNet()
    assert abs(float(net.digit_caps.weight.std()) - 0.05) < 0.001
    assert net.primary_caps.scale == 1.0


def test_official_primary_scale_divides_the_convolution_by_32_before_the_bias() -> None:
    layer = PrimaryCaps(in_channels=1, capsule_types=2, capsule_dim=2, kernel_size=1, stride=1, scale=1 / 2)
    with torch.no_grad():
        layer.conv.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1))
        layer.conv.bias.copy_(torch.tensor([0.5, 0.0, -1.0, 1.0]))
    x = torch.tensor([[[[2.0]]]])  # one pixel of value 2
    # by hand: channel k = weight_k · 2 · 1/2 + bias_k = [1.5, 2.0, 2.0, 5.0]; capsules (1.5, 2), (2, 5)
    expected = squash(torch.tensor([[[1.5, 2.0], [2.0, 5.0]]]))
    torch.testing.assert_close(layer(x), expected)
    net = CapsNet(primary_scale="official")
    assert net.primary_caps.scale == 1 / 32
    leaky = CapsNet(primary_scale="official", router=partial(DynamicRouting, iters=3, leaky=True))
    assert leaky.primary_caps.scale == 1 / 33


def test_switches_keep_the_parameter_count() -> None:
    counts = {
        sum(p.numel() for p in CapsNet(init=init, primary_scale=scale).parameters())
        for init in ("paper", "official")
        for scale in ("paper", "official")
    }
    assert counts == {8_215_568}
