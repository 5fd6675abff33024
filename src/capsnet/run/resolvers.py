"""Config resolvers (``${capsnet.<name>:...}``), registered by :func:`register` where a
config is composed: the entry points (src/train.py, src/eval.py) and the tests.

Only pure functions of their arguments (and of the GPU, for ``fast_precision``): a run's
dir name, an SQLite URL beside a folder, the fast profile's precision, Optuna's batch size.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from capsnet.run.signature import decides_result, override_key

MAX_RUN_NAME = 200  # file systems allow 255 bytes per path component


def run_name(overrides: Any) -> str:
    """A run's dir name: its command-line overrides that decide the result (see
    capsnet.run.signature.NOT_RESULT_KEYS: the one list that keeps settings out of both the
    dir name and the signature), sorted, ``k=v`` joined by ``,``; ``defaults`` when none
    is left, so the plain command's run never lands in the parent dir of every other run.
    A ``/`` in a value (``ckpt_path=outputs/.../best.ckpt``) becomes ``_`` and quotes are
    dropped: one run, one dir level.  A name too long for a file system (an Optuna trial's
    many float overrides) keeps its first 120 characters and a hash of the whole, so it
    stays a pure function of the command.

    ``overrides``: Hydra's ``hydra.overrides.task`` (a list), or an already joined string."""
    if isinstance(overrides, str):
        name = overrides
    else:
        kept = sorted(str(o) for o in overrides if decides_result(override_key(str(o))))
        name = ",".join(o.lstrip("+~") for o in kept)
    name = name.replace("/", "_").replace("'", "").replace('"', "") or "defaults"
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


RESOLVERS = {
    "capsnet.run_name": run_name,
    "capsnet.trials_per_batch": trials_per_batch,
    "capsnet.fast_precision": fast_precision,
    "capsnet.sqlite_beside": sqlite_beside,
}


def register() -> None:
    """Make the resolvers known to OmegaConf (idempotent)."""
    for name, function in RESOLVERS.items():
        OmegaConf.register_new_resolver(name, function, replace=True)
