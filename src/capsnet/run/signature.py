"""A run's signature: every setting that decides its result, as flat ``dotted.key: value`` pairs.

The run dir name leaves out settings that only say *where* or *how fast* a job runs
(``trainer=ddp``, ``trainer.devices``, ``logger``), so two commands can meet in one dir.
The signature is what must match for one to continue the other's run, and what the
results table groups runs by (every key but the seed), so a cell never mixes two
configurations.  It is stored with every checkpoint and in metrics.json.
"""

from __future__ import annotations

from typing import Any

# Settings that change neither the numbers a run produces nor which batch a step sees: the
# one list that keeps them out of both the signature and the run dir's name (a key and
# everything under it: "logger" covers logger.wandb.offline).
NOT_RESULT_KEYS = (
    "paths",
    "logger",
    "callbacks",
    "tags",
    "figures",
    "resume",
    "nan_check_every",
    "experiment_name",
    "checkpoint",
    "deterministic",
    "perf.compile",
    "perf.channels_last",
    "hydra",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.strategy",
    "trainer.num_nodes",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.num_sanity_val_steps",
    "trainer.use_distributed_sampler",
    "trainer.deterministic",
    "trainer.plugins",
    "data.eval_batch_size",
    "redundant",
)
# Group choices on the command line that say where or how a job runs, not what it computes
# (their values are in the signature key by key): out of the run dir's name only.
PLACEMENT_GROUPS = ("trainer", "experiment", "hparams_search")
# How long to train: a resume may extend a run (more epochs or steps) and stay the same run.
SCHEDULE_LENGTH_KEYS = ("trainer.max_epochs", "trainer.max_steps", "trainer.max_time")
# Not part of a table cell's configuration: seeds are what a cell averages over, and the
# world size only changes the order of floating-point sums (the global batch is fixed).
NOT_CONFIGURATION_KEYS = ("seed", "world_size")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def _dropped(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def override_key(override: str) -> str:
    """The key of a command-line override: ``+callbacks.x._target_=a.B`` -> ``callbacks.x._target_``."""
    return override.split("=", 1)[0].lstrip("+~")


def decides_result(key: str) -> bool:
    """Whether a command-line override of ``key`` can change what a run computes."""
    return key not in PLACEMENT_GROUPS and not _dropped(key, NOT_RESULT_KEYS)


def run_signature(resolved: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The result-deciding settings of a resolved config, plus the data-parallel world size."""
    flat = {k: v for k, v in _flatten(resolved).items() if not _dropped(k, NOT_RESULT_KEYS)}
    flat["world_size"] = int(world_size)
    return dict(sorted(flat.items()))


def differences(stored: dict[str, Any], current: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: stored -> current`` for every key whose value differs (ignoring ``ignore``)."""
    keys = sorted((set(stored) | set(current)) - set(ignore))
    missing = "<absent>"
    return [
        f"{key}: {stored.get(key, missing)!r} -> {current.get(key, missing)!r}"
        for key in keys
        if stored.get(key, missing) != current.get(key, missing)
    ]


def configuration(signature: dict[str, Any]) -> dict[str, Any]:
    """What a results-table cell holds fixed: the signature without seed and world size."""
    return {k: v for k, v in signature.items() if k not in NOT_CONFIGURATION_KEYS}


class ResumeMismatchError(ValueError):
    """The run dir holds a run of another configuration; the message says the two ways out."""

    def __init__(self, run_dir: str, what: str, changes: list[str]) -> None:
        listed = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
        keys = ", ".join(change.split(":")[0] for change in changes[:8])
        super().__init__(
            f"{run_dir} holds {what} of another configuration ({listed}). It cannot continue with "
            f"different {keys}: either start this configuration afresh there with resume=false "
            f"(its checkpoints and metrics.json are replaced), or run with the original value(s) "
            f"to continue it."
        )
        self.changes = changes
