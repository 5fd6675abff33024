"""Weights & Biases specifics: offline by default without an API key, resolved configs,
one W&B run per job, and the results table as a W&B table."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from capsnet.run_record import resolved_config


def wandb_api_key_configured() -> bool:
    """True when W&B could sync: WANDB_API_KEY is set or `wandb login` stored a key."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def is_wandb(logger_cfg: DictConfig | None) -> bool:
    return bool(logger_cfg) and str(logger_cfg.get("_target_", "")).endswith("WandbLogger")


def wandb_overrides(logger_cfg: DictConfig) -> dict[str, Any]:
    """Constructor arguments decided at run time: offline unless a key is configured."""
    offline = logger_cfg.get("offline")
    return {"offline": (not wandb_api_key_configured()) if offline is None else bool(offline)}


def log_resolved_config(logger: Logger, cfg: DictConfig) -> None:
    """Log the fully resolved config, so the dashboard shows values, not ${...}."""
    logger.log_hyperparams(resolved_config(cfg))


def finish_wandb(loggers: list[Logger]) -> None:
    """Close the W&B run so the next job of a sweep starts its own."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()


def log_table_to_wandb(
    columns: list[str], rows: list[list[Any]], *, project: str, group: str, title: str, save_dir: str
) -> str:
    """Log the results table as a W&B table in its own run of the sweep's group."""
    import wandb

    mode = "online" if wandb_api_key_configured() else "offline"
    run = wandb.init(project=project, group=group, job_type="table", name=f"{group}/table", mode=mode,
                     config={"title": title}, dir=save_dir)
    try:
        run.log({"table1": wandb.Table(columns=columns, data=rows)})
        return str(run.dir)
    finally:
        run.finish()
