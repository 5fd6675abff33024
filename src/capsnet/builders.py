"""Turn a composed config into the objects a run needs: data, LightningModule, logger."""

from __future__ import annotations

from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from capsnet.data.mnist import MNISTDataModule
from capsnet.module import CapsNetModule
from capsnet.tracking import is_wandb, wandb_overrides


def _container(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The DataModule named by ``data.name``, reading from ``paths.data_dir``."""
    data = _container(cfg.data)
    name = data.pop("name")
    data.pop("lr_decay_steps", None)  # the dataset's schedule: read through optim.decay_steps
    common = {"data_dir": str(cfg.paths.data_dir), "seed": int(cfg.seed)}
    if name == "mnist":
        return MNISTDataModule(**common, **data)
    if name == "affnist":
        from capsnet.data.affnist import AffNISTDataModule

        return AffNISTDataModule(**common, **data)
    if name == "multimnist":
        from capsnet.data.multimnist import MultiMNISTDataModule

        return MultiMNISTDataModule(**common, **data)
    raise ValueError(f"data.name: unknown dataset {name!r}")


def data_info(datamodule: L.LightningDataModule) -> dict[str, Any]:
    """What the network must know about the data."""
    return {
        "image_size": datamodule.image_size,
        "in_channels": datamodule.in_channels,
        "num_classes": datamodule.num_classes,
        "task": datamodule.task,
    }


def build_module(cfg: DictConfig, datamodule: L.LightningDataModule) -> CapsNetModule:
    return CapsNetModule(
        model=_container(cfg.model),
        data=data_info(datamodule),
        loss=_container(cfg.loss),
        optim=_container(cfg.optim),
        nan_check_every=int(cfg.nan_check_every),
        channels_last=bool(cfg.perf.channels_last),
        compile=cfg.perf.compile,
    )


def build_logger(cfg: DictConfig) -> Logger | bool:
    """The configured experiment logger, or False.  (capsnet.training logs the resolved
    config to it once the run is known to go ahead.)"""
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return False
    extra = wandb_overrides(cfg.logger) if is_wandb(cfg.logger) else {}
    return instantiate(cfg.logger, **extra)
