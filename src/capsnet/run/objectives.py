"""What a model is trained to minimise, chosen by the model itself.

Every model class declares ``objective`` (a name below), and a model config may override it
with an ``objective`` key; there is no ``isinstance`` dispatch, so a capsule model that is
not a CapsNet subclass can never silently train with cross-entropy.  An objective turns a
batch into the class scores (for the error) and the named loss parts (summed, and logged
each as ``<stage>/<name>_loss``).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from capsnet.nn.losses import as_multi_hot, margin_loss, reconstruction_loss
from capsnet.nn.spread_loss import spread_loss_with_schedule


class Objective:
    """Loss parts and class scores of one batch."""

    def __init__(self, loss_cfg: dict[str, Any], task: str) -> None:
        self.cfg, self.task = loss_cfg, task

    def scores(self, net: nn.Module, images: Tensor) -> Tensor:
        """Class scores [B, K] (higher is more likely), for the error and for ensembles."""
        raise NotImplementedError

    def __call__(
        self, net: nn.Module, images: Tensor, labels: Tensor, parts: Tensor | None, *, training: bool, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


class CapsuleObjective(Objective):
    """The paper's: margin loss on the class capsules (Eq. 4) + 0.0005·SSE reconstruction
    (§4.1); MultiMNIST decodes each present digit from its own capsule (§6).  The model
    provides ``scores(x) -> (scores, poses)``, ``decoder`` and ``reconstruct(poses, labels)``."""

    def scores(self, net: nn.Module, images: Tensor) -> Tensor:
        return net.scores(images)[0]

    def __call__(self, net, images, labels, parts, *, training, step):
        cfg = self.cfg
        scores, poses = net.scores(images)
        loss = {
            "margin": margin_loss(
                scores,
                as_multi_hot(labels, scores.shape[1]),
                m_pos=cfg["m_pos"],
                m_neg=cfg["m_neg"],
                lam=cfg["lam"],
                official_scaling=cfg["official_scaling"],
            )
        }
        if getattr(net, "decoder", None) is not None:
            if self.task == "multi":  # one reconstruction per present digit, each against that digit's own image
                loss["recon"] = sum(
                    reconstruction_loss(net.reconstruct(poses, labels[:, k]), parts[:, k], cfg["recon_weight"])
                    for k in range(labels.shape[1])
                )
            else:
                use_label = training or cfg["mask_with_label_at_test"]
                mask = labels if use_label else scores.argmax(dim=1)
                loss["recon"] = reconstruction_loss(net.reconstruct(poses, mask), images, cfg["recon_weight"])
        return scores, loss


class LogitsObjective(Objective):
    """Class logits: softmax cross-entropy, or per-class sigmoid for several labels (the
    paper's CNN baselines)."""

    def scores(self, net: nn.Module, images: Tensor) -> Tensor:
        return net(images)

    def __call__(self, net, images, labels, parts, *, training, step):
        logits = net(images)
        if self.task == "multi":
            return logits, {
                "bce": F.binary_cross_entropy_with_logits(logits.float(), as_multi_hot(labels, logits.shape[1]))
            }
        return logits, {"ce": F.cross_entropy(logits.float(), labels)}


class SpreadObjective(Objective):
    """Matrix capsules with EM routing (Hinton et al. 2018): the spread loss on the class
    activations, its margin rising from 0.2 to 0.9 on the official code's schedule."""

    def __init__(self, loss_cfg: dict[str, Any], task: str) -> None:
        if task != "single":
            raise ValueError(
                "the spread loss takes one label per image: a model trained with it (matrix_capsules_em) "
                f"cannot train on a dataset with several labels per image (task={task!r}, e.g. data=multimnist)"
            )
        super().__init__(loss_cfg, task)

    def scores(self, net: nn.Module, images: Tensor) -> Tensor:
        return net(images).lengths

    def __call__(self, net, images, labels, parts, *, training, step):
        activations = net(images).lengths
        return activations, {"spread": spread_loss_with_schedule(activations, labels, step, schedule="official")}


OBJECTIVES: dict[str, type[Objective]] = {
    "capsule": CapsuleObjective,
    "logits": LogitsObjective,
    "spread": SpreadObjective,
}


def objective_for(net: nn.Module, name: str | None, loss_cfg: dict[str, Any], task: str) -> Objective:
    """The model config's ``objective``, else the one its class declares."""
    chosen = name or getattr(net, "objective", None)
    if chosen not in OBJECTIVES:
        raise ValueError(
            f"{type(net).__name__} declares no objective: give its class an `objective` attribute "
            f"(or its config an `objective` key), one of {', '.join(OBJECTIVES)}"
        )
    return OBJECTIVES[chosen](loss_cfg, task)
