"""A sweep survives its jobs: each job's outcome is recorded, and the driver sums them up.

Every job of a sweep (``-m``, or an experiment that sweeps by itself) writes
``<sweep dir>/jobs/<job num>.json``: ``{"job", "overrides", "run_dir", "status",
"reason"}`` with status ``completed``, ``skipped``, ``refused`` (bad config, missing data,
another configuration's run dir, a busy or damaged run dir: nothing was trained),
``failed`` (an exception or a non-finite loss during training) or ``interrupted`` (a
signal).  Launchers write ``lost`` for a job whose process died (Ray, SLURM).  When the
sweep ends, :class:`SweepSummary` (a Hydra callback) prints one line per outcome with the
reasons and makes the driver exit non-zero if any job did not complete, so a sweep that
lost jobs never looks like a success.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from capsnet.run.rundir import atomic_write_json

log = logging.getLogger(__name__)

JOBS_DIR = "jobs"
DONE = ("completed", "skipped")


def in_sweep() -> bool:
    return HydraConfig.initialized() and getattr(HydraConfig.get().mode, "name", None) == "MULTIRUN"


def runs_in_driver() -> bool:
    """Whether this sweep job runs inside the driver's own process (Hydra's basic launcher),
    where a stop signal must end the whole sweep, not just the job."""
    target = str(OmegaConf.select(HydraConfig.get(), "launcher._target_", default=""))
    return target.endswith("BasicLauncher")


def record_job_outcome(status: str, reason: str | None, run_dir: str | Path | None) -> Path | None:
    """``<sweep dir>/jobs/<num>.json`` for this sweep job (nothing outside a sweep)."""
    if not in_sweep():
        return None
    hydra = HydraConfig.get()
    sweep_dir = Path(hydra.sweep.dir).resolve()
    record = {
        "job": int(hydra.job.num),
        "overrides": list(hydra.overrides.task),
        "run_dir": str(run_dir) if run_dir is not None else None,
        "status": status,
        "reason": reason,
        "time": time.time(),
    }
    try:
        return atomic_write_json(sweep_dir / JOBS_DIR / f"{hydra.job.num}.json", record)
    except OSError as error:  # a full or read-only disk must not turn one job's outcome into a crash
        log.error("could not record job %s's outcome (%s): %s", hydra.job.num, status, error)
        return None


def read_outcomes(sweep_dir: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """The job outcomes written at or after ``since`` (this invocation's), by job number."""
    outcomes = []
    for path in sorted((sweep_dir / JOBS_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            outcomes.append({"job": path.stem, "status": "unreadable", "reason": f"{path} is not valid JSON"})
            continue
        if float(record.get("time", path.stat().st_mtime)) >= since:
            outcomes.append(record)
    return sorted(outcomes, key=lambda r: int(r["job"]) if str(r.get("job")).isdigit() else -1)


def summary_lines(outcomes: list[dict[str, Any]]) -> list[str]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome["status"]] = counts.get(outcome["status"], 0) + 1
    lines = ["sweep summary: " + (", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no job ran")]
    for outcome in outcomes:
        if outcome["status"] not in DONE:
            overrides = ",".join(outcome.get("overrides") or [])
            lines.append(f"  job {outcome['job']} ({overrides}) {outcome['status']}: {outcome.get('reason')}")
    return lines


class SweepSummary(Callback):
    """Hydra callback: at the end of a sweep, print each job's outcome; exit 2 if every job
    was refused before any work (as a refused single run does), else 1 if any job did not
    complete (or was skipped as already completed)."""

    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # file times have a coarse resolution on some file systems

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        outcomes = read_outcomes(sweep_dir, since=self.started)
        lines = summary_lines(outcomes)
        print("\n".join(lines), file=sys.stderr)
        if outcomes and all(o["status"] == "refused" for o in outcomes):
            print(f"every job was refused before any work: see {sweep_dir / JOBS_DIR}/", file=sys.stderr)
            raise SystemExit(2)  # as a single refused run: nothing ran
        if any(o["status"] not in DONE for o in outcomes):
            print(
                f"not every job completed: see {sweep_dir / JOBS_DIR}/; run the same command again to retry them "
                "(completed jobs are skipped, unfinished ones resume)",
                file=sys.stderr,
            )
            raise SystemExit(1)
