"""Validation of a composed config, before any data is read or any run dir is filled.

Hydra already rejects unknown group options (``profile=nope``) and misspelt keys at
compose time; this adds the value checks it cannot express, each naming the key.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

MODELS = ("capsnet", "baseline")
DATASETS = ("mnist", "affnist", "multimnist")
PROFILES = ("smoke", "demo", "fast", "paper")


class ConfigError(ValueError):
    """An invalid config value; the message names the key and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"invalid config value {key}={value!r}: {allowed}")
        self.key = key


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(cfg: DictConfig, key: str, *, optional: bool = False, minimum: int = 1) -> None:
    value = _select(cfg, key)
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        extra = " or null" if optional else ""
        raise ConfigError(key, value, f"must be an integer >= {minimum}{extra}")


def _select(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first invalid value in ``cfg``."""
    _positive_int(cfg, "routing.iters")
    if not isinstance(cfg.recon, bool):
        raise ConfigError("recon", cfg.recon, "must be a boolean: true or false")
    if cfg.model.name not in MODELS:
        raise ConfigError("model.name", cfg.model.name, f"must be one of {', '.join(MODELS)}")
    if cfg.data.name not in DATASETS:
        raise ConfigError("data.name", cfg.data.name, f"must be one of {', '.join(DATASETS)}")
    if cfg.profile_name not in PROFILES:
        raise ConfigError("profile_name", cfg.profile_name, f"must be one of {', '.join(PROFILES)}")
    for key in ("data.batch_size", "data.eval_batch_size", "data.val_size", "optim.decay_steps",
                "checkpoint.every_n_steps", "nan_check_every"):
        _positive_int(cfg, key)
    for key in ("data.train_subset", "data.val_subset", "data.test_subset"):
        _positive_int(cfg, key, optional=True)
    _positive_int(cfg, "seed", minimum=0)
    lr = cfg.optim.lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError("optim.lr", lr, "must be a positive number, e.g. 0.001")
    rate = cfg.optim.decay_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ConfigError("optim.decay_rate", rate, "must be a number in (0, 1]")
    for key in ("resume", "deterministic", "figures", "perf.channels_last", "perf.compile", "loss.official_scaling", "loss.mask_with_label_at_test"):
        if not isinstance(_select(cfg, key), bool):
            raise ConfigError(key, _select(cfg, key), "must be a boolean: true or false")
