"""metrics.json: the one record of a run that the table builder and resumption read."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from capsnet.run.rundir import atomic_write_json, atomic_write_text, read_json

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
    return atomic_write_text(run_dir / RESOLVED_CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(resolved_config(cfg))))


def _clean(value: Any) -> Any:
    """JSON-safe: tensors to floats, NaN/inf to None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(run_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` atomically (a crash or a full disk never leaves half a file)."""
    return atomic_write_json(Path(run_dir) / METRICS_FILE, {k: _clean(v) for k, v in record.items()})


RECORD_WAY_OUT = (
    "Move it aside (e.g. to metrics.damaged.json) and run the same command again: the run resumes from "
    "checkpoints/last.ckpt (a finished one only tests again) and writes a new record"
)


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The run's record, or None when there is none; a damaged one raises
    :class:`~capsnet.run.rundir.DamagedFileError` naming the file and the way out."""
    return read_json(Path(run_dir) / METRICS_FILE, RECORD_WAY_OUT)


def routing_identity(model: dict[str, Any]) -> dict[str, Any]:
    """``routing`` (the router's name), ``routing_iters`` and ``recon`` of a model config (as
    training resolves it, or as a checkpoint keeps it); None where they do not apply (a CNN;
    a model with its own routing, e.g. efficient_capsnet)."""
    router = model.get("router")
    if isinstance(router, dict) and router.get("_target_"):
        from hydra.utils import get_class

        router_class = get_class(router["_target_"])
        return {
            "routing": getattr(router_class, "name", "") or router_class.__name__,
            "routing_iters": router.get("iters"),
            "recon": model.get("reconstruction"),
        }
    if "routing_iterations" in model:  # checkpoints written before routing was a plug-in
        return {
            "routing": "dynamic",
            "routing_iters": model["routing_iterations"],
            "recon": model.get("reconstruction"),
        }
    return {"routing": None, "routing_iters": None, "recon": model.get("reconstruction")}
