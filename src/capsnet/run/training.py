"""run(cfg): validate, build, fit, test, and record one training job in its run dir.

A job is idempotent: its run dir is a pure function of its command line, so running the
same command again skips a completed job and resumes an unfinished one from last.ckpt.
Everything that decides the result is checked against what the dir already holds before
any training starts (see capsnet.run.signature).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from capsnet.data.mnist import DataError
from capsnet.nn.models import count_parameters
from capsnet.reporting.figures import write_run_figures
from capsnet.run import resolvers
from capsnet.run.builders import build_datamodule, build_module
from capsnet.run.callbacks import LastCheckpoint
from capsnet.run.config_tree import print_config_tree
from capsnet.run.history import EpochHistory, read_history, summarize
from capsnet.run.module import RUN_SIGNATURE_KEY
from capsnet.run.record import (
    git_commit,
    read_metrics,
    resolved_config,
    routing_identity,
    save_resolved_config,
    write_metrics,
)
from capsnet.run.rundir import (
    PREVIOUS_LAST,
    AtomicCheckpointIO,
    DamagedFileError,
    RunDir,
    RunDirBusyError,
    checkpoint_way_out,
    load_checkpoint_file,
)
from capsnet.run.signals import Interrupted, SignalCatcher, catching_signals
from capsnet.run.signature import SCHEDULE_LENGTH_KEYS, ResumeMismatchError, differences, run_signature
from capsnet.run.tracking import StepLog, build_loggers, finish_wandb, start_loggers
from capsnet.run.validation import ConfigError, check_data_sizes, validate_config

log = logging.getLogger(__name__)
# A launcher's worker (SLURM through submitit, Ray) unpickles the job and imports this module
# before Hydra resolves the job's config there: the resolvers must be known by then.
resolvers.register()

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
BEST = "best"


class RecordWriteError(RuntimeError):
    """metrics.json could not be written (a full or read-only disk)."""


# Stop a job before any work: nothing is trained, nothing of the run is written.
REFUSALS = (ConfigError, DataError, ResumeMismatchError, RunDirBusyError, DamagedFileError)


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """The fields that say which cell of the results table a run belongs to."""
    return {
        "model": cfg.model.name,
        "data": cfg.data.name,
        **routing_identity(OmegaConf.to_container(cfg.model, resolve=True)),
        "seed": int(cfg.seed),
        "profile": cfg.profile_name,
        "experiment": cfg.experiment_name,
    }


def redundant_reason(cfg: DictConfig) -> str | None:
    """Why this cell of a sweep's grid would repeat another job, by the experiment's own
    ``redundant`` rules (e.g. the CNN baseline ignores routing and reconstruction, so in a
    grid over them it trains in one cell only); None when it must run."""
    for rule in cfg.get("redundant") or []:

        def matches(conditions: Any) -> bool:
            return all(OmegaConf.select(cfg, key) == value for key, value in (conditions or {}).items())

        if matches(rule.get("when")) and not matches(rule.get("unless")):
            return str(rule.get("reason") or f"redundant cell: {OmegaConf.to_container(rule)}")
    return None


def _callbacks(cfg: DictConfig, has_logger: bool) -> dict[str, Callback]:
    """The ``callbacks`` group, instantiated, less what the trainer config turns off:
    ``trainer.enable_progress_bar=false`` and ``trainer.enable_model_summary=false`` win over
    the group (Lightning would refuse the pair), and the learning-rate monitor needs a
    logger (``logger=none`` is a valid choice)."""
    built = {name: instantiate(node) for name, node in (cfg.get("callbacks") or {}).items()}
    off = [
        kind
        for kind, is_off in (
            (LearningRateMonitor, not has_logger),
            (ProgressBar, cfg.trainer.get("enable_progress_bar") is False),
            (ModelSummary, cfg.trainer.get("enable_model_summary") is False),
        )
        if is_off
    ]
    return {name: cb for name, cb in built.items() if not isinstance(cb, tuple(off))}


def _best_checkpoint_callback(callbacks: dict[str, Callback], ckpt_dir: Path) -> ModelCheckpoint | None:
    """The monitored checkpoint (``callbacks.model_checkpoint``), which must write into this
    run's own checkpoints dir: resume, test and the table look for it there."""
    best = callbacks.get("model_checkpoint")
    if best is None:
        return None
    if not isinstance(best, ModelCheckpoint) or best.monitor is None:
        raise ConfigError(
            "callbacks.model_checkpoint",
            type(best).__name__,
            "must be a ModelCheckpoint with a monitor (see conf/callbacks/model_checkpoint.yaml)",
        )
    if best.dirpath is None or Path(best.dirpath).resolve() != ckpt_dir.resolve():
        raise ConfigError(
            "callbacks.model_checkpoint.dirpath",
            best.dirpath,
            f"must be this run's checkpoints dir ({ckpt_dir}): resume and test read it",
        )
    return best


def build_trainer(
    cfg: DictConfig, run_dir: Path, resuming: bool = False, catcher: SignalCatcher | None = None
) -> tuple[L.Trainer, ModelCheckpoint | None]:
    """The Trainer of ``cfg.trainer`` with the ``callbacks`` and ``logger`` groups, plus what
    every capsnet run has: EpochHistory (history.csv), LastCheckpoint (last.ckpt at the
    points a resume can start from; the stop on a signal) and checkpoints written atomically
    in the run dir (:class:`~capsnet.run.rundir.AtomicCheckpointIO`).  Returns it with the
    best-checkpoint callback.

    Under SLURM, submitit owns requeueing (``hydra.launcher.max_num_timeout``); Lightning's
    own SIGUSR1 requeue is turned off so the two never both requeue one job.
    """
    loggers = build_loggers(cfg, run_dir, resuming)
    callbacks = _callbacks(cfg, has_logger=bool(loggers))
    best = _best_checkpoint_callback(callbacks, run_dir / CHECKPOINT_DIR)
    # nested _target_ nodes (e.g. trainer.profiler) become objects; the rest stays as is
    kwargs: dict[str, Any] = instantiate(cfg.trainer, _convert_="all")
    plugins = [p for p in list(kwargs.pop("plugins", None) or []) if not isinstance(p, AtomicCheckpointIO)]
    plugins.append(AtomicCheckpointIO())
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    history = EpochHistory(run_dir, global_batch=int(cfg.data.batch_size))
    last = LastCheckpoint(run_dir / CHECKPOINT_DIR, int(cfg.checkpoint.every_n_steps), catcher)
    trainer = L.Trainer(
        **kwargs,
        plugins=plugins,
        callbacks=[*callbacks.values(), history, last],
        logger=loggers or False,
        default_root_dir=str(run_dir),
    )
    return trainer, best


def read_warm_start(path: Path, module: L.LightningModule) -> dict[str, Tensor]:
    """``ckpt_path``: the network weights of a capsnet checkpoint, checked against this
    run's network before training (same keys, same shapes) so a mismatch is refused early."""
    try:
        raw = load_checkpoint_file(path)
        state = {k: v for k, v in raw["state_dict"].items() if k.startswith("net.")}
    except (DamagedFileError, KeyError, AttributeError, TypeError) as error:  # one message for every way
        raise ConfigError("ckpt_path", str(path), f"not a readable capsnet checkpoint ({error})") from error
    own = {k: v.shape for k, v in module.state_dict().items() if k.startswith("net.")}
    theirs = {k: v.shape for k, v in state.items()}
    if own != theirs:
        missing, unexpected = sorted(own.keys() - theirs.keys()), sorted(theirs.keys() - own.keys())
        shapes = [
            f"{k}: {tuple(theirs[k])} vs {tuple(own[k])}" for k in own.keys() & theirs.keys() if own[k] != theirs[k]
        ]
        raise ConfigError(
            "ckpt_path",
            str(path),
            f"its network does not fit this run's model/data (missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"shapes checkpoint vs run {shapes[:4]})",
        )
    return state


def apply_matmul_precision(precision: str | None) -> None:
    """``perf.matmul_precision``: "highest" keeps float32 matmuls and convolutions exact;
    "high" lets CUDA use TF32 for both (about 8x the float32 rate on recent GPUs)."""
    if precision is None:
        return
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = precision != "highest"


def check_parallel_setup(cfg: DictConfig, trainer: L.Trainer) -> None:
    """The global batch must split evenly over the ranks, and a local sweep cannot run DDP."""
    world = trainer.world_size
    batch = int(cfg.data.batch_size)
    if batch % world:
        raise ConfigError(
            "data.batch_size",
            batch,
            f"it is the global batch, split over {world} processes (trainer.devices x trainer.num_nodes), "
            f"so it must be a multiple of {world}, e.g. {batch - batch % world or world}",
        )
    relaunches = isinstance(getattr(trainer.strategy, "launcher", None), _SubprocessScriptLauncher)
    in_sweep = HydraConfig.initialized() and getattr(HydraConfig.get().mode, "name", None) == "MULTIRUN"
    if relaunches and world > 1 and in_sweep:
        raise ConfigError(
            "trainer.strategy",
            trainer.strategy.__class__.__name__,
            "DDP over several devices cannot run inside a local sweep: Lightning starts each extra rank by "
            "re-running this command, which would re-run the sweep in every rank. Run one configuration at a "
            "time without -m (experiment configs sweep by themselves: add hydra.mode=RUN), or sweep with one "
            "GPU per job (hydra/launcher=ray_gpus), or on SLURM, where the scheduler starts the ranks "
            "(hydra/launcher=slurm with tasks_per_node = gpus_per_node = trainer.devices)",
        )


def job_log_name() -> str | None:
    """Hydra's job log in the run dir (``train.log``), which this invocation started."""
    return f"{HydraConfig.get().job.name}.log" if HydraConfig.initialized() else None


@contextmanager
def refusing_leaves_no_trace(run_dir: RunDir) -> Iterator[None]:
    """On a refusal (invalid config, missing data, another run's dir, a busy or damaged
    run dir) remove what this invocation made, and only that (see RunDir.undo)."""
    try:
        yield
    except BaseException:
        run_dir.undo()
        raise


def checkpoint_header(checkpoint: Path) -> tuple[dict[str, Any] | None, int]:
    """The run signature and global step saved with a checkpoint, read before any work.  A
    damaged file (truncated, not a zip, or tensors that fail their checksum) raises
    DamagedFileError naming the way out, so the run is refused rather than failed mid-fit."""
    raw = load_checkpoint_file(checkpoint)
    if not isinstance(raw, dict) or "global_step" not in raw:
        raise DamagedFileError(checkpoint, "not a Lightning training checkpoint", checkpoint_way_out(checkpoint))
    return raw.get(RUN_SIGNATURE_KEY), int(raw["global_step"])


def find_resume_checkpoint(ckpt_dir: Path) -> Path | None:
    """``last.ckpt``; or ``last.prev.ckpt`` when a kill fell between keeping the previous
    checkpoint and renaming the new one into place (file systems without hard links)."""
    for name in (LAST, PREVIOUS_LAST):
        if (ckpt_dir / name).is_file():
            if name == PREVIOUS_LAST:
                log.warning("no %s, but %s: resuming from that", LAST, PREVIOUS_LAST)
            return ckpt_dir / name
    return None


def check_same_run(run_dir: Path, signature: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """Refuse to skip to a finished run of another configuration in this dir."""
    if previous is not None and previous.get("status") in ("completed", "skipped") and "signature" in previous:
        changes = differences(previous["signature"], signature)
        if changes:
            raise ResumeMismatchError(str(run_dir), f"a {previous['status']} run", changes)


def check_resumable(run_dir: Path, signature: dict[str, Any], stored: dict[str, Any] | None, path: Path) -> None:
    """Refuse to continue an unfinished run of another configuration."""
    if stored is None:
        log.warning("%s has no run signature (written by an older capsnet): resuming unchecked", path)
        return
    changes = differences(stored, signature, ignore=SCHEDULE_LENGTH_KEYS)
    if changes:
        raise ResumeMismatchError(str(run_dir), "an unfinished run", changes)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one configuration; return (and write) its metrics.json record.

    Raises one of ``REFUSALS`` before any work (nothing trained, nothing of the run
    written), or :class:`~capsnet.run.signals.Interrupted` after recording the stop.
    """
    owner = RunDir(cfg.paths.output_dir, job_log=job_log_name())
    run_dir, ckpt_dir = owner.path, owner.path / CHECKPOINT_DIR
    with catching_signals() as catcher:
        with refusing_leaves_no_trace(owner):
            if rank_zero_only.rank == 0:  # under DDP the ranks of one job share the lock of rank 0
                owner.acquire()
            validate_config(cfg)
            datamodule = build_datamodule(cfg)
            datamodule.prepare_data()
            check_data_sizes(cfg, datamodule)
            apply_matmul_precision(cfg.perf.matmul_precision)
            previous = read_metrics(run_dir) if cfg.resume else None
            finished = previous is not None and previous.get("status") in ("completed", "skipped")
            resume_from = find_resume_checkpoint(ckpt_dir) if cfg.resume and not finished else None
            stored, resume_step = checkpoint_header(resume_from) if resume_from is not None else (None, 0)
            if resume_from is not None:
                read_history(run_dir)  # a damaged history is named now, not halfway into training
            trainer, best = build_trainer(cfg, run_dir, resuming=resume_from is not None, catcher=catcher)
            check_parallel_setup(cfg, trainer)
            signature = run_signature(resolved_config(cfg), trainer.world_size)
            check_same_run(run_dir, signature, previous)
            if resume_from is not None:
                check_resumable(run_dir, signature, stored, resume_from)
            L.seed_everything(int(cfg.seed), workers=True, verbose=False)
            module = build_module(cfg, datamodule)
            module.run_signature = signature
            warm_start = read_warm_start(Path(cfg.ckpt_path), module) if cfg.ckpt_path and resume_from is None else None

        identity = {
            **run_identity(cfg),
            "world_size": trainer.world_size,
            "global_batch": int(cfg.data.batch_size),
            "precision": str(cfg.trainer.precision),
            "signature": signature,
        }
        if finished:
            log.info("%s already %s; skipping (resume=false to retrain)", run_dir, previous["status"])
            owner.release()
            return previous
        if (reason := redundant_reason(cfg)) is not None:
            record = {**identity, "status": "skipped", "error": reason}
            if owner.holds_lock:
                write_metrics(run_dir, record)
            owner.release()
            return record
        if not cfg.resume and owner.holds_lock:
            owner.supersede(keep={".hydra", *(filter(None, [owner.job_log]))})
        try:
            return _train_and_test(
                cfg, owner, trainer, best, module, datamodule, identity, resume_from, resume_step, warm_start, catcher
            )
        finally:
            owner.release()


def _train_and_test(
    cfg: DictConfig,
    owner: RunDir,
    trainer: L.Trainer,
    best: ModelCheckpoint | None,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    identity: dict[str, Any],
    resume_from: Path | None,
    resume_step: int,
    warm_start: dict[str, Tensor] | None,
    catcher: SignalCatcher,
) -> dict[str, Any]:
    """Fit, test, draw; the record says what happened, whatever happens."""
    run_dir, ckpt_dir = owner.path, owner.path / CHECKPOINT_DIR
    started = time.time()
    history = next(cb for cb in trainer.callbacks if isinstance(cb, EpochHistory))
    if trainer.is_global_zero:
        print_config_tree(cfg, run_dir)
    save_resolved_config(cfg, run_dir)
    parameters = count_parameters(module.net)
    log.info("%s (%s): %s trainable parameters", cfg.model.name, cfg.model._target_, f"{parameters:,}")
    record: dict[str, Any] = {
        **identity,
        "git_commit": git_commit(),
        "status": "running",
        "tags": list(cfg.tags),
        "parameters": parameters,
    }
    if resume_from is not None:
        log.info("resuming from %s (step %d)", resume_from, resume_step)
        record["resumed_from"] = str(resume_from)
    if owner.holds_lock:
        write_metrics(run_dir, record)  # a run in progress is never mistaken for a finished one
    interrupted: Interrupted | None = None
    try:
        for logger in trainer.loggers:
            if isinstance(logger, StepLog):
                logger.resume_step = resume_step
        start_loggers(trainer.loggers, cfg, run_dir)
        if warm_start is not None:
            module.load_state_dict(warm_start, strict=False)
            log.info("starting from the weights of %s", cfg.ckpt_path)
            record["warm_start"] = str(cfg.ckpt_path)
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
        if trainer.global_step == 0:
            raise RuntimeError(
                "the run trained no step (check trainer.limit_train_batches, trainer.max_steps and the data size); "
                "an untrained model is not a result"
            )
        trainer.save_checkpoint(ckpt_dir / LAST)
        record["training_wall_time_s"] = round(history.wall_time(), 2)
        best_path = best_checkpoint(best, ckpt_dir)
        val_examples = trainer.callback_metrics.get("val/examples")
        results = trainer.test(module, datamodule=datamodule, ckpt_path=str(best_path), verbose=False)
        record.update(collect_test_metrics(results, datamodule.record_fields))
        if cfg.figures and trainer.is_global_zero:
            source = f"weights of {best_path.name}" + (", lowest validation error" if best_path.stem == BEST else "")
            try:
                record["figures"] = [p.name for p in _write_figures(module, datamodule, run_dir, trainer, source)]
            except Exception as error:  # pictures of a trained, tested run: never its status
                log.exception("figures failed; the run is recorded without them")
                record["figures_error"] = f"{type(error).__name__}: {error}"
        best_score = best.best_model_score if best is not None else None
        record.update(
            status="completed",
            val_error=float(best_score) if best_score is not None else None,
            val_examples=int(val_examples) if val_examples is not None else None,
            best_checkpoint=str(best_path),
        )
    except (Interrupted, SIGTERMException) as error:
        if isinstance(error, SIGTERMException):  # Lightning's own stop (a signal between its checks and ours)
            error = Interrupted(signal.SIGTERM, trainer.global_step, saved=False)
        interrupted = error
        record.update(status="interrupted", error=str(error), signal=signal_name(error.signum))
    except Exception as error:  # recorded so one failed job never hides the others' results
        log.exception("run failed")
        record.update(status="failed", error=f"{type(error).__name__}: {error}")
    finally:
        catcher.deferring = False  # from here on a second signal stops at once
        record.update(epochs=trainer.current_epoch, steps=trainer.global_step)
        try:
            if summary := summarize(read_history(run_dir)):
                record["history"] = summary
        except DamagedFileError as error:
            record["history_error"] = str(error)
        record["wall_time_s"] = round(history.wall_time(), 2)  # every segment of a resumed run
        record["segment_wall_time_s"] = round(time.time() - started, 2)
        finish_wandb(trainer.loggers)
        if owner.holds_lock:  # under DDP, one writer
            try:
                write_metrics(run_dir, record)
            except OSError as error:  # a full or read-only disk: the checkpoints on disk are still whole
                raise RecordWriteError(
                    f"could not write {run_dir / 'metrics.json'} ({error}); the run was {record['status']} at step "
                    f"{record['steps']}, and every file on disk is whole: run the same command again once the disk "
                    f"has room and is writable, and it resumes from checkpoints/last.ckpt"
                ) from error
    if interrupted is not None:
        log.warning("%s; run the same command again to resume", interrupted)
        catcher.chain()  # submitit requeues the job on its signal now that everything is saved
        raise interrupted
    return record


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def best_checkpoint(best: ModelCheckpoint | None, ckpt_dir: Path) -> Path:
    """The best-validation checkpoint, always resolved inside this run's own dir.

    Only a run that never validated has none; it is then tested on last.ckpt.  A best
    checkpoint that is recorded but missing is an error, never a silent fallback.
    """
    if best is None or not best.best_model_path:
        log.warning("no validation ran, so there is no best checkpoint: testing %s", ckpt_dir / LAST)
        return ckpt_dir / LAST
    path = ckpt_dir / Path(best.best_model_path).name
    if not path.is_file():
        raise FileNotFoundError(f"best checkpoint {path} is missing from the run dir")
    return path


def collect_test_metrics(results: list[dict[str, float]], record_fields: dict[str, str]) -> dict[str, float]:
    """Map Lightning's per-loader test results onto metrics.json's keys."""
    merged: dict[str, float] = {}
    for loader_results in results:
        merged.update(loader_results)
    record = {"test_error": merged["test/error"]}
    if "test/examples" in merged:
        record["test_examples"] = int(merged["test/examples"])
    for key, value in merged.items():
        if key.endswith("_error") and key.startswith("test/") and key != "test/error":
            record[key.removeprefix("test/")] = value
    for field, metric in record_fields.items():  # the dataset's own names for its results
        record[field] = record[metric]
    return record


def _write_figures(module, datamodule, run_dir: Path, trainer: L.Trainer, source: str) -> list[Path]:
    """PNG figures into the run dir; also logged as images when W&B is on."""
    written = write_run_figures(
        module.net,
        datamodule.sample_batches(),
        run_dir / "figures",
        module.task,
        source,
        sample_titles=getattr(datamodule, "sample_titles", None),
    )
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            pngs = [p for p in written if p.suffix == ".png"]
            logger.log_image(key="figures", images=[str(p) for p in pngs], caption=[p.stem for p in pngs])
    return written
