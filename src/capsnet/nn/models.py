"""CapsNet and the paper's CNN baselines, as pure torch modules."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from torch import Tensor, nn

from capsnet.nn.layers import Decoder, DigitCaps, PrimaryCaps
from capsnet.nn.routing import Router
from capsnet.nn.routing.dynamic import DynamicRouting
from capsnet.nn.routing.squash import capsule_lengths

INITS = ("paper", "official")  # see CapsNet: torch's defaults and N(0, weight_std) for W; the official code's
PRIMARY_SCALES = ("paper", "official")  # a plain convolution; the official 1/32 (1/33 leaky) coupling


class CapsNetOutput(NamedTuple):
    """What CapsNet returns. ``reconstructions`` is None when the decoder is off."""

    lengths: Tensor  # [B, K]  class "probabilities" = capsule lengths
    poses: Tensor  # [B, K, 16]  digit capsule vectors v_j
    reconstructions: Tensor | None  # [B, C, H, W]


def _conv_out(size: int, kernel: int, stride: int = 1) -> int:
    return (size - kernel) // stride + 1


class CapsNet(nn.Module):
    """Conv1 → PrimaryCaps → DigitCaps (a router: dynamic routing by default) → optional
    decoder (§4, Fig. 1-2).

    For 28×28 inputs this is exactly the paper's network: 1152 primary capsules and
    8,215,568 parameters with the decoder (6,804,224 without).  36×36 (MultiMNIST) gives
    3200 primary capsules and 40×40 (affNIST) 4608.  The widths are arguments for the §7
    variants (CIFAR-10: 64 primary capsule types; SVHN: 64 conv1 channels, 16 types of 6D,
    8D digit capsules).

    Every capsnet model takes ``input_size``, ``in_channels``, ``num_classes`` and ``task``
    from the data (see capsnet.run.module.build_model); CapsNet reads single- and multi-label
    tasks alike from capsule lengths, so ``task`` changes nothing here.

    Two switches follow the authors' TensorFlow code where the paper is silent:
    ``init="official"`` (truncated N(0, 0.1) conv and W_ij weights, biases 0.1, a
    Glorot-uniform decoder; the default "paper" keeps torch's layer defaults and
    N(0, ``weight_std``) for W_ij) and ``primary_scale="official"`` (the primary
    convolution scaled by 1/32 before its bias, 1/33 with leaky routing).
    """

    objective = "capsule"  # margin + reconstruction losses (capsnet.run.objectives)

    def __init__(
        self,
        *,
        input_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
        task: str = "single",
        router: Callable[..., Router] | None = None,
        reconstruction: bool = True,
        digit_bias: bool = False,
        weight_std: float = 0.05,
        conv1_channels: int = 256,
        primary_types: int = 32,
        primary_dim: int = 8,
        digit_dim: int = 16,
        decoder_output: str = "sigmoid",
        init: str = "paper",
        primary_scale: str = "paper",
        routing_iterations: int | None = None,
        leaky_routing: bool | None = None,
        detach_agreement: bool | None = None,
    ) -> None:
        super().__init__()
        if router is None:  # dynamic routing; the last three arguments are how checkpoints written
            # before routing was a plug-in (``routing=<name>``) describe it
            router = partial(
                DynamicRouting,
                iters=routing_iterations or 3,
                leaky=bool(leaky_routing),
                detach_agreement=bool(detach_agreement),
            )
        conv1_size = _conv_out(input_size, 9)
        primary_size = _conv_out(conv1_size, 9, 2)
        assert primary_size >= 1, f"input_size {input_size} is too small for two 9×9 convolutions"
        self.input_size = input_size
        self.num_classes = num_classes
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, conv1_channels, kernel_size=9), nn.ReLU(inplace=True))
        if primary_scale not in PRIMARY_SCALES:
            raise ValueError(f"primary_scale must be one of {PRIMARY_SCALES}, got {primary_scale!r}")
        leaky = bool(getattr(router, "keywords", {}).get("leaky", False))
        self.primary_caps = PrimaryCaps(
            in_channels=conv1_channels,
            capsule_types=primary_types,
            capsule_dim=primary_dim,
            scale=1.0 / (primary_types + leaky) if primary_scale == "official" else 1.0,
        )
        self.num_primary_capsules = primary_types * primary_size * primary_size
        self.digit_caps = DigitCaps(
            in_capsules=self.num_primary_capsules,
            in_dim=primary_dim,
            out_capsules=num_classes,
            out_dim=digit_dim,
            router=router,
            bias=digit_bias,
            weight_std=weight_std,
        )
        self.decoder = (
            Decoder(
                num_capsules=num_classes,
                capsule_dim=digit_dim,
                out_shape=(in_channels, input_size, input_size),
                output=decoder_output,
            )
            if reconstruction
            else None
        )
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if init == "official":
            self._official_init()

    def _official_init(self) -> None:
        """The official code's initialisation (``variables.weight_variable``/``bias_variable``
        and ``tf.contrib.layers.fully_connected``'s defaults): conv1, primary-capsule and
        W_ij weights from a normal of stddev 0.1 truncated at two stddevs, their biases 0.1
        (the digit-capsule bias too); decoder weights Glorot-uniform, its biases 0."""
        for weight in (self.conv1[0].weight, self.primary_caps.conv.weight, self.digit_caps.weight):
            nn.init.trunc_normal_(weight, mean=0.0, std=0.1, a=-0.2, b=0.2)
        for bias in (self.conv1[0].bias, self.primary_caps.conv.bias, self.digit_caps.bias):
            if bias is not None:
                nn.init.constant_(bias, 0.1)
        if self.decoder is not None:
            for layer in self.decoder.net:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Shapes: x [B, C, H, W] -> (poses [B, K, D], coupling [B, I, K] or None)."""
        routed = self.digit_caps(self.primary_caps(self.conv1(x)))  # primary capsules (B, I, primary_dim)
        return routed.poses, routed.couplings

    def scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Class scores in [0, 1] and poses: the capsule lengths (the paper's), or the router's
        own activations where it computes them (EM, self-routing).

        Shapes: x [B, C, H, W] -> (scores [B, K], poses [B, K, D])."""
        routed = self.digit_caps(self.primary_caps(self.conv1(x)))
        scores = routed.activations if routed.activations is not None else capsule_lengths(routed.poses)
        return scores, routed.poses

    def couplings_by_iterations(self, x: Tensor, max_iterations: int) -> list[Tensor] | None:
        """The coupling coefficients after r = 1..max_iterations iterations of this model's
        router, or None when it does not iterate (the routing-convergence figure)."""
        if not self.digit_caps.router.iterative:
            return None
        primary = self.primary_caps(self.conv1(x))
        return [self.digit_caps(primary, iterations=r).couplings for r in range(1, max_iterations + 1)]

    def reconstruct(self, poses: Tensor, labels: Tensor) -> Tensor:
        """Decode the capsule ``labels`` of each example (all others masked).

        Shapes: poses [B, K, 16], labels [B] -> [B, C, H, W].
        """
        if self.decoder is None:
            raise RuntimeError("this CapsNet was built with reconstruction=False: it has no decoder")
        return self.decoder(poses, labels)

    def forward(self, x: Tensor, y: Tensor | None = None) -> CapsNetOutput:
        """Classify ``x``; reconstruct from the capsule of ``y`` if given, else the longest.

        Shapes: x [B, C, H, W], y [B] -> CapsNetOutput.
        """
        lengths, poses = self.scores(x)
        reconstructions = None
        if self.decoder is not None:
            mask_labels = y if y is not None else lengths.argmax(dim=1)
            reconstructions = self.decoder(poses, mask_labels)
        return CapsNetOutput(lengths, poses, reconstructions)


class BaselineCNN(nn.Module):
    """The paper's MNIST baseline (§5): three 5×5 'same' convs 256-256-128, FC 328-192-10.

    35,445,522 parameters on 28×28.  Outputs logits for softmax cross-entropy.  The widths
    are arguments so the affNIST experiment can use a CNN of CapsNet's size on 40×40.
    """

    objective = "logits"  # softmax cross-entropy

    def __init__(
        self,
        *,
        input_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
        dropout: float = 0.5,
        conv_channels: tuple[int, int, int] = (256, 256, 128),
        hidden: tuple[int, int] = (328, 192),
    ) -> None:
        super().__init__()
        c1, c2, c3 = conv_channels
        h1, h2 = hidden
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(c2, c3, 5, padding=2),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * input_size * input_size, h1),
            nn.ReLU(inplace=True),
            nn.Linear(h1, h2),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(h2, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: x [B, C, H, W] -> logits [B, K]."""
        return self.classifier(self.features(x))


class MultiMNISTBaselineCNN(nn.Module):
    """The paper's MultiMNIST baseline: conv 512@9×9, pool, conv 256@5×5, pool, FC 1024, FC 10.

    24,563,978 parameters on 36×36.  Outputs logits for per-class sigmoid (multi-label) loss.
    """

    objective = "logits"  # per-class sigmoid (two labels per image)

    def __init__(self, *, input_size: int = 36, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        pooled = input_size // 2 // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 512, 9, padding=4),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(512, 256, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(256 * pooled * pooled, 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: x [B, C, H, W] -> logits [B, K]."""
        return self.classifier(self.features(x))


def paper_baseline(
    *, input_size: int, in_channels: int, num_classes: int, task: str = "single", **widths: object
) -> nn.Module:
    """The paper's CNN baseline for the task: the §5 softmax CNN for one label per image
    (``widths``: dropout, conv_channels, hidden), the §6 sigmoid CNN for MultiMNIST's two."""
    if task == "multi":
        return MultiMNISTBaselineCNN(input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    return BaselineCNN(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **widths)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameter count, the figure the paper quotes."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "BaselineCNN",
    "CapsNet",
    "CapsNetOutput",
    "MultiMNISTBaselineCNN",
    "count_parameters",
    "paper_baseline",
]
