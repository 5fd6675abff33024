"""Experiment loggers: built from the ``logger`` config group, fed the resolved config,
and, for Weights & Biases, one W&B run per run dir that a resume continues.

Online or offline is wandb's own decision (``WANDB_MODE``, then its credential lookup:
``WANDB_API_KEY``, ``wandb login [--host]``, the netrc file ``NETRC`` names); without any
credentials a run goes offline rather than prompting or waiting on the network.
"""

from __future__ import annotations

import csv
import io
import os
import secrets
import string
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from capsnet.run.record import resolved_config
from capsnet.run.rundir import atomic_write_text
from capsnet.run.validation import ConfigError

WANDB_ID_FILE = "wandb_run_id"


def is_wandb(logger_cfg: Any) -> bool:
    return bool(logger_cfg) and str(logger_cfg.get("_target_", "")).endswith("WandbLogger")


def wandb_has_credentials() -> bool:
    """Whether wandb finds credentials for its configured host, by its own lookup and
    without prompting (``wandb.login(prompt=False)`` only reads env, settings and netrc)."""
    import wandb

    return bool(wandb.login(verify=False, prompt=False))


def wandb_offline(configured: bool | None) -> bool:
    """``logger.wandb.offline``: forced when true/false; null leaves it to wandb's rules."""
    if configured is not None:
        return bool(configured)
    if os.environ.get("WANDB_MODE"):  # wandb.init reads it itself
        return False
    return not wandb_has_credentials()


def wandb_mode(configured: bool | None) -> str:
    """The mode handed to ``wandb.init`` explicitly, by the rules of :func:`wandb_offline`:
    forced by ``logger.wandb.offline``; else ``WANDB_MODE`` when set; else online with
    credentials and offline without.  Explicit because wandb reads ``WANDB_MODE`` only when
    it builds its settings, once per process: the credential lookup builds them before
    Lightning sets ``WANDB_MODE=dryrun`` for an offline logger, so ``wandb.init`` would ask
    for an API key (``UsageError: No API key configured``), and so would every later job
    of a sweep in the same process."""
    if configured is None and os.environ.get("WANDB_MODE"):
        mode = os.environ["WANDB_MODE"]
        return {"dryrun": "offline", "run": "online"}.get(mode, mode)
    return "offline" if wandb_offline(configured) else "online"


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The W&B run id of this run dir: the stored one when the run resumes, a new one when
    it starts from scratch (so a retrained run never appends to the old run's curves)."""
    stored = run_dir / WANDB_ID_FILE
    if resuming and stored.is_file():
        return stored.read_text().strip()
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_arguments(node: DictConfig, run_dir: Path, resuming: bool, tags: list[str]) -> dict[str, Any]:
    """Constructor arguments decided at run time: mode, id, and the run's own tags."""
    mode = wandb_mode(node.get("offline"))
    offline = mode == "offline"
    if offline and node.get("log_model"):
        raise ConfigError(
            "logger.wandb.log_model",
            node.get("log_model"),
            "checkpoints can be uploaded as artifacts only online: log in to W&B (wandb login, or "
            "WANDB_API_KEY) or set logger.wandb.log_model=false",
        )
    return {
        "offline": offline,
        "mode": mode,
        "id": wandb_run_id(run_dir, resuming),
        "resume": "allow",
        "tags": [*(node.get("tags") or []), *tags],
    }


class _StepLogWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued, not
    deleted: the rows of the steps a resumed run trains again are dropped (so each step is
    listed once), the rest kept; and every row is written when it is logged, not 100 steps
    later."""

    def __init__(self, log_dir: str, keep_before_step: int) -> None:
        self.keep_before_step = keep_before_step
        super().__init__(log_dir=log_dir)

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        """Each row reaches the file at once (Lightning buffers 100 steps, which a kill loses)."""
        super().log_metrics(metrics_dict, step)
        self.save()

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            kept = [row for row in reader if _step(row) < self.keep_before_step]
        self.metrics_keys = sorted(header)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(path, text.getvalue())


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "inf")
    except ValueError:
        return float("inf")


class StepLog(CSVLogger):
    """``logger=csv``: the step log ``<run dir>/csv/metrics.csv``, one file over every
    segment of a resumed run (Lightning's CSVLogger deletes the file when its dir exists,
    so each requeue kept only its last segment).  ``resume_step``, set by capsnet before
    training, is the step the run continues from (0 for a fresh start)."""

    resume_step: int = 0

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _StepLogWriter(self.log_dir, keep_before_step=self.resume_step)
        return self._experiment


def build_loggers(cfg: DictConfig, run_dir: Path, resuming: bool = False) -> list[Logger]:
    """Every logger of the ``logger`` group (``logger=many``: csv, tensorboard and wandb)."""
    loggers: list[Logger] = []
    for name, node in (cfg.get("logger") or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"logger.{name}", node, "each logger is a node with a _target_ (see conf/logger/)")
        extra = wandb_arguments(node, run_dir, resuming, list(cfg.get("tags") or [])) if is_wandb(node) else {}
        loggers.append(instantiate(node, **extra))
    return loggers


def start_loggers(loggers: list[Logger], cfg: DictConfig, run_dir: Path) -> None:
    """Once the run is known to go ahead: log the resolved config (so every dashboard shows
    exactly ``config_resolved.yaml``) and keep the W&B id for a later resume."""
    params = resolved_config(cfg)
    for logger in loggers:
        if type(logger).__name__ == "TensorBoardLogger" and rank_zero_only.rank == 0:
            # Lightning writes tensorboard/hparams.yaml only when absent: a resumed run
            # would keep the first attempt's config
            Path(logger.log_dir, "hparams.yaml").unlink(missing_ok=True)
        logger.log_hyperparams(params)
        if type(logger).__name__ == "WandbLogger" and rank_zero_only.rank == 0:
            (run_dir / WANDB_ID_FILE).write_text(str(logger.experiment.id))


def finish_wandb(loggers: list[Logger]) -> None:
    """Close the W&B run so the next job of a sweep starts its own."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()


class WatchModel(Callback):
    """Opt-in (``callbacks=[default,watch_model]``): W&B histograms of the network's
    gradients (and weights with ``log=all``) every ``log_freq`` steps."""

    def __init__(self, log: str = "gradients", log_freq: int = 100) -> None:
        # not ``self.log``: Lightning binds the LightningModule's ``log`` onto callbacks
        self.histograms, self.log_freq = log, log_freq

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.watch(pl_module.net, log=self.histograms, log_freq=self.log_freq, log_graph=False)


def log_table_to_wandb(
    columns: list[str], rows: list[list[Any]], *, project: str, group: str, title: str, save_dir: str
) -> str:
    """Log the results table as a W&B table in its own run of the sweep's group."""
    import wandb

    mode = wandb_mode(None)
    run = wandb.init(
        project=project,
        group=group,
        job_type="table",
        name=f"{group}/table",
        mode=mode,
        config={"title": title},
        dir=save_dir,
    )
    try:
        run.log({"table1": wandb.Table(columns=columns, data=rows)})
        return str(run.dir)
    finally:
        run.finish()
