"""Efficient-CapsNet (Mazzia, Salvetti, Chiaberge, Sci. Rep. 2021): the paper's MNIST model.

Transcribed from the official TensorFlow 2 code, repository EscVM/Efficient-CapsNet:
``models/efficient_capsnet_graph_mnist.py`` (``efficient_capsnet_graph``, ``generator_graph``)
and ``utils/layers.py`` (``PrimaryCaps``, ``FCCaps``, ``Squash``, ``Length``, ``Mask``).

MNIST (28×28×1), with the official layer arguments:

| layer | official | output |
|---|---|---|
| conv 32@5×5, ReLU, BN | ``Conv2D(32, 5, activation="relu")`` + ``BatchNormalization()`` | 24×24×32 |
| conv 64@3×3, ReLU, BN | | 22×22×64 |
| conv 64@3×3, ReLU, BN | | 20×20×64 |
| conv 128@3×3 stride 2, ReLU, BN | | 9×9×128 |
| primary caps | ``PrimaryCaps(128, 9, 16, 8)``: depthwise 9×9 conv (groups = 128), linear, reshaped to 16 capsules of 8D, squashed | 16 × 8D |
| FC caps | ``FCCaps(10, 16)``: W [10, 16, 8, 16], votes û_{j|i} = W_ji u_i, self-attention routing with log priors [10, 16] | 10 × 16D |
| decoder | ``generator_graph``: masked 160 → FC 512 ReLU → FC 1024 ReLU → FC 784 sigmoid | 28×28 |

Note the order: each convolution's ReLU comes *before* its batch norm, as in the official graph.

Parameters: 161,824 trainable **without the decoder** (the figure the paper reports, which is
Keras's trainable count of ``efficient_capsnet_graph``, the decoder being a separate
``Generator`` model); the decoder adds 1,411,344 (1,573,168 in all).  Batch norm's running
statistics (576 numbers on MNIST) are buffers here, non-trainable weights in Keras.

Pure torch.  (``CapsNetOutput`` and ``capsule_lengths`` come from ``capsnet.nn.models`` /
``capsnet.nn.routing.dynamic`` until those move under ``capsnet.nn``.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from capsnet.nn.models import CapsNetOutput
from capsnet.nn.routing.base import Routed, Router
from capsnet.nn.routing.dynamic import capsule_lengths
from capsnet.nn.routing.self_attention import SelfAttentionRouting
from capsnet.nn.routing.squash import squash_fn

# Keras' truncated normal initialisers (he_normal, glorot_normal) draw from N(0, σ) cut at
# ±2σ with σ = sqrt(scale / fan) / 0.87962566103423978, the std of a unit normal cut at ±2.
_TRUNCATED_STD = 0.87962566103423978
# Keras' backend epsilon(), inside the square root of the official Length layer.
_KERAS_EPSILON = 1e-7


def _keras_truncated_normal_(weight: Tensor, scale: float, fan: float) -> None:
    std = math.sqrt(scale / fan) / _TRUNCATED_STD
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1  # 'valid' padding


class PrimaryCapsDW(nn.Module):
    """Efficient-CapsNet's primary capsules: a depthwise 'valid' convolution (one K×K filter
    per input channel, linear), its output cut into capsules of ``capsule_dim``, squashed.

    The official ``Reshape((N, D))`` acts on a channels-last [H, W, F] tensor: capsule n
    holds the D consecutive numbers of the (h, w, f) row-major order.  On MNIST H = W = 1,
    so capsule n is channels [8n, 8n + 8).

    Shapes: features [B, F, H, W] -> capsules [B, H'·W'·F / D, D].
    """

    def __init__(self, *, channels: int, kernel_size: int, stride: int, capsule_dim: int, squash: str) -> None:
        super().__init__()
        self.capsule_dim = capsule_dim
        self.conv = nn.Conv2d(channels, channels, kernel_size, stride=stride, groups=channels)
        self.squash = squash_fn(squash)

    def forward(self, features: Tensor) -> Tensor:
        out = self.conv(features).permute(0, 2, 3, 1)  # channels last, (B, H', W', F)
        return self.squash(out.reshape(out.shape[0], -1, self.capsule_dim))


class FCCapsVotes(nn.Module):
    """The votes of the official ``FCCaps``: û_{j|i} = u_i W_ji, one [in_dim, out_dim] matrix
    per (parent j, child i); the routing that follows is the router's.

    W has the official layout [J, I, in_dim, out_dim].  No bias.

    Shapes: u [B, I, in_dim] -> votes [B, I, J, out_dim].
    """

    def __init__(self, *, in_caps: int, in_dim: int, out_caps: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_caps, in_caps, in_dim, out_dim))
        # Keras he_normal on a 4-D kernel: fan_in = prod(shape[:-2]) · shape[-2] = J·I·in_dim.
        _keras_truncated_normal_(self.weight, 2.0, out_caps * in_caps * in_dim)

    def forward(self, u: Tensor) -> Tensor:
        return torch.einsum("bie,jief->bijf", u, self.weight)


class MaskedDecoder(nn.Module):
    """The official ``generator_graph``: the parent capsules with all but one zeroed
    (``Mask``), flattened, → FC 512 ReLU → FC 1024 ReLU → FC C·H·W sigmoid (or linear).

    Shapes: poses [B, K, D], labels [B] long -> images [B, C, H, W].
    """

    def __init__(self, *, num_capsules: int, capsule_dim: int, out_shape: tuple[int, int, int], output: str) -> None:
        super().__init__()
        assert output in ("sigmoid", "linear"), f"decoder output must be sigmoid or linear, got {output!r}"
        self.out_shape = out_shape
        self.net = nn.Sequential(
            nn.Linear(num_capsules * capsule_dim, 512),
            nn.ReLU(),
            nn.Linear(512, 1024),
            nn.ReLU(),
            nn.Linear(1024, math.prod(out_shape)),
            nn.Sigmoid() if output == "sigmoid" else nn.Identity(),
        )

    def forward(self, poses: Tensor, labels: Tensor) -> Tensor:
        mask = torch.zeros(poses.shape[:2], dtype=poses.dtype, device=poses.device)
        mask.scatter_(1, labels.view(-1, 1), 1.0)
        return self.net((poses * mask.unsqueeze(-1)).flatten(1)).view(-1, *self.out_shape)


class EfficientCapsNet(nn.Module):
    """Convs with batch norm → depthwise primary caps → FC caps with self-attention routing
    → optional decoder.  161,824 parameters on MNIST without the decoder (see the module doc).

    Same interface as :class:`capsnet.nn.models.CapsNet`: ``forward(x, y=None)`` returns
    ``CapsNetOutput(lengths, poses, reconstructions)``; ``encode(x)`` returns
    ``(poses, couplings)``; ``reconstruct(poses, labels)``; ``decoder`` is None without
    reconstruction.

    Args:
        input_size, in_channels, num_classes, task: from the data (``task`` changes nothing:
            classes are read from capsule lengths either way).
        reconstruction: build the decoder.
        conv_channels, conv_kernels, conv_strides: the four convolutions (official MNIST:
            32/64/64/128, 5/3/3/3, 1/1/1/2; the official MultiMNIST graph strides 1/1/2/2).
        primary_kernel, primary_stride, primary_dim: the depthwise primary capsule conv and the
            capsules' dimension (MNIST: 9, 1, 8; MultiMNIST: 5, 2, 8).
        digit_dim: the parent capsules' dimension (16).
        bn_eps, bn_momentum: batch norm as Keras' defaults (epsilon 1e-3, momentum 0.99, i.e.
            torch momentum 0.01).
        squash: the primary capsules' squash (official: ``"efficient"``).
        routing: builds the router, called with ``in_caps=, out_caps=, in_dim=, out_dim=``
            (e.g. a Hydra ``_partial_`` of ``conf/routing/*.yaml``); None: the official
            :class:`SelfAttentionRouting`.
        keras_init: initialise as the official code (he_normal convs, FC caps and hidden
            dense layers, glorot_normal decoder output, Keras' glorot_uniform depthwise conv,
            zero biases); False keeps torch's defaults.
        decoder_output: ``"sigmoid"`` for pixels in [0, 1], ``"linear"`` otherwise.
    """

    objective = "capsule"  # margin + reconstruction, as the official code (capsnet.run.objectives)

    def __init__(
        self,
        *,
        input_size: int = 28,
        in_channels: int = 1,
        num_classes: int = 10,
        task: str = "single",
        reconstruction: bool = True,
        conv_channels: Sequence[int] = (32, 64, 64, 128),
        conv_kernels: Sequence[int] = (5, 3, 3, 3),
        conv_strides: Sequence[int] = (1, 1, 1, 2),
        primary_kernel: int = 9,
        primary_stride: int = 1,
        primary_dim: int = 8,
        digit_dim: int = 16,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        squash: str = "efficient",
        routing: Callable[..., Router] | None = None,
        keras_init: bool = True,
        decoder_output: str = "sigmoid",
    ) -> None:
        super().__init__()
        assert task in ("single", "multi"), f"task must be single or multi, got {task!r}"
        assert len(conv_channels) == len(conv_kernels) == len(conv_strides), "one kernel and stride per conv"
        self.input_size, self.num_classes = input_size, num_classes
        layers: list[nn.Module] = []
        size, channels = input_size, in_channels
        for out_channels, kernel, stride in zip(conv_channels, conv_kernels, conv_strides, strict=True):
            layers += [
                nn.Conv2d(channels, out_channels, kernel, stride=stride),
                nn.ReLU(),
                nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum),
            ]
            size, channels = _conv_out(size, kernel, stride), out_channels
        self.features = nn.Sequential(*layers)  # (B, F, size, size)
        primary_size = _conv_out(size, primary_kernel, primary_stride)
        if primary_size < 1:
            raise ValueError(f"input_size {input_size} is too small for these convolutions (28 or more)")
        primary_numbers = primary_size * primary_size * channels
        assert primary_numbers % primary_dim == 0, f"{primary_numbers} primary outputs do not split into {primary_dim}D"
        self.num_primary_capsules = primary_numbers // primary_dim
        self.primary_caps = PrimaryCapsDW(
            channels=channels, kernel_size=primary_kernel, stride=primary_stride, capsule_dim=primary_dim, squash=squash
        )
        self.votes = FCCapsVotes(
            in_caps=self.num_primary_capsules, in_dim=primary_dim, out_caps=num_classes, out_dim=digit_dim
        )
        make_router = SelfAttentionRouting if routing is None else routing
        self.routing = make_router(
            in_caps=self.num_primary_capsules, out_caps=num_classes, in_dim=primary_dim, out_dim=digit_dim
        )
        self.decoder = (
            MaskedDecoder(
                num_capsules=num_classes,
                capsule_dim=digit_dim,
                out_shape=(in_channels, input_size, input_size),
                output=decoder_output,
            )
            if reconstruction
            else None
        )
        if keras_init:
            self._keras_init()

    def _keras_init(self) -> None:
        """The official initialisers (the FC caps' W is initialised in FCCapsVotes)."""
        for module in self.features:
            if isinstance(module, nn.Conv2d):  # he_normal
                _keras_truncated_normal_(module.weight, 2.0, module.weight[0].numel())
                nn.init.zeros_(module.bias)
        # Keras' default glorot_uniform; torch's fans for a depthwise conv (1·K·K in,
        # F·K·K out) are Keras' for its kernel [K, K, 1, F].
        nn.init.xavier_uniform_(self.primary_caps.conv.weight)
        nn.init.zeros_(self.primary_caps.conv.bias)
        if self.decoder is not None:
            linears = [m for m in self.decoder.net if isinstance(m, nn.Linear)]
            for linear in linears[:-1]:  # he_normal
                _keras_truncated_normal_(linear.weight, 2.0, linear.in_features)
            last = linears[-1]  # glorot_normal: fan = (fan_in + fan_out) / 2
            _keras_truncated_normal_(last.weight, 1.0, (last.in_features + last.out_features) / 2)
            for linear in linears:
                nn.init.zeros_(linear.bias)

    def route(self, x: Tensor) -> Routed:
        """Shapes: x [B, C, H, W] -> Routed(poses [B, K, D], couplings [B, I, K], activations)."""
        primary = self.primary_caps(self.features(x))  # (B, I, primary_dim)
        votes = self.votes(primary)  # (B, I, K, D)
        return self.routing(votes, primary if self.routing.needs_inputs else None)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Shapes: x [B, C, H, W] -> (poses [B, K, D], couplings [B, I, K] or None)."""
        routed = self.route(x)
        return routed.poses, routed.couplings

    def scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Class scores (the official ``Length``, or the router's activations) and poses.

        Shapes: x [B, C, H, W] -> (scores [B, K], poses [B, K, D])."""
        routed = self.route(x)
        scores = capsule_lengths(routed.poses, eps=_KERAS_EPSILON) if routed.activations is None else routed.activations
        return scores, routed.poses

    def reconstruct(self, poses: Tensor, labels: Tensor) -> Tensor:
        """Decode the capsule ``labels`` of each example (all others masked).

        Shapes: poses [B, K, D], labels [B] -> [B, C, H, W].
        """
        if self.decoder is None:
            raise RuntimeError("this EfficientCapsNet was built with reconstruction=False: it has no decoder")
        return self.decoder(poses, labels)

    def forward(self, x: Tensor, y: Tensor | None = None) -> CapsNetOutput:
        """Classify ``x``; reconstruct from the capsule of ``y`` if given, else the longest
        (the official ``Mask``: the label in training, the longest capsule in test mode).

        ``lengths`` are the official ``Length``: sqrt(|v|² + 1e-7) (Keras' epsilon), or the
        router's activations where it computes them apart from the poses.

        Shapes: x [B, C, H, W], y [B] -> CapsNetOutput(lengths [B, K], poses [B, K, D],
        reconstructions [B, C, H, W] or None).
        """
        lengths, poses = self.scores(x)
        reconstructions = None
        if self.decoder is not None:
            reconstructions = self.decoder(poses, y if y is not None else lengths.argmax(dim=1))
        return CapsNetOutput(lengths, poses, reconstructions)


__all__ = ["EfficientCapsNet", "FCCapsVotes", "MaskedDecoder", "PrimaryCapsDW"]
