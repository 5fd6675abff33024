"""The README's worked example of a new model: one class here, one YAML in
tests/configs/model/tiny_cnn.yaml, nothing else changed."""

from __future__ import annotations

from torch import Tensor, nn


class TinyCNN(nn.Module):
    """A small CNN: the model contract is the four data keyword arguments plus its own, and
    what it is trained to minimise (``objective``: its outputs are class logits)."""

    objective = "logits"

    def __init__(
        self, *, input_size: int, in_channels: int, num_classes: int, task: str = "single", channels: int = 8
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, channels, 5, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Linear(channels * 16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: x [B, C, H, W] -> logits [B, K]."""
        return self.classifier(self.features(x).flatten(1))
