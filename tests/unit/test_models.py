"""Parameter counts from the paper, shapes for every canvas, decoder masking."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from capsnet.nn.models import BaselineCNN, CapsNet, MultiMNISTBaselineCNN, count_parameters


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, 8_215_568),
        ({"digit_bias": True}, 8_215_728),
        ({"reconstruction": False}, 6_804_224),
        ({"reconstruction": False, "digit_bias": True}, 6_804_384),
        ({"input_size": 36, "digit_bias": True}, 11_361_968),
        ({"input_size": 36}, 11_361_808),
    ],
)
def test_capsnet_parameter_counts(kwargs: dict, expected: int) -> None:
    assert count_parameters(CapsNet(**kwargs)) == expected


def test_capsnet_layer_parameter_counts() -> None:
    net = CapsNet()
    assert count_parameters(net.conv1) == 20_992
    assert count_parameters(net.primary_caps) == 5_308_672
    assert count_parameters(net.digit_caps) == 1_474_560
    assert count_parameters(net.decoder) == 1_411_344


def test_baseline_parameter_counts() -> None:
    assert count_parameters(BaselineCNN()) == 35_445_522
    assert count_parameters(MultiMNISTBaselineCNN()) == 24_563_978


@pytest.mark.parametrize(("size", "primary"), [(28, 1152), (36, 3200), (40, 4608)])
def test_capsnet_shapes(size: int, primary: int) -> None:
    net = CapsNet(input_size=size, routing_iterations=2)
    assert net.num_primary_capsules == primary
    x = torch.rand(2, 1, size, size)
    out = net(x, torch.tensor([3, 7]))
    assert out.lengths.shape == (2, 10)
    assert out.poses.shape == (2, 10, 16)
    assert out.reconstructions.shape == (2, 1, size, size)
    _, coupling = net.encode(x)
    assert coupling.shape == (2, primary, 10)
    assert ((out.lengths >= 0) & (out.lengths < 1)).all()


def test_capsnet_without_decoder() -> None:
    out = CapsNet(reconstruction=False)(torch.rand(2, 1, 28, 28))
    assert out.reconstructions is None


@pytest.mark.parametrize(("model", "size"), [(BaselineCNN(), 28), (MultiMNISTBaselineCNN(), 36)])
def test_baseline_shapes(model: torch.nn.Module, size: int) -> None:
    assert model(torch.rand(2, 1, size, size)).shape == (2, 10)


def test_decoder_sees_only_the_chosen_capsule() -> None:
    net = CapsNet().eval()
    poses = torch.randn(3, 10, 16)
    labels = torch.tensor([1, 4, 9])
    changed = poses.clone()
    for row, label in enumerate(labels):
        keep = changed[row, label].clone()
        changed[row] = torch.randn(10, 16)
        changed[row, label] = keep
    torch.testing.assert_close(net.reconstruct(poses, labels), net.reconstruct(changed, labels))
    assert not torch.allclose(net.reconstruct(poses, labels), net.reconstruct(poses, (labels + 1) % 10))


def test_forward_masks_by_label_when_given_else_by_longest() -> None:
    torch.manual_seed(0)
    net = CapsNet(routing_iterations=1).eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        out = net(x)
        longest = out.lengths.argmax(dim=1)
        torch.testing.assert_close(out.reconstructions, net.reconstruct(out.poses, longest))
        other = (longest + 1) % 10
        torch.testing.assert_close(net(x, other).reconstructions, net.reconstruct(out.poses, other))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_capsnet_runs_in_a_pure_precision(dtype: torch.dtype) -> None:
    """bf16-true, 16-true and .double(): routing runs in the module's own dtype."""
    torch.manual_seed(0)
    reference = CapsNet()
    model = CapsNet().to(dtype)
    model.load_state_dict(reference.state_dict())
    images, labels = torch.rand(2, 1, 28, 28), torch.tensor([3, 7])
    out = model(images.to(dtype), labels)
    assert out.lengths.dtype == out.poses.dtype == out.reconstructions.dtype == dtype
    (out.lengths.sum() + out.reconstructions.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    tolerance = {torch.float64: 1e-5, torch.bfloat16: 0.05, torch.float16: 0.01}[dtype]
    torch.testing.assert_close(out.lengths.float(), reference(images, labels).lengths, atol=tolerance, rtol=0)


def test_digit_caps_gradients_in_float64_pass_gradcheck() -> None:
    from capsnet.nn.layers import DigitCaps
    from capsnet.nn.routing.dynamic import DynamicRouting

    torch.manual_seed(0)
    router = partial(DynamicRouting, iters=3)
    layer = DigitCaps(in_capsules=6, in_dim=4, out_capsules=3, out_dim=5, router=router, bias=True).double()
    u = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (u,))


def test_routing_stays_float32_under_autocast() -> None:
    model = CapsNet()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        poses, coupling, _ = model.digit_caps(torch.rand(2, 1152, 8))
    assert poses.dtype == coupling.dtype == torch.float32
