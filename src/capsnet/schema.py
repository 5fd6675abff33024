"""Validation of a composed config, before any data is read or any run dir is filled.

Hydra already rejects unknown group options (``profile=nope``) and misspelt keys at
compose time; this adds the value checks it cannot express, each naming the key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from hydra.utils import get_class, get_method
from omegaconf import DictConfig, OmegaConf

PROFILES = ("smoke", "demo", "fast", "paper")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MATMUL_PRECISIONS = ("highest", "high", "medium")
MAX_RUN_NAME = 200  # file systems allow 255 bytes per path component


def run_name(override_dirname: str) -> str:
    """A run's dir name: its command-line overrides, or ``defaults`` when there are none, so
    the plain command's run never lands in the parent dir of every other run.  A ``/`` in a
    value (``ckpt_path=outputs/.../best.ckpt``) becomes ``_`` and quotes are dropped: one
    run, one dir level.  A
    name too long for a file system (an Optuna trial's many float overrides) keeps its
    first 120 characters and a hash of the whole, so it stays a pure function of the command."""
    name = override_dirname.replace("/", "_").replace("'", "").replace('"', "") or "defaults"
    if len(name) > MAX_RUN_NAME:
        name = f"{name[:120]}...{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


def sqlite_beside(folder: str, filename: str) -> str:
    """An SQLite URL for ``folder/filename``, creating the folder: Optuna opens its study
    storage before Hydra makes the sweep dir."""
    path = Path(folder).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / filename}"


NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere (A100, RTX 30xx) and later: bf16 tensor cores


def fast_precision(accelerator: str) -> str:
    """The ``fast`` profile's precision: bf16-mixed where the job runs on a CUDA GPU with
    native bf16, compute capability >= 8.0 (same accuracy as float32 at equal steps,
    measured on two seeds: see README), float32 everywhere else.  ``is_bf16_supported()``
    is no test: it is true on a V100 or T4 too, which only emulate bf16, far slower than
    float32.  Never decided by a CPU, whose bf16 speed varies by model."""
    import torch

    if accelerator == "cpu" or not torch.cuda.is_available():
        return "32-true"
    native = tuple(torch.cuda.get_device_capability()) >= NATIVE_BF16_CAPABILITY
    return "bf16-mixed" if native else "32-true"


def trials_per_batch(launcher: str, jobs_per_gpu: int, declared_gpus: int | None = None) -> int:
    """``hparams_search``'s trials launched together (``hydra.sweeper.n_jobs``): what the
    launcher runs at once.  ``hydra/launcher=ray_gpus``: every GPU (Ray's declared
    ``num_gpus`` when given, else those torch sees on this machine) times ``jobs_per_gpu``;
    any other launcher (the basic one runs jobs one after another): 1."""
    if not str(launcher).endswith("RayGpuLauncher"):
        return 1
    if declared_gpus is None:
        import torch

        declared_gpus = torch.cuda.device_count()
    return max(1, int(declared_gpus)) * int(jobs_per_gpu)


OmegaConf.register_new_resolver("capsnet.run_name", run_name, replace=True)
OmegaConf.register_new_resolver("capsnet.trials_per_batch", trials_per_batch, replace=True)
OmegaConf.register_new_resolver("capsnet.fast_precision", fast_precision, replace=True)
OmegaConf.register_new_resolver("capsnet.sqlite_beside", sqlite_beside, replace=True)


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


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first invalid value in ``cfg``."""
    _positive_int(cfg, "routing.iters")
    if not isinstance(cfg.recon, bool):
        raise ConfigError("recon", cfg.recon, "must be a boolean: true or false")
    _check_target(cfg, "model", callable_ok=True)
    _check_target(cfg, "data", callable_ok=False)
    if cfg.profile_name not in PROFILES:
        raise ConfigError("profile_name", cfg.profile_name, f"must be one of {', '.join(PROFILES)}")
    for key in (
        "data.batch_size",
        "data.eval_batch_size",
        "data.val_size",
        "optim.decay_steps",
        "checkpoint.every_n_steps",
        "nan_check_every",
    ):
        _positive_int(cfg, key)
    for key in ("data.train_subset", "data.val_subset", "data.test_subset", "data.overfit_batches"):
        _positive_int(cfg, key, optional=True)
    _positive_int(cfg, "seed", minimum=0)
    _positive_int(cfg, "data.lr_decay_steps")
    tags = cfg.get("tags")
    if not OmegaConf.is_list(tags) or not all(isinstance(t, str) and t for t in tags):
        raise ConfigError("tags", tags, "must be a list of non-empty strings, e.g. tags=[baseline,lr_study]")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not Path(str(ckpt_path)).is_file():
        raise ConfigError("ckpt_path", ckpt_path, "no such file: give a capsnet .ckpt to start from (or null)")
    lr = cfg.optim.lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError("optim.lr", lr, "must be a positive number, e.g. 0.001")
    rate = cfg.optim.decay_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ConfigError("optim.decay_rate", rate, "must be a number in (0, 1]")
    for key in (
        "resume",
        "deterministic",
        "figures",
        "perf.channels_last",
        "loss.official_scaling",
        "loss.mask_with_label_at_test",
    ):
        if not isinstance(_select(cfg, key), bool):
            raise ConfigError(key, _select(cfg, key), "must be a boolean: true or false")
    if str(cfg.trainer.precision) in ("16-true", "16", "half"):
        raise ConfigError(
            "trainer.precision",
            cfg.trainer.precision,
            "pure float16 training diverges at the first Adam step (its eps=1e-8 is 0 in float16, so "
            "unchanged weights divide 0 by 0); use 16-mixed (float16 autocast with loss scaling) or bf16-true",
        )
    compile_mode = cfg.perf.compile
    if not isinstance(compile_mode, bool) and compile_mode not in COMPILE_MODES:
        raise ConfigError("perf.compile", compile_mode, f"must be true, false or one of {', '.join(COMPILE_MODES)}")
    matmul = cfg.perf.matmul_precision
    if matmul is not None and matmul not in MATMUL_PRECISIONS:
        raise ConfigError("perf.matmul_precision", matmul, f"must be null or one of {', '.join(MATMUL_PRECISIONS)}")
    subset = cfg.data.train_subset
    if subset is not None and subset < cfg.data.batch_size:
        raise ConfigError(
            "data.train_subset", subset, f"must hold at least one global batch (data.batch_size={cfg.data.batch_size})"
        )
