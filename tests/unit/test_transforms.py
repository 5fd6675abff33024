"""Counter-based randomness and the batched translate, against hand-built expectations."""

from __future__ import annotations

import torch

from capsnet.data.transforms import center_on_canvas, hash_int, hash_uniform, random_shift, translate


def test_translate_by_hand() -> None:
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    out = translate(x, torch.tensor([1]), torch.tensor([-1]))  # right 1, up 1
    expected = torch.tensor([[0.0, 4.0, 5.0], [0.0, 7.0, 8.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(out[0, 0], expected)


def test_translate_is_per_example() -> None:
    x = torch.rand(2, 1, 5, 5)
    out = translate(x, torch.tensor([0, 2]), torch.tensor([0, 0]))
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[1, :, :, 2:], x[1, :, :, :3])
    assert (out[1, :, :, :2] == 0).all()


def test_center_on_canvas() -> None:
    out = center_on_canvas(torch.ones(1, 1, 28, 28), 40)
    assert out.shape == (1, 1, 40, 40) and out.sum() == 784
    assert (out[0, 0, 6:34, 6:34] == 1).all()


def test_hash_is_deterministic_uniform_and_key_sensitive() -> None:
    idx = torch.arange(100_000)
    u = hash_uniform(7, idx, 0)
    torch.testing.assert_close(u, hash_uniform(7, idx, 0), rtol=0, atol=0)
    assert not torch.equal(u, hash_uniform(8, idx, 0))
    assert not torch.equal(u, hash_uniform(7, idx, 1))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    counts = torch.bincount(hash_int(-2, 2, 3, idx) + 2, minlength=5)
    assert (counts - 20_000).abs().max() < 1_000  # each of the 5 values ~20%


def test_random_shift_is_a_translation_within_bounds() -> None:
    torch.manual_seed(0)
    images = torch.rand(64, 1, 28, 28)
    idx = torch.arange(64)
    shifted = random_shift(images, 2, 0, 5, idx)
    torch.testing.assert_close(shifted, random_shift(images, 2, 0, 5, idx))
    seen = set()
    for b in range(64):
        matches = [
            (dx, dy)
            for dx in range(-2, 3)
            for dy in range(-2, 3)
            if torch.equal(translate(images[b : b + 1], torch.tensor([dx]), torch.tensor([dy])), shifted[b : b + 1])
        ]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 10  # shifts vary across examples


def _reference_hash(*keys: int) -> int:
    """The key hash written out in plain Python integers (a separate implementation)."""
    h = 0
    for key in keys:
        h = ((h ^ (key % 2**32)) + 0x9E3779B9) % 2**32
        for _ in range(2):
            h ^= h >> 16
            h = (h * 0x45D9F3B) % 2**32
        h ^= h >> 16
    return h


def test_key_hash_matches_the_reference_for_ints_tensors_and_mixes() -> None:
    from capsnet.data.transforms import hash_keys

    index = torch.tensor([0, 5, 2**31 + 7, 123456789])
    for keys in [(0,), (7, 3), (12345, -1, 2**32 - 1)]:
        assert int(hash_keys(*keys)) == _reference_hash(*keys)
    mixed = hash_keys(3, 11, index, 1)  # ints before and after a tensor key
    assert mixed.tolist() == [_reference_hash(3, 11, i, 1) for i in index.tolist()]
