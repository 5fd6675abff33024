"""Turn a composed config into the objects a run needs: the DataModule and the LightningModule.

Both are named by ``_target_`` in their config group (``conf/data/*.yaml``,
``conf/model/*.yaml``), so a new dataset or model is one class and one YAML.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from capsnet.run.module import CapsNetModule

# Keys of a data config that describe the dataset rather than configure its class.
DATA_RECORD_KEYS = ("name", "lr_decay_steps")


def _container(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The DataModule of ``data._target_``, reading from ``paths.data_dir``.

    The contract of every DataModule class: keyword arguments ``data_dir`` and ``seed``
    (the run seed), plus the data config's own keys; attributes ``image_size``,
    ``in_channels``, ``num_classes`` and ``task`` ("single" or "multi") for the model.
    """
    data = {k: v for k, v in _container(cfg.data).items() if k not in DATA_RECORD_KEYS}
    return instantiate(data, data_dir=str(cfg.paths.data_dir), seed=int(cfg.seed), _convert_="all")


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
