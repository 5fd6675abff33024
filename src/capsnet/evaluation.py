"""evaluate(cfg): test a saved checkpoint on any dataset config and record the result."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from capsnet.builders import build_datamodule, data_info
from capsnet.figures import write_run_figures
from capsnet.module import CapsNetModule
from capsnet.run_record import git_commit, write_metrics
from capsnet.training import collect_test_metrics


class CheckpointError(ValueError):
    """The file is not a capsnet checkpoint, or was trained for different data."""


def load_checkpoint(path: str | Path, expected_data: dict[str, Any]) -> CapsNetModule:
    """Load a capsnet checkpoint, refusing files of another kind or another input format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path: no such file {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # pickle, zip and EOF errors all mean the same to a user
        raise CheckpointError(f"ckpt_path: {path} is not a readable PyTorch checkpoint ({error})") from error
    params = raw.get("hyper_parameters") if isinstance(raw, dict) else None
    if not params or not {"model", "data", "loss", "optim"} <= set(params) or "state_dict" not in raw:
        raise CheckpointError(f"ckpt_path: {path} is not a capsnet training checkpoint (no model/data hyper-parameters)")
    trained = params["data"]
    mismatched = {k: (trained.get(k), v) for k, v in expected_data.items() if trained.get(k) != v}
    if mismatched:
        described = ", ".join(f"{k}: checkpoint {a!r} vs data {b!r}" for k, (a, b) in mismatched.items())
        raise CheckpointError(
            f"ckpt_path: {path} was trained for other inputs than this data config ({described}); "
            f"pick a data= config with the same image size and task"
        )
    module = CapsNetModule(**params)  # the file is read once: build from its own hyper-parameters
    module.load_state_dict(raw["state_dict"])
    return module


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test ``cfg.ckpt_path`` on ``cfg.data``; write metrics.json in the eval run dir."""
    started = time.time()
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    module = load_checkpoint(cfg.ckpt_path, data_info(datamodule))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer = L.Trainer(**trainer_kwargs, logger=False, enable_checkpointing=False)
    results = trainer.test(module, datamodule=datamodule, verbose=True)
    model_cfg = module.hparams["model"]
    is_capsnet = model_cfg["name"] == "capsnet"
    record = {
        "model": model_cfg["name"],
        "data": cfg.data.name,
        "routing_iters": model_cfg.get("routing_iterations") if is_capsnet else None,
        "recon": model_cfg.get("reconstruction") if is_capsnet else None,
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        **collect_test_metrics(results, cfg.data.name),
        "wall_time_s": round(time.time() - started, 2),
        "git_commit": git_commit(),
        "status": "completed",
    }
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("figures", True):
        figures = write_run_figures(module.net, datamodule.sample_batches(), out_dir / "figures", module.task,
                                    source=f"checkpoint {cfg.ckpt_path}")
        record["figures"] = [p.name for p in figures]
    write_metrics(out_dir, record)
    return record
