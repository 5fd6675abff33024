"""evaluate(cfg): test a saved checkpoint on any dataset config and record the result."""

from __future__ import annotations

import glob
import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from capsnet.reporting.figures import write_run_figures
from capsnet.run.builders import build_datamodule, data_info
from capsnet.run.module import CapsNetModule, error_metric, top_k_error
from capsnet.run.record import METRICS_FILE, RECORD_WAY_OUT, git_commit, read_metrics, routing_identity, write_metrics
from capsnet.run.rundir import DamagedFileError, RunDir, load_checkpoint_file, read_json
from capsnet.run.signature import configuration, differences
from capsnet.run.training import CHECKPOINT_DIR, collect_test_metrics
from capsnet.run.validation import validate_eval_config

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """The file is not a capsnet checkpoint, or was trained for different data."""


def load_checkpoint(path: str | Path, expected_data: dict[str, Any]) -> CapsNetModule:
    """Load a capsnet checkpoint, refusing files of another kind or another input format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path: no such file {path}")
    try:
        raw = load_checkpoint_file(path)
    except DamagedFileError as error:  # pickle, zip, EOF and checksum errors all mean the same to a user
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


EVAL_KINDS = ("eval", "ensemble")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test ``cfg.ckpt_path`` on ``cfg.data`` (several checkpoints: as an ensemble); write
    metrics.json in the eval run dir.

    The eval dir is owned like a training run dir (:class:`~capsnet.run.rundir.RunDir`): locked,
    and never a training run's: a dir holding a training record is refused; an earlier
    evaluation's files there are moved to ``superseded/``.
    """
    owner = RunDir(
        cfg.paths.output_dir, job_log=f"{HydraConfig.get().job.name}.log" if HydraConfig.initialized() else None
    )
    try:
        owner.acquire()
        validate_eval_config(cfg)
        paths = checkpoint_paths(cfg.ckpt_path)
        if len(paths) > 1:  # the members are chosen (or the set refused) before any work
            members = ensemble_members(paths, (cfg.get("ensemble") or {}).get("profile"))
        previous = read_json(owner.path / METRICS_FILE, RECORD_WAY_OUT)
        if previous is not None and previous.get("kind") not in EVAL_KINDS:
            raise CheckpointError(
                f"hydra.run.dir: {owner.path} holds a training run's record (metrics.json): an evaluation never writes "
                f"over it. Leave hydra.run.dir at its default (outputs/eval/<time>) or name a dir of its own"
            )
    except BaseException:
        owner.undo()
        raise
    try:
        if previous is not None:
            owner.supersede(keep={".hydra", *(filter(None, [owner.job_log]))})
        if len(paths) > 1:
            return evaluate_ensemble(cfg, *members)
        return evaluate_one(cfg, paths[0])
    finally:
        owner.release()


def ensemble_members(
    paths: list[Path], profile: str | None = None
) -> tuple[list[Path], list[dict[str, Any]], list[dict[str, str]]]:
    """The checkpoints that may join an ensemble, each read against its run record
    (``<run dir>/metrics.json`` beside its ``checkpoints/``), and the others with why not.

    A member must come from a run whose record says ``completed`` (a failed run, or one
    killed or still training, may have a best.ckpt but no result to stand on), that
    recorded its signature, and, when ``profile`` is given, that ran under that profile.
    All members must share one configuration (the signature without seed and world size):
    otherwise a :class:`CheckpointError` names the differences and how to narrow the set.

    Returns the members' checkpoints, their run records (same order), and the checkpoints
    left out, each with its reason (also logged).
    """
    members: list[Path] = []
    records: list[dict[str, Any]] = []
    excluded: list[dict[str, str]] = []
    for path in paths:
        run_dir = path.parent.parent
        record = read_metrics(run_dir) if path.parent.name == CHECKPOINT_DIR else None
        if record is None:
            reason = f"no run record ({run_dir / METRICS_FILE}): not a finished capsnet run"
        elif record.get("status") != "completed":
            reason = f"its run is {record.get('status')!r}, not completed"
        elif not record.get("signature"):
            reason = "its run record has no signature (written by an older capsnet)"
        elif profile is not None and record.get("profile") != profile:
            reason = f"profile {record.get('profile')!r}, not {profile!r} (ensemble.profile)"
        else:
            members.append(path)
            records.append(record)
            continue
        excluded.append({"checkpoint": str(path), "reason": reason})
        log.warning("ensemble: leaving out %s: %s", path, reason)
    if not members:
        listed = "; ".join(f"{e['checkpoint']}: {e['reason']}" for e in excluded)
        raise CheckpointError(f"ckpt_path: no checkpoint of a completed run to ensemble ({listed})")
    by_configuration: dict[str, list[Path]] = {}
    for path, record in zip(members, records, strict=True):
        key = json.dumps(configuration(record["signature"]), sort_keys=True, default=str)
        by_configuration.setdefault(key, []).append(path)
    if len(by_configuration) > 1:
        first, *others = by_configuration
        changes = sorted({c for other in others for c in differences(json.loads(first), json.loads(other))})
        groups = "; ".join(
            f"{len(group)} from {', '.join(str(p.parent.parent) for p in group)}" for group in by_configuration.values()
        )
        raise CheckpointError(
            f"ckpt_path: the completed runs are of {len(by_configuration)} configurations ({groups}), which differ "
            f"in {'; '.join(changes[:8])}. An ensemble averages members of one configuration: narrow ckpt_path "
            "to one of them (a narrower glob or a list), or pick a profile with ensemble.profile=<profile>"
        )
    return members, records, excluded


def evaluate_ensemble(
    cfg: DictConfig, paths: list[Path], runs: list[dict[str, Any]], excluded: list[dict[str, str]]
) -> dict[str, Any]:
    """The paper's CIFAR-10 protocol: average the capsule lengths of completed runs of one
    configuration (the members and their records from :func:`ensemble_members`)."""
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
        **routing_identity(model_cfg),
        # the members' own: the table's --profile keeps the ensemble with its members
        "profile": runs[0].get("profile"),
        "experiment": runs[0].get("experiment"),
        "configuration": configuration(runs[0]["signature"]),
        "member_seeds": [run.get("seed") for run in runs],
        "ensemble_size": len(members),
        "test_error": results["test/error"],
        "member_test_errors": member_errors,
        "member_test_error_mean": sum(member_errors) / len(member_errors),
        "checkpoints": [str(p.resolve()) for p in paths],
        "excluded": excluded,
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
    record = {
        "kind": "eval",
        "model": model_cfg["name"],
        "data": cfg.data.name,
        **routing_identity(model_cfg),
        "checkpoint": str(ckpt_path.resolve()),
        **collect_test_metrics(results, datamodule.record_fields),
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
                sample_titles=getattr(datamodule, "sample_titles", None),
            )
            record["figures"] = [p.name for p in figures]
        except Exception as error:  # the test result stands without its pictures
            log.exception("figures failed; the result is recorded without them")
            record["figures_error"] = f"{type(error).__name__}: {error}"
    write_metrics(out_dir, record)
    return record
