"""A Hydra launcher that places sweep jobs on free GPUs through Ray.

Every job of a sweep becomes a Ray task asking for ``1 / jobs_per_gpu`` of a GPU; Ray starts
a task only when such a share is free, assigns it GPU ids and sets ``CUDA_VISIBLE_DEVICES``
for it.  Each job runs in a fresh worker process (``max_calls = 1``, so
``CUDA_VISIBLE_DEVICES`` is read before CUDA starts).  Where Ray sees no GPU at all the
launch is refused, since the tasks would otherwise wait forever.

Ray is started on this machine (``hydra.launcher.ray.init.address: null``) or joined
(``auto``, ``<head ip>:<port>``).  A cluster's worker processes are started by each node's
raylet, not by the driver, so three things the driver has are handed to every job:

* **Environment.**  The driver's variables matching ``forward_env`` (``CAPSNET_*``,
  ``WANDB_*``, ``PYTHONPATH``, ...) travel as the task's ``runtime_env`` ``env_vars`` and are
  set before the worker's Python starts (so ``PYTHONPATH`` also decides where the code is
  imported from).  ``CUDA_VISIBLE_DEVICES`` and ``RAY_*`` never travel: Ray sets them per
  task and per node.  A Ray started here needs none of this: its workers inherit the
  driver's whole environment (and a runtime_env would cost every job's start a second).
* **Sweep dir.**  ``hydra.sweep.dir`` is resolved in the driver, against the driver's
  working dir, and sent to the job as an absolute path, so every run dir lands in the
  driver's sweep dir (never under a node's own working dir).  A job whose node cannot see
  that dir (no shared file system) stops with that message instead of writing elsewhere.
* **Working dir.**  The job runs in the driver's working dir when its node has it (a shared
  file system), so a relative path in the config (``paths.data_dir=data``) means on the
  worker what it means to the driver.

A job that fails as a Ray task (its worker killed or out of memory, its node lost, an
exit of its process) does not take the sweep down: the launcher waits for every task on
its own, records each such job in ``<sweep dir>/jobs/<job num>.json`` with status ``lost``
and the reason, lets the other jobs finish, and hands Hydra a JobReturn for it with status
COMPLETED and return value ``None`` (a FAILED JobReturn makes Hydra's sweeper raise after
the batch, which skips the sweep's end-of-run callbacks; an Optuna sweeper counts the
``None`` as a failed trial).  Ray does not retry a task (``max_retries: 0``) unless
``hydra.launcher.ray.remote.max_retries`` says so: rerunning the sweep resumes each job from
its checkpoint instead.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import logging
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher

log = logging.getLogger(__name__)

# What a job needs from the driver's environment by default (see ray_gpus.yaml).
DEFAULT_FORWARD_ENV = ("CAPSNET_*", "WANDB_*", "PYTHONPATH", "NETRC", "HYDRA_FULL_ERROR")
# Ray sets these per task (the GPU ids) or per node (its own address, temp dir): never copied.
NEVER_FORWARD = ("CUDA_VISIBLE_DEVICES", "RAY_*")
# ray.init arguments that describe a Ray the launcher starts; Ray refuses them when joining.
START_ONLY_INIT_KEYS = (
    "num_cpus",
    "num_gpus",
    "resources",
    "labels",
    "object_store_memory",
    "_system_config",
    "_enable_object_reconstruction",
    "_node_name",
)
# Hydra's Ray launcher's object store size for a Ray started here (too little memory in CI
# otherwise: https://github.com/ray-project/ray/issues/11966).
LOCAL_OBJECT_STORE_BYTES = 78643200


class NoGpuError(RuntimeError):
    """Ray sees no GPU, so no job could ever start."""


class SweepDirNotShared(RuntimeError):
    """The driver's sweep dir does not exist on the node that runs the job."""


class JobExit(RuntimeError):
    """The job ended its process (``sys.exit``) instead of returning."""


def ray_init_args(init: dict[str, Any], environ: dict[str, str] | None = None) -> tuple[dict[str, Any], bool]:
    """``ray.init`` keyword arguments for ``hydra.launcher.ray.init``, and whether they join a
    running cluster.

    ``address: null`` joins ``$RAY_ADDRESS`` when it is set (as ``ray job submit`` does) and
    otherwise starts a private Ray here (``address="local"``): a ``ray start`` cluster that
    happens to run on this machine is never joined by surprise.  Arguments that only describe
    a Ray started here (``num_gpus``, ``object_store_memory``, ...) are refused when joining,
    naming the key; when starting, the object store gets Hydra's default size unless set.
    """
    environ = os.environ if environ is None else environ
    args = {k: v for k, v in init.items() if v is not None}
    address = args.get("address") or environ.get("RAY_ADDRESS") or "local"
    args["address"] = address
    joins = address != "local"
    if joins:
        given = [k for k in START_ONLY_INIT_KEYS if k in args]
        if given:
            raise ValueError(
                f"hydra.launcher.ray.init.{given[0]} describes a Ray started here, but address={address!r} "
                "joins a running cluster, whose resources each node declared with `ray start` "
                "(e.g. ray start --num-gpus=N). Drop "
                + ", ".join(f"hydra.launcher.ray.init.{k}" for k in given)
                + " or start Ray here (hydra.launcher.ray.init.address=null)."
            )
    else:
        args.setdefault("object_store_memory", LOCAL_OBJECT_STORE_BYTES)
    return args, joins


def forwarded_env(patterns: Sequence[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's environment variables whose names match one of ``patterns`` (shell-style,
    case-sensitive), less those Ray sets itself."""
    environ = os.environ if environ is None else environ
    return {
        name: value
        for name, value in sorted(environ.items())
        if any(fnmatch.fnmatchcase(name, p) for p in patterns)
        and not any(fnmatch.fnmatchcase(name, p) for p in NEVER_FORWARD)
    }


def write_json_atomically(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` so that a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(record, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lost_reason(error: BaseException) -> str:
    """A one-paragraph reason for a lost task: the job's own exception where Ray carries one
    (``RayTaskError.cause``), else Ray's error (``WorkerCrashedError: The worker died ...``)."""
    cause = getattr(error, "cause", None)
    shown = cause if isinstance(cause, BaseException) else error
    message = str(shown).strip()
    if len(message) > 2000:
        message = message[:2000] + " ..."
    return f"{type(shown).__name__}: {message}"


def _absolute(cwd: str, path: Any) -> Path:
    """``path`` (absolute, or relative to ``cwd``) as a normalised absolute path."""
    return Path(os.path.abspath(os.path.join(cwd, os.path.expanduser(str(path)))))


def _select_as_job(sweep_config: DictConfig, key: str) -> Any:
    """``key`` of one job's config, resolved as the job would resolve it (``${hydra:...}``
    reads that job's Hydra config), without touching the driver's Hydra config."""
    hydra_config = HydraConfig.instance()
    saved = hydra_config.cfg
    job_config = copy.deepcopy(sweep_config)
    try:
        hydra_config.set_config(job_config)
        return OmegaConf.select(job_config, key)
    finally:
        hydra_config.cfg = saved


def _run_job_in_worker(
    hydra_context: Any,
    sweep_config: DictConfig,
    task_function: Any,
    singleton_state: dict[Any, Any],
    driver_cwd: str,
    driver_host: str,
) -> JobReturn:
    """The Ray task: one Hydra job in the driver's sweep dir and (where shared) working dir."""
    from hydra_plugins.hydra_ray_launcher._launcher_util import _run_job

    sweep_dir = str(sweep_config.hydra.sweep.dir)
    if not os.path.isdir(sweep_dir):
        raise SweepDirNotShared(
            f"the sweep dir {sweep_dir}, made by the driver on {driver_host}, does not exist on "
            f"{socket.gethostname()}: hydra/launcher=ray_gpus writes every run dir into the driver's sweep dir, "
            "which must be on a file system shared by every node of the Ray cluster"
        )
    if os.path.isdir(driver_cwd):
        os.chdir(driver_cwd)
    else:
        print(
            f"ray_gpus: the driver's working dir {driver_cwd} does not exist on {socket.gethostname()}; "
            f"the job runs in {os.getcwd()} (relative paths in its config mean another place here)",
            flush=True,
        )
    try:
        return _run_job(
            hydra_context=hydra_context,
            sweep_config=sweep_config,
            task_function=task_function,
            singleton_state=singleton_state,
        )
    except SystemExit as exit_:
        # Left alone, Ray sees the worker die ("WorkerCrashedError") and says nothing of why.
        raise JobExit(f"the job ended its process with sys.exit({exit_.code!r}) instead of returning") from None


class RayGpuLauncher(RayLauncher):
    """Hydra's Ray launcher with ``jobs_per_gpu`` jobs sharing each GPU.

    Args:
        ray: ``init`` (``ray.init`` arguments) and ``remote`` (``ray.remote`` arguments).
        jobs_per_gpu: jobs that run at once on one GPU (an integer >= 1).
        cpus_per_job: CPU cores Ray reserves for each job.
        forward_env: names (shell patterns) of the driver's environment variables that every
            job gets when the launcher joins a running cluster.
    """

    def __init__(
        self,
        ray: DictConfig,
        jobs_per_gpu: int = 1,
        cpus_per_job: float = 1.0,
        forward_env: Sequence[str] = DEFAULT_FORWARD_ENV,
    ) -> None:
        if isinstance(jobs_per_gpu, bool) or not isinstance(jobs_per_gpu, int) or jobs_per_gpu < 1:
            raise ValueError(f"hydra.launcher.jobs_per_gpu must be an integer >= 1, got {jobs_per_gpu!r}")
        if isinstance(cpus_per_job, bool) or not isinstance(cpus_per_job, (int, float)) or cpus_per_job < 0:
            raise ValueError(f"hydra.launcher.cpus_per_job must be a number >= 0, got {cpus_per_job!r}")
        patterns = list(forward_env) if not isinstance(forward_env, str) else None
        if patterns is None or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"hydra.launcher.forward_env must be a list of variable names, got {forward_env!r}")
        config: dict[str, Any] = OmegaConf.to_container(ray, resolve=True)  # type: ignore[assignment]
        remote = dict(config.get("remote") or {})
        remote.setdefault("max_retries", 0)  # a rerun of the sweep resumes; Ray need not retry
        remote.update(num_gpus=1.0 / jobs_per_gpu, num_cpus=cpus_per_job, max_calls=1)
        config["remote"] = remote
        config["init"] = dict(config.get("init") or {})
        super().__init__(ray=OmegaConf.create(config))
        self.jobs_per_gpu = jobs_per_gpu
        self.forward_env = patterns

    def remote_options(self, environ: dict[str, str] | None = None, forward: bool = True) -> dict[str, Any]:
        """``ray.remote`` options of every job: the configured ones, with (``forward``) the
        forwarded environment under ``runtime_env.env_vars`` (a variable set there explicitly
        wins)."""
        options: dict[str, Any] = OmegaConf.to_container(self.ray_cfg.remote, resolve=True)  # type: ignore[assignment]
        runtime_env = dict(options.get("runtime_env") or {})
        forwarded = forwarded_env(self.forward_env, environ) if forward else {}
        env_vars = {**forwarded, **(runtime_env.get("env_vars") or {})}
        if env_vars:
            runtime_env["env_vars"] = env_vars
        if runtime_env:
            options["runtime_env"] = runtime_env
        return options

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

        driver_cwd = os.getcwd()
        driver_host = socket.gethostname()
        joins = True  # a Ray this process joined before: forward the environment to be safe
        if not ray.is_initialized():
            init, joins = ray_init_args(OmegaConf.to_container(self.ray_cfg.init, resolve=True))  # type: ignore[arg-type]
            log.info(f"{'Joining' if joins else 'Starting'} Ray: {init}")
            try:
                ray.init(**init)
            except ConnectionError as error:
                if not joins or "RAY_AUTH_MODE" in os.environ:
                    raise
                raise ConnectionError(
                    f"{error}. If that cluster uses token authentication (`ray start` turns it on when "
                    "~/.ray/auth_token exists), set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (or "
                    "RAY_AUTH_TOKEN) in the shell that runs the sweep."
                ) from error
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus <= 0:
            raise NoGpuError(
                "hydra/launcher=ray places each job on a GPU, and Ray sees none here. "
                "Run the sweep without it (jobs one after another), or declare GPUs with "
                "hydra.launcher.ray.init.num_gpus=N, or connect to a cluster with GPUs "
                "(hydra.launcher.ray.init.address=auto)."
            )
        # A Ray started here runs its workers with this process's whole environment already;
        # a runtime_env would only cost each job's start about a second (measured).
        options = self.remote_options(forward=joins)
        if joins:
            env_names = sorted(options.get("runtime_env", {}).get("env_vars", {}))
            log.info(f"Every job gets {', '.join(env_names) or 'no variable'} from this environment")
        run_job = ray.remote(**options)(_run_job_in_worker)

        sweep_dir = _absolute(driver_cwd, self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Ray GPU launcher is launching {len(job_overrides)} jobs, sweep output dir: {sweep_dir}")
        jobs: dict[Any, tuple[int, int, list[str], DictConfig]] = {}
        for position, overrides in enumerate(job_overrides):
            idx = initial_job_idx + position
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            job_sweep_dir = _absolute(driver_cwd, _select_as_job(sweep_config, "hydra.sweep.dir"))
            job_sweep_dir.mkdir(parents=True, exist_ok=True)
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"job_id_for_{idx}"
                sweep_config.hydra.job.num = idx
                sweep_config.hydra.sweep.dir = str(job_sweep_dir)
            ref = run_job.remote(
                hydra_context=self.hydra_context,
                sweep_config=sweep_config,
                task_function=self.task_function,
                singleton_state=Singleton.get_state(),
                driver_cwd=driver_cwd,
                driver_host=driver_host,
            )
            jobs[ref] = (position, idx, list(overrides), sweep_config)
        return self._collect(jobs, sweep_dir)

    def _collect(self, jobs: dict[Any, tuple[int, int, list[str], DictConfig]], sweep_dir: Path) -> list[JobReturn]:
        """Every job's JobReturn in launch order, waiting for each task on its own: a lost task
        becomes a record and a JobReturn while the others run on."""
        import ray

        returns: list[JobReturn | None] = [None] * len(jobs)
        waiting = list(jobs)
        lost = 0
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            for ref in done:
                position, idx, overrides, sweep_config = jobs[ref]
                try:
                    returns[position] = ray.get(ref)
                except ray.exceptions.RayError as error:
                    lost += 1
                    returns[position] = self._lost_job(idx, overrides, sweep_config, error)
        if lost:
            log.warning(f"{lost} of {len(jobs)} jobs were lost (see {sweep_dir}/jobs/); the others ran to their end")
        return [r for r in returns if r is not None]

    def _lost_job(self, idx: int, overrides: list[str], sweep_config: DictConfig, error: BaseException) -> JobReturn:
        """Record a job whose Ray task failed, and the JobReturn that lets the sweep go on."""
        sweep_dir = Path(str(sweep_config.hydra.sweep.dir))
        try:
            run_dir: str | None = str(sweep_dir / str(_select_as_job(sweep_config, "hydra.sweep.subdir")))
        except Exception:  # noqa: BLE001  (the record matters more than its run dir)
            run_dir = None
        reason = lost_reason(error)
        record_path = sweep_dir / "jobs" / f"{idx}.json"
        record: dict[str, Any] = {
            "job": idx,
            "overrides": overrides,
            "run_dir": run_dir,
            "status": "lost",
            "reason": reason,
        }
        if record_path.is_file():  # what the job itself recorded before it was lost
            with contextlib.suppress(OSError, json.JSONDecodeError):
                record["previous"] = json.loads(record_path.read_text())
        write_json_atomically(record_path, record)
        log.error(f"job #{idx} ({' '.join(overrides)}) was lost: {reason} -> {record_path}")
        ret = JobReturn()
        ret.overrides = overrides
        task_cfg = copy.deepcopy(sweep_config)
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        ret.cfg = task_cfg
        ret.hydra_cfg = OmegaConf.masked_copy(sweep_config, "hydra")
        ret.working_dir = run_dir
        ret.task_name = str(sweep_config.hydra.job.name)
        ret.status = JobStatus.COMPLETED  # FAILED would make the sweeper raise (see the module docstring)
        ret.return_value = None
        return ret
