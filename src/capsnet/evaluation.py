"""evaluate(cfg): test a saved checkpoint on any dataset config and record the result."""

from __future__ import annotations

import glob
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from capsnet.builders import build_datamodule, data_info
from capsnet.figures import write_run_figures
from capsnet.module import CapsNetModule, error_metric, top_k_error
from capsnet.run_record import git_commit, write_metrics
from capsnet.training import collect_test_metrics

log = logging.getLogger(__name__)


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
        raise CheckpointError(
            f"ckpt_path: {path} is not a capsnet training checkpoint (no model/data hyper-parameters)"
        )
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


def checkpoint_paths(spec: Any) -> list[Path]:
    """``ckpt_path``: one path, a glob pattern, or a list of either; in sorted order."""
    items = [spec] if isinstance(spec, str) else [str(item) for item in spec]
    paths: list[Path] = []
    for item in items:
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise CheckpointError(f"ckpt_path: no file matches {item}")
        paths += [Path(m) for m in matches]
    return paths


class Ensemble(L.LightningModule):
    """Members tested together: each member's error, and the error of their averaged class
    scores (capsule lengths for CapsNet), on the datamodule's own test split."""

    def __init__(self, members: list[CapsNetModule]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.member_errors = nn.ModuleList(error_metric() for _ in members)
        self.ensemble_error = error_metric()

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx:  # extra test sets (affNIST) are not part of an ensemble's result
            return
        images, labels = batch[0], batch[1]
        scores = [member(images) for member in self.members]
        for metric, member_scores in zip(self.member_errors, scores, strict=True):
            metric.update(top_k_error(member_scores, labels))
        self.ensemble_error.update(top_k_error(torch.stack(scores).mean(dim=0), labels))
        for k, metric in enumerate(self.member_errors):
            self.log(f"test/member{k}_error", metric, on_epoch=True, add_dataloader_idx=False)
        self.log("test/error", self.ensemble_error, on_epoch=True, add_dataloader_idx=False)


def _test_setup(cfg: DictConfig) -> tuple[L.LightningDataModule, L.Trainer]:
    """The checked data and a Trainer of ``cfg.trainer`` that only tests (no logger, no checkpoints)."""
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    trainer = L.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), logger=False, enable_checkpointing=False)
    return datamodule, trainer


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test ``cfg.ckpt_path`` on ``cfg.data`` (several checkpoints: as an ensemble); write
    metrics.json in the eval run dir."""
    paths = checkpoint_paths(cfg.ckpt_path)
    if len(paths) > 1:
        return evaluate_ensemble(cfg, paths)
    return evaluate_one(cfg, paths[0])


def evaluate_ensemble(cfg: DictConfig, paths: list[Path]) -> dict[str, Any]:
    """The paper's CIFAR-10 protocol: average the members' capsule lengths."""
    started = time.time()
    datamodule, trainer = _test_setup(cfg)
    members = [load_checkpoint(path, data_info(datamodule)) for path in paths]
    names = {m.hparams["model"]["name"] for m in members}
    results = trainer.test(Ensemble(members), datamodule=datamodule, verbose=True)[0]  # the dataset's own test split
    member_errors = [results[f"test/member{k}_error"] for k in range(len(members))]
    model_cfg = members[0].hparams["model"]
    record = {
        "kind": "ensemble",
        "model": "+".join(sorted(names)),
        "data": cfg.data.name,
        "routing_iters": model_cfg.get("routing_iterations"),
        "recon": model_cfg.get("reconstruction"),
        "ensemble_size": len(members),
        "test_error": results["test/error"],
        "member_test_errors": member_errors,
        "member_test_error_mean": sum(member_errors) / len(member_errors),
        "checkpoints": [str(p.resolve()) for p in paths],
        "wall_time_s": round(time.time() - started, 2),
        "git_commit": git_commit(),
        "status": "completed",
    }
    write_metrics(Path(cfg.paths.output_dir), record)
    return record


def evaluate_one(cfg: DictConfig, ckpt_path: Path) -> dict[str, Any]:
    """Test one checkpoint; its figures too."""
    started = time.time()
    datamodule, trainer = _test_setup(cfg)
    module = load_checkpoint(ckpt_path, data_info(datamodule))
    results = trainer.test(module, datamodule=datamodule, verbose=True)
    model_cfg = module.hparams["model"]
    is_capsnet = "routing_iterations" in model_cfg
    record = {
        "model": model_cfg["name"],
        "data": cfg.data.name,
        "routing_iters": model_cfg.get("routing_iterations") if is_capsnet else None,
        "recon": model_cfg.get("reconstruction") if is_capsnet else None,
        "checkpoint": str(ckpt_path.resolve()),
        **collect_test_metrics(results, cfg.data.name),
        "wall_time_s": round(time.time() - started, 2),
        "git_commit": git_commit(),
        "status": "completed",
    }
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("figures", True):
        try:
            figures = write_run_figures(
                module.net,
                datamodule.sample_batches(),
                out_dir / "figures",
                module.task,
                source=f"checkpoint {ckpt_path}",
            )
            record["figures"] = [p.name for p in figures]
        except Exception as error:  # the test result stands without its pictures
            log.exception("figures failed; the result is recorded without them")
            record["figures_error"] = f"{type(error).__name__}: {error}"
    write_metrics(out_dir, record)
    return record
