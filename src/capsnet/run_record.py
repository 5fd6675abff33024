"""metrics.json: the one record of a run that the table builder and resumption read."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

METRICS_FILE = "metrics.json"
RESOLVED_CONFIG_FILE = "config_resolved.yaml"


def git_commit() -> str | None:
    """The commit of the code being run, or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's config with every ${...} resolved, without Hydra's own node (present
    only when a config is composed outside @hydra.main, as in tests)."""
    own_keys = [key for key in cfg if key != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, own_keys), resolve=True)  # type: ignore[return-value]


def save_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    """Hydra's .hydra/config.yaml keeps the ${...}; this copy has the values."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RESOLVED_CONFIG_FILE
    OmegaConf.save(OmegaConf.create(resolved_config(cfg)), path)
    return path


def _clean(value: Any) -> Any:
    """JSON-safe: tensors to floats, NaN/inf to None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(run_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` atomically (a crash never leaves half a file)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / METRICS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({k: _clean(v) for k, v in record.items()}, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run's record, or None when there is none (or it is unreadable)."""
    path = run_dir / METRICS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
