"""Validation of a composed config, before any data is read or any run dir is filled.

Hydra already rejects unknown group options (``profile=nope``) and misspelt keys at
compose time; this adds the value checks it cannot express, each naming the key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hydra.utils import get_class, get_method
from omegaconf import DictConfig, OmegaConf

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MATMUL_PRECISIONS = ("highest", "high", "medium")


class ConfigError(ValueError):
    """An invalid config value; the message names the key and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"invalid config value {key}={value!r}: {allowed}")
        self.key = key


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(cfg: DictConfig, key: str, *, optional: bool = False, minimum: int = 1) -> None:
    value = _select(cfg, key)
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        extra = " or null" if optional else ""
        raise ConfigError(key, value, f"must be an integer >= {minimum}{extra}")


def _select(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _check_target(cfg: DictConfig, group: str, *, callable_ok: bool) -> None:
    """``<group>._target_`` must name an importable class (models may also name a factory),
    and ``<group>.name`` a label for records and the table."""
    node = cfg[group]
    name = node.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{group}.name", name, "must be a non-empty label (records and the table use it)")
    target = node.get("_target_")
    try:
        if not isinstance(target, str):
            raise TypeError("not a string")
        get_method(target) if callable_ok else get_class(target)
    except Exception as error:  # ImportError, AttributeError, ValueError: all one message to a user
        raise ConfigError(
            f"{group}._target_",
            target,
            f"must be the import path of a {'class or function' if callable_ok else 'class'} "
            f"({error}); see conf/{group}/ for examples",
        ) from error


# Activations kept for the backward pass grow linearly with routing iterations: measured
# 59 MB per iteration at batch 128 for the largest paper model (40×40 affNIST, 4,608 primary
# capsules; 15 MB on 28×28 MNIST).  100 iterations (≈ 5.9 GB) fit a 16 GB GPU (V100, T4)
# beside the rest; the paper uses 1 and 3, its appendix sees the logits settle by about 5.
MAX_ROUTING_ITERS = 100
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range
PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-true", "bf16-mixed", "16-mixed", "16", "bf16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# The keys each of capsnet's own nodes may hold (a `+key=value` that no code reads would be
# silently ignored: refused instead, naming the allowed ones).
KNOWN_KEYS = {
    "optim": {"lr", "decay_rate", "decay_steps", "optimizer", "schedule"},
    "loss": {"m_pos", "m_neg", "lam", "recon_weight", "official_scaling", "mask_with_label_at_test"},
    "perf": {"channels_last", "compile", "matmul_precision"},
    "checkpoint": {"every_n_steps"},
    "paths": {"root_dir", "data_dir", "output_dir"},
}
ROOT_KEYS = {
    "routing", "recon", "seed", "experiment_name", "tags", "ckpt_path", "profile_name", "resume", "deterministic",
    "paths", "optim", "loss", "perf", "checkpoint", "figures", "nan_check_every", "model", "data", "trainer",
    "logger", "callbacks", "hydra", "redundant",
}  # fmt: skip
DATA_RECORD_KEYS = {"_target_", "name", "lr_decay_steps"}
MODEL_RECORD_KEYS = {"_target_", "name", "objective"}
PARTIAL_KEYS = {"_target_", "_partial_"}


def _number(
    cfg: DictConfig,
    key: str,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    allowed: str,
) -> float:
    """A finite real number in [low, high] (open ends where asked), else ConfigError."""
    value = _select(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ConfigError(key, value, allowed)
    return float(value)


def _boolean(cfg: DictConfig, key: str) -> None:
    if not isinstance(_select(cfg, key), bool):
        raise ConfigError(key, _select(cfg, key), "must be a boolean: true or false")


def _known_keys(cfg: DictConfig, node: str, allowed: set[str]) -> None:
    present = set(cfg[node].keys()) if node else set(cfg.keys())
    unknown = sorted(present - allowed)
    if unknown:
        where = f"{node}.{unknown[0]}" if node else unknown[0]
        raise ConfigError(
            where,
            _select(cfg, where) if OmegaConf.select(cfg, where, throw_on_missing=False) is not None else None,
            f"no such setting: nothing reads it, so it would be silently ignored. "
            f"{node or 'The root'} takes {', '.join(sorted(allowed))}",
        )


def _accepted_keywords(target: str) -> set[str] | None:
    """The keyword arguments a class (through ``**kwargs`` passed up to its bases) or a
    function takes; None when that cannot be known (``**kwargs`` that go elsewhere)."""
    import inspect

    fn = get_method(target)
    chain = [c.__init__ for c in inspect.getmro(fn) if "__init__" in vars(c)] if inspect.isclass(fn) else [fn]
    accepted: set[str] = set()
    for init in chain:
        parameters = inspect.signature(init).parameters.values()
        accepted |= {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return accepted
        if init is object.__init__:
            break
    return None


def _class_keys(cfg: DictConfig, group: str, record_keys: set[str], given: set[str]) -> None:
    """Every key of a ``_target_`` node must be an argument of its class (or a record key)."""
    node = OmegaConf.select(cfg, group)
    target = node.get("_target_")
    try:
        accepted = _accepted_keywords(str(target))
    except Exception as error:  # not importable: one message naming the key
        raise ConfigError(
            f"{group}._target_", target, f"must be the import path of a class or function ({error})"
        ) from error
    if accepted is None:
        return
    unknown = sorted(set(node.keys()) - record_keys - accepted - given)
    if unknown:
        raise ConfigError(
            f"{group}.{unknown[0]}",
            node[unknown[0]],
            f"{target} takes no such argument; it takes {', '.join(sorted(accepted - given))}",
        )


def _trainer(cfg: DictConfig) -> None:
    """The Trainer arguments that decide whether and how long anything trains."""
    import inspect

    import lightning as L

    accepted = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(cfg.trainer.keys()) - accepted)
    if unknown:
        raise ConfigError(f"trainer.{unknown[0]}", cfg.trainer[unknown[0]], "lightning.Trainer takes no such argument")
    epochs, steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps", -1)
    for key, value in (("trainer.max_epochs", epochs), ("trainer.max_steps", steps)):
        if value is not None and (not _is_int(value) or not (value == -1 or value >= 1)):
            raise ConfigError(key, value, "must be an integer >= 1, or -1 for no limit (0 would train nothing)")
    if epochs in (-1, None) and steps == -1 and cfg.trainer.get("max_time") is None:
        raise ConfigError("trainer.max_epochs", epochs, "and trainer.max_steps=-1 would train forever: set one of them")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = cfg.trainer.get(key)
        if value is None:
            continue
        ok = (_is_int(value) and value >= 0) or (isinstance(value, float) and 0.0 <= value <= 1.0)
        if key == "limit_train_batches":
            ok = ok and value != 0
        if not ok:
            floor = 1 if key == "limit_train_batches" else 0
            raise ConfigError(
                f"trainer.{key}", value, f"must be null, an integer >= {floor} (batches) or a fraction in (0, 1]"
            )
    if str(cfg.trainer.precision) in ("16-true", "16", "half"):
        raise ConfigError(
            "trainer.precision",
            cfg.trainer.precision,
            "pure float16 training diverges at the first Adam step (its eps=1e-8 is 0 in float16, so "
            "unchanged weights divide 0 by 0); use 16-mixed (float16 autocast with loss scaling) or bf16-true",
        )
    if str(cfg.trainer.precision) not in PRECISIONS:
        raise ConfigError("trainer.precision", cfg.trainer.precision, f"must be one of {', '.join(PRECISIONS)}")
    if str(cfg.trainer.get("accelerator", "auto")) not in ACCELERATORS:
        raise ConfigError("trainer.accelerator", cfg.trainer.accelerator, f"must be one of {', '.join(ACCELERATORS)}")
    for key in ("log_every_n_steps",):
        if key in cfg.trainer:
            _positive_int(cfg, f"trainer.{key}")


def _check_iters(cfg: DictConfig) -> None:
    _positive_int(cfg, "routing.iters")
    if cfg.routing.iters > MAX_ROUTING_ITERS:
        raise ConfigError(
            "routing.iters",
            cfg.routing.iters,
            f"must be at most {MAX_ROUTING_ITERS}: the backward pass keeps every iteration's activations "
            f"(59 MB per iteration at batch 128 on the 40×40 model), and {MAX_ROUTING_ITERS} iterations already "
            f"take about 6 GB of a 16 GB GPU (the paper uses 1 and 3)",
        )


def _no_missing_values(cfg: DictConfig, skip: tuple[str, ...] = ("hydra",)) -> None:
    """A mandatory value (``???`` in a config, e.g. ``data.root``) must be given.  The
    ``skip`` subtrees are never walked: walking resolves their interpolations, and Hydra's
    job logging names ``hydra.runtime.output_dir``, unset in a config composed by the
    compose API (as the tests compose theirs) until a job runs."""
    missing = sorted(
        name
        for key in cfg
        if key not in skip
        for name in (
            [str(key)]
            if OmegaConf.is_missing(cfg, key)
            else OmegaConf.missing_keys(cfg[key])
            if OmegaConf.is_config(cfg[key])
            else []
        )
    )
    if missing:
        raise ConfigError(missing[0], "???", "is mandatory: give it on the command line, e.g. " + f"{missing[0]}=...")


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first invalid value in ``cfg``, before any work."""
    _no_missing_values(cfg)
    _known_keys(cfg, "", ROOT_KEYS)
    for node, allowed in KNOWN_KEYS.items():
        _known_keys(cfg, node, allowed)
    if "iters" in cfg.routing:
        _check_iters(cfg)

    _class_keys(cfg, "routing", PARTIAL_KEYS, given={"in_caps", "out_caps", "in_dim", "out_dim"})
    _class_keys(cfg, "optim.optimizer", PARTIAL_KEYS, given={"params"})
    _class_keys(cfg, "optim.schedule", PARTIAL_KEYS, given={"optimizer"})
    if "leaky" in cfg.routing:
        _boolean(cfg, "routing.leaky")
    if not isinstance(cfg.recon, bool):
        raise ConfigError("recon", cfg.recon, "must be a boolean: true or false")
    name = cfg.get("experiment_name")
    if not isinstance(name, str) or not name.strip() or "/" in name or name in (".", ".."):
        raise ConfigError("experiment_name", name, "must be a non-empty name without '/' (it names a folder)")
    _check_target(cfg, "model", callable_ok=True)
    _check_target(cfg, "data", callable_ok=False)
    _class_keys(cfg, "model", MODEL_RECORD_KEYS, given={"input_size", "in_channels", "num_classes", "task"})
    _class_keys(cfg, "data", DATA_RECORD_KEYS, given={"data_dir", "seed"})
    if not isinstance(cfg.profile_name, str) or not cfg.profile_name:
        raise ConfigError("profile_name", cfg.profile_name, "must name the profile (each conf/profile/*.yaml sets it)")
    for key in (
        "data.batch_size",
        "data.eval_batch_size",
        "data.val_size",
        "optim.decay_steps",
        "checkpoint.every_n_steps",
        "nan_check_every",
    ):
        _positive_int(cfg, key)
    for key in ("train_subset", "val_subset", "test_subset", "overfit_batches"):
        if key in cfg.data:
            _positive_int(cfg, f"data.{key}", optional=True)
    if "max_shift" in cfg.data:
        _positive_int(cfg, "data.max_shift", minimum=0)
    _positive_int(cfg, "seed", minimum=0)
    if cfg.seed > MAX_SEED:
        raise ConfigError("seed", cfg.seed, f"must be at most {MAX_SEED} (the random generators' range)")
    _positive_int(cfg, "data.lr_decay_steps")
    tags = cfg.get("tags")
    if not OmegaConf.is_list(tags) or not all(isinstance(t, str) and t for t in tags):
        raise ConfigError("tags", tags, "must be a list of non-empty strings, e.g. tags=[baseline,lr_study]")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not Path(str(ckpt_path)).is_file():
        raise ConfigError("ckpt_path", ckpt_path, "no such file: give a capsnet .ckpt to start from (or null)")
    _number(cfg, "optim.lr", low=0, low_open=True, allowed="must be a finite positive number, e.g. 0.001")
    if "lr" in cfg.optim.optimizer:
        _number(cfg, "optim.optimizer.lr", low=0, low_open=True, allowed="must be a finite positive number")
    _number(cfg, "optim.decay_rate", low=0, high=1, low_open=True, allowed="must be a number in (0, 1]")
    m_neg = _number(cfg, "loss.m_neg", low=0, high=1, allowed="must be a number in [0, 1), below loss.m_pos")
    m_pos = _number(cfg, "loss.m_pos", low=0, high=1, allowed="must be a number in (0, 1], above loss.m_neg")
    if not m_neg < m_pos:
        raise ConfigError("loss.m_neg", m_neg, f"must be below loss.m_pos={m_pos} (0 <= m_neg < m_pos <= 1; Eq. 4)")
    _number(cfg, "loss.lam", low=0, allowed="must be a finite number >= 0 (Eq. 4's down-weighting, 0.5)")
    _number(cfg, "loss.recon_weight", low=0, allowed="must be a finite number >= 0 (§4.1: 0.0005)")
    for key in (
        "resume",
        "deterministic",
        "figures",
        "perf.channels_last",
        "loss.official_scaling",
        "loss.mask_with_label_at_test",
    ):
        _boolean(cfg, key)
    _trainer(cfg)
    compile_mode = cfg.perf.compile
    if not isinstance(compile_mode, bool) and compile_mode not in COMPILE_MODES:
        raise ConfigError("perf.compile", compile_mode, f"must be true, false or one of {', '.join(COMPILE_MODES)}")
    matmul = cfg.perf.matmul_precision
    if matmul is not None and matmul not in MATMUL_PRECISIONS:
        raise ConfigError("perf.matmul_precision", matmul, f"must be null or one of {', '.join(MATMUL_PRECISIONS)}")


def check_data_sizes(cfg: DictConfig, datamodule: Any) -> None:
    """Splits that leave training data and a global batch that fits it, checked against the
    dataset's real size (read once; the DataModule keeps it for training)."""
    total = datamodule.num_training_examples()
    val_size = int(cfg.data.val_size)
    if val_size >= total:
        raise ConfigError(
            "data.val_size", val_size, f"must leave training data: the training set has {total:,} examples"
        )
    train, batch, subset = total - val_size, int(cfg.data.batch_size), cfg.data.get("train_subset")
    if batch > train:  # no subset can help: the batch is the value to change
        raise ConfigError(
            "data.batch_size",
            batch,
            f"is larger than the training set ({train:,} examples after the validation split): "
            f"no full global batch could be drawn",
        )
    if subset is not None and int(subset) < batch:
        raise ConfigError("data.train_subset", subset, f"must hold at least one global batch (data.batch_size={batch})")


EVAL_ROOT_KEYS = {"ckpt_path", "seed", "experiment_name", "paths", "deterministic", "figures", "ensemble",
                  "data", "trainer", "logger", "hydra"}  # fmt: skip


def validate_eval_config(cfg: DictConfig) -> None:
    """``src/eval.py``'s config, checked like a training run's before any work."""
    _no_missing_values(cfg)
    _known_keys(cfg, "", EVAL_ROOT_KEYS)
    spec = cfg.get("ckpt_path")
    items = [spec] if isinstance(spec, str) else list(spec) if OmegaConf.is_list(spec) else None
    if not items or not all(isinstance(item, str) and item for item in items):
        raise ConfigError("ckpt_path", spec, "must be a checkpoint path, a glob pattern or a list of them")
    _check_target(cfg, "data", callable_ok=False)
    _class_keys(cfg, "data", DATA_RECORD_KEYS, given={"data_dir", "seed"})
    for key in ("data.batch_size", "data.eval_batch_size", "data.val_size"):
        _positive_int(cfg, key)
    for key in ("train_subset", "val_subset", "test_subset"):
        if key in cfg.data:
            _positive_int(cfg, f"data.{key}", optional=True)
    _positive_int(cfg, "seed", minimum=0)
    if cfg.seed > MAX_SEED:
        raise ConfigError("seed", cfg.seed, f"must be at most {MAX_SEED} (the random generators' range)")
    for key in ("figures", "deterministic"):
        _boolean(cfg, key)
    if str(cfg.trainer.precision) not in PRECISIONS:
        raise ConfigError("trainer.precision", cfg.trainer.precision, f"must be one of {', '.join(PRECISIONS)}")
    if str(cfg.trainer.get("accelerator", "auto")) not in ACCELERATORS:
        raise ConfigError("trainer.accelerator", cfg.trainer.accelerator, f"must be one of {', '.join(ACCELERATORS)}")
