"""run(cfg): validate, build, fit, test, and record one training job in its run dir.

A job is idempotent: its run dir is a pure function of its command line, so running the
same command again skips a completed job and resumes an unfinished one from last.ckpt.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from capsnet.builders import build_datamodule, build_logger, build_module
from capsnet.figures import write_run_figures
from capsnet.run_record import git_commit, read_metrics, save_resolved_config, write_metrics
from capsnet.schema import validate_config
from capsnet.tracking import finish_wandb

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The fields that say which cell of the results table a run belongs to."""
    is_capsnet = cfg.model.name == "capsnet"
    return {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "routing_iters": int(cfg.routing.iters) if is_capsnet else None,
        "recon": bool(cfg.recon) if is_capsnet else None,
        "seed": int(cfg.seed),
        "profile": cfg.profile_name,
        "experiment": cfg.experiment_name,
    }


def is_redundant_baseline(cfg: DictConfig) -> bool:
    """The baseline ignores routing.iters and recon, so in a grid over them it trains only
    in the default cell (r=3, recon on); every other cell would repeat that job."""
    return cfg.model.name == "baseline" and (int(cfg.routing.iters), bool(cfg.recon)) != (3, True)


def gpu_slot(trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Under the joblib launcher, pin job k to GPU k mod (GPU count).

    Parallel sweep jobs would otherwise all land on GPU 0.  Setting trainer.devices (not
    CUDA_VISIBLE_DEVICES, which a reused worker process has already read) does the pinning.
    """
    if not HydraConfig.initialized() or trainer_kwargs.get("accelerator") == "cpu":
        return {}
    hydra_cfg = HydraConfig.get()
    launcher = str(hydra_cfg.launcher.get("_target_", "")) if hydra_cfg.get("launcher") else ""
    count = torch.cuda.device_count()
    if "joblib" not in launcher.lower() or count < 1:
        return {}
    return {"accelerator": "gpu", "devices": [int(hydra_cfg.job.num) % count]}


def _callbacks(cfg: DictConfig, ckpt_dir: Path) -> tuple[ModelCheckpoint, ModelCheckpoint]:
    best = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor="val/error", mode="min",
        save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False,
    )
    periodic = ModelCheckpoint(
        dirpath=ckpt_dir, save_last=True, save_top_k=0,
        every_n_train_steps=int(cfg.checkpoint.every_n_steps), enable_version_counter=False,
    )
    return best, periodic


def prepare_run_dir(cfg: DictConfig) -> Path:
    """Validate the config and the data before anything is trained.

    On an invalid config or missing data the run dir Hydra made is removed again (when it
    holds no earlier results), so a typo leaves nothing half-made behind.
    """
    run_dir = Path(cfg.paths.output_dir)
    try:
        validate_config(cfg)
        build_datamodule(cfg).prepare_data()
    except Exception:
        if not (run_dir / CHECKPOINT_DIR).exists() and read_metrics(run_dir) is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one configuration; return (and write) its metrics.json record."""
    run_dir = prepare_run_dir(cfg)
    identity = run_identity(cfg)
    previous = read_metrics(run_dir)
    if cfg.resume and previous is not None and previous.get("status") in ("completed", "skipped"):
        log.info("%s already %s; skipping (resume=false to retrain)", run_dir, previous["status"])
        return previous
    if is_redundant_baseline(cfg):
        record = {**identity, "status": "skipped", "error": "baseline trains only in the r=3, recon=true cell"}
        write_metrics(run_dir, record)
        return record

    started = time.time()
    save_resolved_config(cfg, run_dir)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    resume_from = ckpt_dir / LAST if cfg.resume and (ckpt_dir / LAST).is_file() else None
    record: dict[str, Any] = {**identity, "git_commit": git_commit(), "status": "running"}
    trainer: L.Trainer | None = None
    try:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        datamodule = build_datamodule(cfg)
        module = build_module(cfg, datamodule)
        best, periodic = _callbacks(cfg, ckpt_dir)
        trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
        trainer_kwargs.update(gpu_slot(trainer_kwargs))
        trainer = L.Trainer(
            **trainer_kwargs, callbacks=[best, periodic], logger=build_logger(cfg), default_root_dir=str(run_dir)
        )
        if resume_from is not None:
            log.info("resuming from %s", resume_from)
            record["resumed_from"] = str(resume_from)
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
        trainer.save_checkpoint(ckpt_dir / LAST)
        best_path = best.best_model_path or str(ckpt_dir / LAST)
        results = trainer.test(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)
        record.update(collect_test_metrics(results, cfg.data.name))
        if cfg.figures and trainer.is_global_zero:
            record["figures"] = [p.name for p in _write_figures(module, datamodule, run_dir, trainer)]
        record.update(
            status="completed",
            val_error=float(best.best_model_score) if best.best_model_score is not None else None,
            best_checkpoint=best_path,
        )
    except Exception as error:  # recorded so one failed job never hides the others' results
        log.exception("run failed")
        record.update(status="failed", error=f"{type(error).__name__}: {error}")
    finally:
        if trainer is not None:
            record.update(epochs=trainer.current_epoch, steps=trainer.global_step)
        record["wall_time_s"] = round(time.time() - started, 2)
        if trainer is not None:
            finish_wandb(trainer.loggers)
        if trainer is None or trainer.is_global_zero:  # under DDP, one writer
            write_metrics(run_dir, record)
    return record


def collect_test_metrics(results: list[dict[str, float]], data_name: str) -> dict[str, float]:
    """Map Lightning's per-loader test results onto metrics.json's keys."""
    merged: dict[str, float] = {}
    for loader_results in results:
        merged.update(loader_results)
    record = {"test_error": merged["test/error"]}
    for key, value in merged.items():
        if key.endswith("_error") and key.startswith("test/") and key != "test/error":
            record[key.removeprefix("test/")] = value
    if data_name == "multimnist":
        record["multimnist_error"] = record["test_error"]
    return record


def _write_figures(module, datamodule, run_dir: Path, trainer: L.Trainer) -> list[Path]:
    """PNG figures into the run dir; also logged as images when W&B is on."""
    written = write_run_figures(module.net, datamodule.sample_batches(), run_dir / "figures", module.task)
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            pngs = [p for p in written if p.suffix == ".png"]
            logger.log_image(key="figures", images=[str(p) for p in pngs], caption=[p.stem for p in pngs])
    return written
