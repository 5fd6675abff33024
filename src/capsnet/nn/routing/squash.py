"""The squash non-linearities capsules end with, chosen by name, and capsule lengths.

``"hinton"``: Eq. 1 of Sabour et al. (2017), ``|s|^2 / (1 + |s|^2) · s / |s|``
(:func:`squash`, ε inside the square root).

``"efficient"``: Efficient-CapsNet's squash (Mazzia et al. 2021), ``(1 - e^{-|s|}) · s / |s|``,
as the official code writes it in ``utils/layers.py`` (class ``Squash``, repository
EscVM/Efficient-CapsNet): ``(1 - 1/(exp(n) + eps)) * s / (n + eps)`` with ``n = |s|`` and
``eps = 10e-21``.  Here the guard sits inside the square root instead (see
:func:`efficient_squash`), which keeps the gradient finite at ``s = 0``.

Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

SQUASHES = ("hinton", "efficient")


SQUASH_EPS = 1e-8


def squash(s: Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> Tensor:
    """Shrink a vector to length ``|s|^2 / (1 + |s|^2)`` keeping its direction (Eq. 1).

    ``eps`` sits inside the square root so the gradient stays finite at ``s = 0``; the
    plain ``s / |s|`` gives NaN gradients there.

    Shapes:
        s: [..., D] (capsule dimension at ``dim``) -> same shape.
    """
    norm_sq = s.pow(2).sum(dim=dim, keepdim=True)
    scale = norm_sq / (1.0 + norm_sq) / torch.sqrt(norm_sq + _representable(eps, s.dtype))
    return scale * s


def capsule_lengths(v: Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> Tensor:
    """Length of each capsule (the class probability in the paper), safe at zero."""
    return torch.sqrt(v.pow(2).sum(dim=dim) + _representable(eps, v.dtype))


def _representable(eps: float, dtype: torch.dtype) -> float:
    """``eps``, raised to the smallest normal number of ``dtype`` where it would round to 0
    (1e-8 is 0 in float16, which would bring back the NaN gradient at s = 0)."""
    return max(eps, torch.finfo(dtype).tiny) if dtype.is_floating_point else eps


hinton_squash = squash


def efficient_squash(s: Tensor, dim: int = -1) -> Tensor:
    """Efficient-CapsNet's squash: length ``1 - exp(-|s|)``, direction of ``s``.

    Differences from the official ``Squash`` (none visible at float precision away from 0):

    - ``|s|`` is ``sqrt(sum s^2 + tiny)`` with ``tiny`` the dtype's smallest normal number,
      not ``tf.norm(s)``: the plain norm's gradient is NaN at ``s = 0`` (0 · ∞).  With the
      guard the Jacobian at 0 is the identity, the limit of ``(1 - e^{-n}) / n``.
    - ``1 - e^{-n}`` is computed as ``-expm1(-n)``.  The official ``1 - 1/(exp(n) + 1e-20)``
      equals it in exact arithmetic up to 1e-20 (``exp(n) >= 1``, so the ``+ 1e-20`` is
      below float64's resolution) and loses digits to cancellation for small ``n``.
    - no ``+ eps`` beside the norm in ``s / |s|``: the guarded norm is never 0.

    Shapes:
        s: [..., D] (capsule dimension at ``dim``) -> same shape.
    """
    norm = torch.sqrt(s.pow(2).sum(dim=dim, keepdim=True) + torch.finfo(s.dtype).tiny)
    return -torch.expm1(-norm) * s / norm


def squash_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The squash called ``name`` (one of :data:`SQUASHES`)."""
    if name == "hinton":
        return hinton_squash
    if name == "efficient":
        return efficient_squash
    raise ValueError(f"squash must be one of {SQUASHES}, got {name!r}")


__all__ = ["SQUASHES", "capsule_lengths", "efficient_squash", "hinton_squash", "squash", "squash_fn"]
