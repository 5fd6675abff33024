"""Scoring rules on hand-made capsule lengths."""

from __future__ import annotations

import torch

from capsnet.run.module import top_k_error


def test_single_label_error() -> None:
    lengths = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.3, 0.1]])
    torch.testing.assert_close(top_k_error(lengths, torch.tensor([1, 1])), torch.tensor([0.0, 1.0]))


def test_two_longest_must_equal_the_label_set() -> None:
    lengths = torch.tensor(
        [
            [0.9, 0.8, 0.1, 0.0],  # top two {0, 1}
            [0.9, 0.8, 0.1, 0.0],  # labels given in the other order: still right
            [0.9, 0.1, 0.8, 0.0],  # top two {0, 2} vs {0, 1}: wrong
            [0.2, 0.3, 0.1, 0.95],  # {3, 1} vs {0, 1}: wrong
        ]
    )
    labels = torch.tensor([[0, 1], [1, 0], [0, 1], [0, 1]])
    torch.testing.assert_close(top_k_error(lengths, labels), torch.tensor([0.0, 0.0, 1.0, 1.0]))
