"""Protocol properties of MultiMNIST and the affine set, checked on real MNIST digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from capsnet.data.affnist import AffNIST, load_affnist_mat
from capsnet.data.mnist import load_mnist
from capsnet.data.multimnist import MultiMNIST, measure_overlap
from capsnet.data.transforms import center_on_canvas, to_float_images, translate


@pytest.fixture(scope="module")
def test_digits(mnist_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_mnist(mnist_dir, train=False)
    return images[:2000], labels[:2000]


def test_multimnist_items_follow_the_protocol(test_digits) -> None:
    images, labels = test_digits
    dataset = MultiMNIST(images, labels, pairs_per_digit=3, seed=0)
    assert len(dataset) == 6000
    index = torch.arange(0, 6000, 37)
    composite, pair_labels, parts = dataset.batch(index)
    assert composite.shape == (len(index), 1, 36, 36) and parts.shape == (len(index), 2, 1, 36, 36)
    assert (pair_labels[:, 0] != pair_labels[:, 1]).all()
    torch.testing.assert_close(composite, parts.sum(dim=1).clamp(max=1.0), rtol=0, atol=0)
    assert composite.min() >= 0 and composite.max() <= 1
    first, second = dataset.pair_indices(index)
    assert torch.equal(first, index % 2000)
    for b in range(len(index)):
        for k, digit in enumerate((first[b], second[b])):
            assert labels[digit] == pair_labels[b, k]
            centred = center_on_canvas(to_float_images(images[digit : digit + 1]), 36)
            matches = [
                (dx, dy)
                for dx in range(-4, 5)
                for dy in range(-4, 5)
                if torch.equal(translate(centred, torch.tensor([dx]), torch.tensor([dy]))[0], parts[b, k])
            ]
            assert matches, f"part {k} of item {index[b]} is not its digit shifted by at most 4 px"


def test_multimnist_is_a_pure_function_of_seed_and_index(test_digits) -> None:
    images, labels = test_digits
    a, b = MultiMNIST(images, labels, seed=5), MultiMNIST(images, labels, seed=5)
    item = a[123]
    for x, y in zip(item, b[123], strict=True):
        assert torch.equal(x, y)
    batch = a.batch(torch.tensor([7, 123]))
    assert torch.equal(batch[0][1], item[0]) and torch.equal(batch[2][1], item[2])
    other = MultiMNIST(images, labels, seed=6)
    assert not torch.equal(other.batch(torch.arange(50))[0], a.batch(torch.arange(50))[0])


def test_multimnist_overlap_is_what_the_protocol_gives(test_digits) -> None:
    overlap = measure_overlap(MultiMNIST(*test_digits, seed=0), 2000)
    # PAPER.md: ≈ 0.72 intersection over the smaller box, IoU ≈ 0.46, on real test digits
    assert 0.68 < overlap["intersection_over_smaller"] < 0.77
    assert 0.42 < overlap["iou"] < 0.50


def test_affine_digits_stay_in_frame_and_are_not_translations(test_digits) -> None:
    images, labels = test_digits
    dataset = AffNIST(images, labels, copies=2, seed=0)
    assert len(dataset) == 4000
    index = torch.arange(0, 4000, 7)
    out, out_labels = dataset.batch(index)
    assert out.shape == (len(index), 1, 40, 40) and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out_labels, labels[index % 2000])
    # Nothing is cut off: the ink equals the source ink times the area change |det A|.
    source_ink = images[index % 2000].float().sum(dim=(1, 2)) / 255
    det = torch.linalg.det(dataset.linear_parts(index)).float()
    ratio = out.sum(dim=(1, 2, 3)) / (source_ink * det)
    assert (ratio > 0.95).all() and (ratio < 1.05).all()
    # Not mere translations: the best integer translation of the centred digit leaves a
    # large residual for most items.
    centred = center_on_canvas(to_float_images(images[index % 2000]), 40)
    best = torch.full((len(index),), float("inf"))
    for dx in range(-12, 13):
        for dy in range(-12, 13):
            moved = translate(centred, torch.full((len(index),), dx), torch.full((len(index),), dy))
            best = torch.minimum(best, (moved - out).abs().sum(dim=(1, 2, 3)))
    assert (best / out.sum(dim=(1, 2, 3)) > 0.15).float().mean() > 0.9


def test_affine_set_is_deterministic_and_seeded(test_digits) -> None:
    images, labels = test_digits
    first = AffNIST(images, labels, seed=1).batch(torch.arange(100))[0]
    assert torch.equal(first, AffNIST(images, labels, seed=1).batch(torch.arange(100))[0])
    assert torch.equal(first[42], AffNIST(images, labels, seed=1)[42][0])
    assert not torch.equal(first, AffNIST(images, labels, seed=2).batch(torch.arange(100))[0])


def test_affine_ranges_are_respected(test_digits) -> None:
    dataset = AffNIST(*test_digits, copies=32, seed=0)
    linear = dataset.linear_parts(torch.arange(len(dataset)))
    # A = R(θ)·Shear(k)·diag(sx, sy): recover θ, k, sx, sy from the product.
    a, b, c, d = linear[:, 0, 0], linear[:, 0, 1], linear[:, 1, 0], linear[:, 1, 1]
    sx = torch.sqrt(a**2 + c**2)
    theta = torch.atan2(c, a)
    shear_sy = b * torch.cos(theta) + d * torch.sin(theta)
    sy = -b * torch.sin(theta) + d * torch.cos(theta)
    shear = shear_sy / sy
    assert theta.abs().max() <= np.radians(20) + 1e-9 and theta.abs().max() > np.radians(19)
    assert shear.abs().max() <= 0.2 + 1e-9 and shear.abs().max() > 0.19
    for scale in (sx, sy):
        assert scale.min() >= 0.8 - 1e-9 and scale.max() <= 1.2 + 1e-9


def test_real_affnist_mat_layout_is_read(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io", reason="scipy is installed by the affnist extra")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 40, 40), dtype=np.uint8)
    # MATLAB layout: one column per image, each 40×40 image stored column-major.
    columns = np.stack([img.T.reshape(-1) for img in images], axis=1)
    scipy_io.savemat(tmp_path / "test.mat", {"affNISTdata": {"image": columns, "label_int": np.array([4, 0, 9])}})
    loaded, labels = load_affnist_mat(tmp_path / "test.mat")
    assert loaded.shape == (3, 1, 40, 40)
    np.testing.assert_allclose(loaded[:, 0].numpy() * 255, images.astype(np.float32), atol=1e-3)
    assert labels.tolist() == [4, 0, 9]


def test_affnist_validation_digits_are_placed_like_the_expanded_test(mnist_dir: Path) -> None:
    from capsnet.data.affnist import AffNISTDataModule

    datamodule = AffNISTDataModule(data_dir=str(mnist_dir), val_subset=64, test_subset=64, train_subset=64)
    datamodule.setup()
    batch = next(iter(datamodule.val_dataloader()))
    placed, _ = datamodule.on_after_batch_transfer(batch, 0)
    again, _ = datamodule.on_after_batch_transfer(batch, 0)
    assert torch.equal(placed, again) and placed.shape == (64, 1, 40, 40)
    centred = datamodule.place(batch[0])
    moved = (placed != centred).flatten(1).any(dim=1).float().mean()
    assert moved > 0.8  # almost every digit is off-centre (a zero shift has probability 1/169)
    torch.testing.assert_close(placed.sum(dim=(1, 2, 3)), centred.sum(dim=(1, 2, 3)))  # ±6 px keeps all ink
