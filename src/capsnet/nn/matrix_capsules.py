"""The smallNORB network of "Matrix capsules with EM routing" (Hinton, Sabour, Frosst,
ICLR 2018: its architecture section and Figure 1), as pure torch.

    ReLU conv 5×5, stride 2, A channels
    → primary capsules: B types of (4×4 pose, activation), a 1×1 convolution
    → ConvCaps1: C types, K = 3, stride 2, EM routing
    → ConvCaps2: D types, K = 3, stride 1, EM routing
    → class capsules: one per class, transformation matrices shared over positions,
      coordinate addition, EM routing.

The paper's network has A = B = C = D = 32 (about 310K parameters, the paper says; 316,650 here on
stereo pairs, counted in tests/unit/test_matrix_capsules.py) and a smaller one with
A = 64, B = 8, C = D = 16 (68K; 68,618 here).  A 32×32 input gives 14×14 primary
capsules, 6×6 and 4×4 convolutional capsules and 4·4·D = 512 children of the class capsules.

Where the paper is silent the official code (google-research/google-research
``capsule_em/em_model.py``, ``em_layers.py``, ``simple_model.py``) decides:
  * votes are pose @ W (the child's 4×4 pose on the left);
  * initialisation (truncated normals, cut at 2σ as TensorFlow's): conv1 σ 0.05, bias
    0.1; primary poses σ 0.5, primary activations σ 3.0, no biases, a = sigmoid(x − 1);
    convolutional capsule W σ 0.3, β_u = β_a = 0.5; class W σ 0.01, β_u = 2, β_a = 1;
  * λ = 0.01 in the convolutional capsule layers, 0.01 / 4 in the class layer, with
    the schedule of ``capsnet.nn.routing.em.lambda_schedule``;
  * coordinate addition: the receptive field's centre in input pixels, relative to
    pixel ``input_size // 2`` and divided by 100, added to vote elements 0 and 1 (the
    official code adds the column to element 0 and the row to element 1, after its
    position grid's channels are swapped by each of its three convolutions).
    ``coordinate_addition="paper"`` adds (row, column) to "the first two elements of
    the right-hand column" (elements 3 and 7 of the row-major 4×4), as the paper says.

The output's ``lengths`` are the class capsules' activations (sigmoid outputs in (0, 1)):
they are the class scores, as the official code's logits are; ``poses`` are the class
capsules' 4×4 poses, flattened.  There is no decoder (the paper's smallNORB network has
none), so ``reconstructions`` is None and the labels ``y`` are not used.

Not reproduced from the official code: its primary-capsule kernel concatenates the pose
(σ 0.5) and activation (σ 3.0) kernels and then reshapes the channels as [type, 17], so
the two initialisations land on mixed channels; here each part keeps its own σ.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from capsnet.nn.routing.em import OFFICIAL_FINAL_LAMBDA, ConvGeometry, EMRouter

POSE = 16  # 4×4 pose matrices, flattened row-major
COORDINATES = ("official", "paper", "none")
COORDINATE_ATOMS = {"official": (1, 0), "paper": (3, 7)}  # where (row, column) go


class MatrixCapsulesOutput(NamedTuple):
    """What MatrixCapsulesEM returns (the fields of capsnet.nn.models.CapsNetOutput).

    Attributes:
        lengths: [B, K] the class capsules' activations, the class scores.
        poses: [B, K, 16] the class capsules' poses.
        reconstructions: None (no decoder).
    """

    lengths: Tensor
    poses: Tensor
    reconstructions: Tensor | None


def _trunc_normal_(tensor: Tensor, std: float) -> Tensor:
    """TensorFlow's truncated_normal_initializer: N(0, std²) redrawn outside ±2 std."""
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def _out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


class PrimaryMatrixCaps(nn.Module):
    """B capsule types from a 1×1 convolution: a 4×4 pose and a sigmoid activation each.

    Shapes: [B, A, H, W] -> poses [B, types, H, W, 16], activations [B, types, H, W].
    """

    def __init__(self, in_channels: int, types: int, *, pose_std: float = 0.5, activation_std: float = 3.0) -> None:
        super().__init__()
        self.types = types
        self.pose = nn.Conv2d(in_channels, types * POSE, 1, bias=False)
        self.activation = nn.Conv2d(in_channels, types, 1, bias=False)
        _trunc_normal_(self.pose.weight, pose_std)
        _trunc_normal_(self.activation.weight, activation_std)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch, _, height, width = x.shape
        poses = self.pose(x).view(batch, self.types, POSE, height, width).permute(0, 1, 3, 4, 2)
        return poses, torch.sigmoid(self.activation(x) - 1.0)  # official: sigmoid(logit − 1)


class ConvMatrixCaps(nn.Module):
    """A K×K, stride-s convolutional capsule layer with EM routing: each child votes
    pose @ W for every parent type at every position whose kernel covers it.

    Shapes: poses [B, I, H, W, 16], activations [B, I, H, W] ->
        poses [B, J, H', W', 16], activations [B, J, H', W'].
    """

    def __init__(
        self,
        in_types: int,
        out_types: int,
        *,
        in_size: int,
        kernel: int,
        stride: int,
        weight_std: float = 0.3,
        **routing: object,
    ) -> None:
        super().__init__()
        self.geometry = ConvGeometry(in_types=in_types, in_size=(in_size, in_size), kernel=kernel, stride=stride)
        self.out_types = out_types
        self.weight = nn.Parameter(_trunc_normal_(torch.empty(in_types, kernel, kernel, out_types, 4, 4), weight_std))
        self.router = EMRouter(
            in_caps=self.geometry.window,
            out_caps=out_types,
            in_dim=POSE,
            out_dim=POSE,
            **routing,  # type: ignore[arg-type]
        )

    @property
    def out_size(self) -> int:
        return self.geometry.out_size[0]

    def forward(self, poses: Tensor, activations: Tensor) -> tuple[Tensor, Tensor]:
        k, s = self.geometry.kernel, self.geometry.stride
        batch = poses.shape[0]
        size = self.out_size
        positions, window = size * size, self.geometry.window
        # [B, I, H', W', 16, K, K] -> [B, N, C, 4, 4] with c = (i, u_h, u_w)
        patches = poses.unfold(2, k, s).unfold(3, k, s).permute(0, 2, 3, 1, 5, 6, 4)
        patches = patches.reshape(batch, positions, window, 4, 4)
        child_a = activations.unfold(2, k, s).unfold(3, k, s).permute(0, 2, 3, 1, 4, 5)
        child_a = child_a.reshape(batch, positions, window)
        weight = self.weight.reshape(window, self.out_types, 4, 4)
        votes = torch.einsum("bncxy,cjyz->bncjxz", patches, weight).reshape(
            batch, positions, window, self.out_types, POSE
        )
        routed = self.router.route(votes, child_a, self.geometry)
        out_poses = routed.poses.view(batch, size, size, self.out_types, POSE).permute(0, 3, 1, 2, 4)
        out_a = routed.activations.view(batch, size, size, self.out_types).permute(0, 3, 1, 2)
        return out_poses, out_a


class ClassMatrixCaps(nn.Module):
    """Class capsules: every child capsule of the last grid votes for every class with a
    transformation matrix shared by all positions of its type, plus its position
    (coordinate addition); EM routing over all I·H·W children.

    Args:
        offsets: [H·W, 16] what coordinate addition adds to each position's votes.

    Shapes: poses [B, I, H, W, 16], activations [B, I, H, W] ->
        activations [B, K], poses [B, K, 16].
    """

    def __init__(
        self, in_types: int, num_classes: int, *, offsets: Tensor, weight_std: float = 0.01, **routing: object
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weight = nn.Parameter(_trunc_normal_(torch.empty(in_types, num_classes, 4, 4), weight_std))
        self.register_buffer("offsets", offsets, persistent=False)
        self.router = EMRouter(
            in_caps=in_types * offsets.shape[0],
            out_caps=num_classes,
            in_dim=POSE,
            out_dim=POSE,
            **routing,  # type: ignore[arg-type]
        )

    def forward(self, poses: Tensor, activations: Tensor) -> tuple[Tensor, Tensor]:
        batch, types, height, width, _ = poses.shape
        matrices = poses.reshape(batch, types, height * width, 4, 4)
        votes = torch.einsum("bipxy,ijyz->bipjxz", matrices, self.weight).reshape(
            batch, types, height * width, self.num_classes, POSE
        )
        votes = votes + self.offsets.to(votes.dtype).view(1, 1, height * width, 1, POSE)
        children = types * height * width  # ordered (type, row, column), as the official code
        routed = self.router.route(
            votes.reshape(batch, 1, children, self.num_classes, POSE), activations.reshape(batch, 1, children)
        )
        return routed.activations[:, 0], routed.poses[:, 0]


def receptive_field_centres(input_size: int, layers: list[tuple[int, int]]) -> Tensor:
    """Centre (in input pixels) of each output position's receptive field after the
    (kernel, stride) ``layers``: the official ``conv_pos`` averages the position grid over
    each kernel window, which for a linear grid is the window's centre."""
    start, step, size = 0.0, 1.0, input_size
    for kernel, stride in layers:
        start, step, size = start + step * (kernel - 1) / 2, step * stride, _out(size, kernel, stride)
    return start + step * torch.arange(size, dtype=torch.float64)


def coordinate_offsets(input_size: int, layers: list[tuple[int, int]], mode: str) -> Tensor:
    """[H·W, 16] the vote offsets of coordinate addition: the receptive field centre's
    (row, column), in pixels from pixel ``input_size // 2`` and divided by 100 (the
    official code's scale), at the atoms of ``COORDINATE_ATOMS[mode]``; zeros for "none"."""
    if mode not in COORDINATES:
        raise ValueError(f"coordinate_addition must be one of {COORDINATES}, got {mode!r}")
    centres = (receptive_field_centres(input_size, layers) - input_size // 2) / 100.0
    size = len(centres)
    offsets = torch.zeros(size, size, POSE, dtype=torch.float64)  # float64: cast to the votes' dtype in use
    if mode != "none":
        row_atom, column_atom = COORDINATE_ATOMS[mode]
        offsets[:, :, row_atom] = centres.view(-1, 1)
        offsets[:, :, column_atom] = centres.view(1, -1)
    return offsets.reshape(size * size, POSE)


class MatrixCapsulesEM(nn.Module):
    """The paper's smallNORB network (module docstring).

    Args:
        input_size, in_channels, num_classes, task: from the data (``task`` "single" or
            "multi": the class activations are independent sigmoids either way).
        conv_channels: A.  primary_types: B.  caps_types: (C, D).
        caps_kernels, caps_strides: the two convolutional capsule layers' K and stride.
        iterations: EM iterations in every routing layer.
        final_lambda: λ of the convolutional capsule layers; the class layer's is
            ``final_lambda * class_lambda_factor``.
        cost, conv_normalisation, min_var, center_momentum: see capsnet.nn.routing.em.
        coordinate_addition: "official", "paper" or "none" (module docstring).
    """

    objective = "spread"  # the spread loss on the class activations (capsnet.run.objectives)

    def __init__(
        self,
        *,
        input_size: int = 32,
        in_channels: int = 2,
        num_classes: int = 5,
        task: str = "single",
        conv_channels: int = 32,
        primary_types: int = 32,
        caps_types: tuple[int, int] | list[int] = (32, 32),
        caps_kernels: tuple[int, int] | list[int] = (3, 3),
        caps_strides: tuple[int, int] | list[int] = (2, 1),
        iterations: int = 3,
        final_lambda: float = OFFICIAL_FINAL_LAMBDA,
        class_lambda_factor: float = 0.25,
        cost: str = "official",
        conv_normalisation: str = "official",
        min_var: float = 0.0005,
        center_momentum: float = 0.1,
        coordinate_addition: str = "official",
    ) -> None:
        super().__init__()
        if task not in ("single", "multi"):
            raise ValueError(f"task must be 'single' or 'multi', got {task!r}")
        if not len(caps_types) == len(caps_kernels) == len(caps_strides) == 2:
            raise ValueError("caps_types, caps_kernels and caps_strides need two entries (ConvCaps1, ConvCaps2)")
        self.task = task
        conv_kernel, conv_stride = 5, 2
        size = _out(input_size, conv_kernel, conv_stride)
        self.conv1 = nn.Conv2d(in_channels, conv_channels, conv_kernel, stride=conv_stride)
        _trunc_normal_(self.conv1.weight, 0.05)
        nn.init.constant_(self.conv1.bias, 0.1)
        self.primary = PrimaryMatrixCaps(conv_channels, primary_types)
        shared = {"iters": iterations, "cost": cost, "min_var": min_var, "center_momentum": center_momentum}
        layers, in_types, conv_caps = [(conv_kernel, conv_stride)], primary_types, []
        for types, kernel, stride in zip(caps_types, caps_kernels, caps_strides, strict=True):
            if _out(size, kernel, stride) < 1:
                raise ValueError(f"input_size {input_size} is too small for the capsule layers (grid {size})")
            layer = ConvMatrixCaps(
                in_types,
                types,
                in_size=size,
                kernel=kernel,
                stride=stride,
                final_lambda=final_lambda,
                mass_eps=1e-7,
                normalisation=conv_normalisation,
                beta_u_init=0.5,
                beta_a_init=0.5,
                **shared,
            )
            conv_caps.append(layer)
            layers.append((kernel, stride))
            size, in_types = layer.out_size, types
        self.conv_caps = nn.ModuleList(conv_caps)
        self.class_caps = ClassMatrixCaps(
            in_types,
            num_classes,
            offsets=coordinate_offsets(input_size, layers, coordinate_addition),
            final_lambda=final_lambda * class_lambda_factor,
            mass_eps=1e-5,
            beta_u_init=2.0,
            beta_a_init=1.0,
            **shared,
        )

    def forward(self, x: Tensor, y: Tensor | None = None) -> MatrixCapsulesOutput:
        """Class activations and poses of images x [B, C, H, W] (``y`` is not used)."""
        poses, activations = self.primary(torch.relu(self.conv1(x)))
        for layer in self.conv_caps:
            poses, activations = layer(poses, activations)
        class_a, class_poses = self.class_caps(poses, activations)
        return MatrixCapsulesOutput(lengths=class_a, poses=class_poses, reconstructions=None)


__all__ = [
    "ClassMatrixCaps",
    "ConvMatrixCaps",
    "MatrixCapsulesEM",
    "MatrixCapsulesOutput",
    "PrimaryMatrixCaps",
    "coordinate_offsets",
    "receptive_field_centres",
]
