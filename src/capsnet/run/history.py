"""history.csv: one row per epoch, written as the run goes, so a killed run keeps what it had.

Each row holds the epoch's mean training losses (each part), training and validation
error, the learning rate at the epoch's end, training images per second and wall time.
A resumed run first drops the rows of the epochs it is about to train again, so no epoch
is ever listed twice.
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any

import lightning as L

from capsnet.run.rundir import DamagedFileError, atomic_write_text

HISTORY_FILE = "history.csv"
FIRST_COLUMNS = ["epoch", "step", "val_error", "val_loss", "train_error", "train_loss"]
LAST_COLUMNS = ["lr", "train_images_per_s", "epoch_time_s", "wall_time_s"]
HISTORY_WAY_OUT = (
    "Move it aside (e.g. to history.damaged.csv) and run the same command again: the run continues, and the "
    "epochs trained from now on are listed again"
)


def read_history(run_dir: Path) -> list[dict[str, float]]:
    """The rows of a run's history.csv as numbers (missing values as NaN), or [].

    A file that is not such a table raises :class:`DamagedFileError` naming it."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is not None and not {"epoch", "step"} <= set(reader.fieldnames):
                raise DamagedFileError(path, "its header has no epoch and step columns", HISTORY_WAY_OUT)
            rows = [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()} for row in reader]
    except (ValueError, TypeError, csv.Error, UnicodeDecodeError) as error:
        raise DamagedFileError(
            path, f"not a history table ({type(error).__name__}: {error})", HISTORY_WAY_OUT
        ) from error
    return rows


def summarize(rows: list[dict[str, float]]) -> dict[str, Any]:
    """metrics.json's summary of a history: epochs, the best validation epoch, speed."""
    if not rows:
        return {}
    scored = [r for r in rows if not math.isnan(r.get("val_error", math.nan))]
    best = min(scored, key=lambda r: r["val_error"]) if scored else None
    speeds = [r["train_images_per_s"] for r in rows if not math.isnan(r.get("train_images_per_s", math.nan))]
    return {
        "epochs": len(rows),
        "best_epoch": int(best["epoch"]) if best else None,
        "best_val_error": best["val_error"] if best else None,
        "mean_train_images_per_s": round(sum(speeds) / len(speeds), 2) if speeds else None,
        "mean_epoch_time_s": round(sum(r["epoch_time_s"] for r in rows) / len(rows), 2),
    }


class EpochHistory(L.Callback):
    """Appends a row to ``<run_dir>/history.csv`` after each training epoch (rank 0 only).

    Reads only epoch-level values Lightning has already reduced, so it adds no sync to
    the training steps.  The run's wall time is kept in every checkpoint (the callback's
    state), so a resumed run's history and record count the time of every segment.
    """

    def __init__(self, run_dir: Path, global_batch: int) -> None:
        self.path = Path(run_dir) / HISTORY_FILE
        self.global_batch = global_batch
        self.started = time.time()
        self.wall_before = 0.0  # wall time of the segments before this one (from the checkpoint)

    def wall_time(self) -> float:
        """Seconds of training so far, over every segment of a resumed run."""
        return self.wall_before + time.time() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"wall_time_s": self.wall_time()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied when training starts: testing a checkpoint restores callback states too
        self._restored_wall_time = float(state_dict.get("wall_time_s", 0.0))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resumed fit continues the clock of the checkpoint (even when nothing is left
        to train: a run killed during its test resumes at its end)."""
        if (restored := getattr(self, "_restored_wall_time", None)) is not None:
            self.wall_before, self.started, self._restored_wall_time = restored, time.time(), None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_fit_start(trainer, pl_module)  # strategies that restore after setup restore here
        # After a resume has restored the loops: current_epoch is the epoch trained next.
        # A run resumed mid-epoch gets no on_train_epoch_start for that epoch: start the clock here.
        self.on_train_epoch_start(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        kept = [row for row in read_history(self.path.parent) if row["epoch"] < trainer.current_epoch]
        if kept and not self.wall_before:  # a checkpoint of an older capsnet: no wall time in it
            self.wall_before = kept[-1]["wall_time_s"]
        self._rewrite(kept)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_started, self.step_at_start = time.time(), trainer.global_step
        self.train_seconds: float | None = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(self, "train_seconds", 0.0) is None:  # the epoch's first validation
            self.train_seconds = time.time() - self.epoch_started

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        now = time.time()
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        row: dict[str, float] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for name, value in metrics.items():
            stage, _, metric = name.partition("/")
            if stage in ("train", "val") and not metric.endswith("_step") and metric != "examples":
                row[f"{stage}_{metric.removesuffix('_epoch')}"] = value
        train_seconds = self.train_seconds if self.train_seconds is not None else now - self.epoch_started
        steps = trainer.global_step - self.step_at_start
        row["lr"] = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan
        row["train_images_per_s"] = steps * self.global_batch / train_seconds if train_seconds > 0 else math.nan
        row["epoch_time_s"] = now - self.epoch_started
        row["wall_time_s"] = self.wall_before + now - self.started
        self._rewrite([*read_history(self.path.parent), row])
        # The loggers (W&B's panels among them) get the series the others do not log themselves,
        # at the step Lightning logs the epoch's own values (the last step's index), so a resume
        # from this epoch's end keeps them exactly once.
        extra = {f"epoch/{k}": row[k] for k in ("lr", "train_images_per_s", "epoch_time_s") if not math.isnan(row[k])}
        for logger in trainer.loggers:
            logger.log_metrics(extra, step=max(trainer.global_step - 1, 0))

    def _rewrite(self, rows: list[dict[str, float]]) -> None:
        """Write all rows at once, atomically: a kill never leaves half a file."""
        middle = sorted({k for row in rows for k in row} - set(FIRST_COLUMNS) - set(LAST_COLUMNS))
        columns = FIRST_COLUMNS + middle + LAST_COLUMNS
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _format(row.get(k, math.nan)) for k in columns})
        atomic_write_text(self.path, text.getvalue())


def _format(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}" if isinstance(value, float) else str(value)
