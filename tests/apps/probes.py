"""Callbacks the tests attach to real runs through the ``callbacks`` config key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L


class StepLosses(L.Callback):
    """Appends each training step's local loss and batch size to ``<path>/rank<r>.jsonl``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / f"rank{trainer.global_rank}.jsonl").open("a") as handle:
            row = {"step": trainer.global_step - 1, "loss": float(loss), "n": int(batch[0].shape[0])}
            handle.write(json.dumps(row) + "\n")


class FailAt(L.Callback):
    """Stops a run with an error at the start of training step ``step`` (a stand-in for a
    crash); with ``seed``, only the run of that seed (``torch.initial_seed()``)."""

    def __init__(self, step: int, seed: int | None = None) -> None:
        self.step, self.seed = step, seed

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        import torch

        if trainer.global_step == self.step and self.seed in (None, torch.initial_seed()):
            raise RuntimeError(f"stopped at step {self.step} by the test")


class SyncDebugAfter(L.Callback):
    """From step ``step`` on, any CUDA host-device sync inside a training step raises
    (``torch.cuda.set_sync_debug_mode("error")``); validation and the end are exempt."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        import torch

        torch.cuda.set_sync_debug_mode("error" if trainer.global_step >= self.step else 0)

    def on_validation_start(self, trainer: L.Trainer, *args: Any) -> None:
        import torch

        torch.cuda.set_sync_debug_mode(0)

    on_train_end = on_validation_start


class ZeroWeightsAt(L.Callback):
    """Sets every weight to zero at the start of step ``step``: from there the model is worse."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            import torch

            with torch.no_grad():
                for parameter in pl_module.parameters():
                    parameter.zero_()


class BatchDigests(L.Callback):
    """Appends, per training batch, ``[epoch, sum of images, sum of labels]`` to ``path``
    (JSON lines): enough to tell whether two epochs trained on the same batches."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        row = [trainer.current_epoch, round(float(batch[0].double().sum()), 6), int(batch[1].sum())]
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


class WeightsAtStart(L.Callback):
    """Saves the network's weights as training starts (after any warm start or resume)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import torch

        torch.save({k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()}, self.path)


# ---- fault injection (tests/faults/test_faults.py) ------------------------------------------
def _die(signum: int = 9) -> None:
    import os

    os.kill(os.getpid(), signum)


class KillAt(L.Callback):
    """Sends this process ``signum`` (SIGKILL by default) at a named phase of a real run:
    ``train_step`` (as training step ``step`` starts), ``validation`` (after batch ``batch``
    of epoch ``epoch``'s validation), ``test`` (after test batch ``batch``)."""

    def __init__(self, phase: str, step: int = 0, epoch: int = 0, batch: int = 0, signum: int = 9) -> None:
        assert phase in ("train_step", "validation", "test"), phase
        self.phase, self.step, self.epoch, self.batch, self.signum = phase, step, epoch, batch, signum
        self.sent = False

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            _die(self.signum)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.phase == "train_step" and trainer.global_step == self.step:
            self._send()

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        fitting = trainer.state.fn == "fit"
        if self.phase == "validation" and fitting and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            self._send()

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.phase == "test" and batch_idx == self.batch:
            self._send()


class KillInCheckpointWrite(L.Callback):
    """From step ``step`` on, the next checkpoint file write stops half-way: half of the bytes
    reach the file being written, then the process is SIGKILLed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step < self.step:
            return
        import io

        import capsnet.run.rundir

        original = capsnet.run.rundir.atomic_write

        def half_then_die(path: Any, write: Any) -> Any:
            if not str(path).endswith(".ckpt"):
                return original(path, write)
            buffer = io.BytesIO()
            write(buffer)
            data = buffer.getvalue()
            with capsnet.run.rundir.temp_path(Path(path)).open("wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                _die()
            return None

        capsnet.run.rundir.atomic_write = half_then_die


class KillInFigures(L.Callback):
    """The process is SIGKILLed while the run draws its figures (after test)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import capsnet.run.training

        def die(*args: Any, **kwargs: Any) -> None:
            _die()

        capsnet.run.training.write_run_figures = die


class KillInRecordWrite(L.Callback):
    """The process is SIGKILLed while it writes the completed record (metrics.json)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import capsnet.run.record

        original = capsnet.run.record.atomic_write_json

        def maybe_die(path: Any, record: dict[str, Any]) -> Any:
            if record.get("status") == "completed":
                _die()
            return original(path, record)

        capsnet.run.record.atomic_write_json = maybe_die


class SignalSelfAt(L.Callback):
    """Sends this process ``signum`` as training step ``step`` starts (a scheduler's or a
    user's signal, at a known step)."""

    def __init__(self, step: int, signum: int = 15) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            _die(self.signum)


class SlowSteps(L.Callback):
    """Sleeps ``seconds`` after every training step (a long run, at smoke scale)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any) -> None:
        import time

        time.sleep(self.seconds)


class ReadOnlyAt(L.Callback):
    """At training step ``step``, makes ``folder`` read-only: a read-only bind mount of it
    onto itself (root; permissions alone do not stop root)."""

    def __init__(self, step: int, folder: str) -> None:
        self.step, self.folder = step, folder

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            import subprocess

            subprocess.run(["mount", "--bind", self.folder, self.folder], check=True)
            subprocess.run(["mount", "-o", "remount,ro,bind", self.folder], check=True)


class WaitForFile(L.Callback):
    """At training step ``step``, waits until ``path`` exists (the test holds a run at a
    known point while it does something else)."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            import time

            (self.path.parent / f"{self.path.name}.waiting").touch()
            while not self.path.exists():
                time.sleep(0.05)


class RecordEnv(L.Callback):
    """Writes, as training starts, what the job's process was given to ``path`` (JSON): its
    GPU (``CUDA_VISIBLE_DEVICES`` and Ray's GPU ids, under a Ray launcher), pid, working dir,
    ``CAPSNET_DATA_DIR`` and where ``capsnet`` was imported from."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import os

        import capsnet

        try:
            import ray

            ray_gpu_ids = [str(i) for i in ray.get_gpu_ids()] if ray.is_initialized() else None
        except ImportError:
            ray_gpu_ids = None
        record = {
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "ray_gpu_ids": ray_gpu_ids,
            "pid": os.getpid(),
            "cwd": os.getcwd(),
            "capsnet_data_dir": os.environ.get("CAPSNET_DATA_DIR"),
            "capsnet_file": capsnet.__file__,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(record))


class KillSelfAt(L.Callback):
    """In the run where ``value`` equals ``kill_value``: appends ``<pid>`` to ``starts`` as
    training starts (one line per start, so a retry shows), then kills its own process with
    SIGKILL at the start of training step ``step``, as the OOM killer or a lost node would.
    ``value`` is meant to be an interpolation (``${routing.iters}``), so one callback config
    picks one job of a sweep."""

    def __init__(self, step: int, value: Any, kill_value: Any, starts: str) -> None:
        # not "log": capsnet binds the LightningModule's log method onto callbacks' "log"
        self.step, self.active, self.starts = step, value == kill_value, Path(starts)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active:
            import os

            with self.starts.open("a") as handle:
                handle.write(f"{os.getpid()}\n")

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.active and trainer.global_step == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class JobRecord(L.Callback):
    """Writes ``<path>/<job>-<restart>-<pid>.json`` for a run under a scheduler: the job's ids,
    the GPU it was given (``CUDA_VISIBLE_DEVICES``, ``SLURM_JOB_GPUS``), how often SLURM has
    restarted it, whether the run resumed from a checkpoint, the last step trained, and
    wall-clock times from the callback's creation (as the run builds its trainer) to the end
    of the test (``end`` is null when the run was stopped first)."""

    KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")

    def __init__(self, path: str) -> None:
        import os
        import time

        self.path = Path(path)
        self.record: dict[str, Any] = {key.lower(): os.environ.get(key) for key in self.KEYS}
        self.record.update(
            restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0")), pid=os.getpid(), start=time.time(), end=None
        )
        job = self.record["slurm_job_id"] or "local"
        self.file = self.path / f"{job}-{self.record['restart_count']}-{os.getpid()}.json"
        self._write()

    def _write(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps(self.record))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["resumed"] = trainer.ckpt_path is not None
        self._write()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.record["last_step"] = trainer.global_step
        self._write()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        self.record["end"] = time.time()
        self._write()


class SlowUntilResumed(L.Callback):
    """Sleeps ``seconds`` before every training step after the first, in a run that did not
    resume from a checkpoint: such a run outlasts a short time limit (with a checkpoint
    already written when ``checkpoint.every_n_steps=1``), and the attempt that resumes after
    the requeue trains at full speed.  An attempt cut before its first checkpoint starts
    afresh, and so slowly, again."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.slow = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.slow = trainer.ckpt_path is None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        import time

        if self.slow and trainer.global_step >= 1:
            time.sleep(self.seconds)


class ErrorCounts(L.Callback):
    """Recounts, independently of the module's metrics, the examples and errors of every
    training, validation and test batch (a second forward pass on the same batch, under
    the trainer's own precision context, before the weights change), and keeps the
    module's logged ``train/error`` at each epoch's end.  Written as JSON to ``path``
    when the run ends, with exact integer counts, and the module's metric state dtypes."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.counts: dict[str, list[int]] = {}
        self.logged_train_error: list[float] = []
        self.state_dtypes: dict[str, str] = {}

    def _count(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, stage: str) -> None:
        import torch

        from capsnet.run.module import top_k_error

        plugin = trainer.precision_plugin
        context = {"train": plugin.train_step_context, "val": plugin.val_step_context}.get(
            stage, plugin.test_step_context
        )
        with torch.no_grad(), context():
            errors = top_k_error(pl_module(batch[0]).float(), batch[1])
        seen = self.counts.setdefault(stage, [0, 0])
        seen[0] += int(errors.numel())
        seen[1] += int(errors.sum())

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._count(trainer, pl_module, batch, "train")

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        if not trainer.sanity_checking:
            self._count(trainer, pl_module, batch, "val")

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        self._count(trainer, pl_module, batch, "test")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.logged_train_error.append(float(trainer.callback_metrics["train/error"]))
        self._dtypes(pl_module)

    def _dtypes(self, pl_module: L.LightningModule) -> None:
        import torchmetrics

        for name, metric in pl_module.named_modules():
            if isinstance(metric, torchmetrics.Metric):
                for state in metric._defaults:
                    self.state_dtypes[f"{name}.{state}"] = str(getattr(metric, state).dtype)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._dtypes(pl_module)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"counts": self.counts, "train_error": self.logged_train_error, "state_dtypes": self.state_dtypes}
        self.path.write_text(json.dumps(row, indent=1))


class DropoutMasks(L.Callback):
    """Appends, per training step, this rank's batch (labels, per-image pixel sums) and the
    mask every ``nn.Dropout`` drew, to ``<path>/rank<r>.jsonl``.  A mask entry is 1 (kept),
    0 (dropped) or -1 (unknown: the input was 0, so the output cannot tell)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.masks: list[list[list[int]]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import torch

        def record(module: torch.nn.Module, inputs: tuple, output: Any) -> None:
            if module.training:
                (given,) = inputs
                mask = torch.where(given == 0, -1, (output != 0).long()).flatten(1)
                self.masks.append(mask.tolist())

        for module in pl_module.modules():
            if isinstance(module, torch.nn.Dropout):
                module.register_forward_hook(record)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.masks = []
        self.batch = {
            "labels": batch[1].tolist(),
            "pixel_sums": [round(float(s), 4) for s in batch[0].double().flatten(1).sum(dim=1)],
        }

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / f"rank{trainer.global_rank}.jsonl").open("a") as handle:
            row = {"step": trainer.global_step - 1, **self.batch, "masks": self.masks}
            handle.write(json.dumps(row) + "\n")


# ---- the GPU tier (tests/gpu/test_gpu.py) ---------------------------------------------------
class PrecisionRecord(L.Callback):
    """Writes to ``path`` (JSON) what a run computed in: the dtype and device of the output of
    the network's first layer in each phase (``train``, ``val``, ``test``, and ``figures``: any
    forward pass after the test, which is where the run draws them), the weights' dtype as
    training and as the figures start, the precision plugin, and (16-mixed) the loss scaler's
    scale at the end of training (null without a scaler)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.phase = "setup"
        self.record: dict[str, Any] = {"outputs": {}}

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.record, indent=1))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def seen(module: Any, inputs: Any, output: Any) -> None:
            if self.phase not in self.record["outputs"]:
                self.record["outputs"][self.phase] = {"dtype": str(output.dtype), "device": output.device.type}
                self._write()

        next(pl_module.net.children()).register_forward_hook(seen)
        self.record["plugin"] = type(trainer.precision_plugin).__name__

    def _weights(self, pl_module: L.LightningModule) -> str:
        return str(next(pl_module.net.parameters()).dtype)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.phase = "train"
        self.record.setdefault("train_weights", self._weights(pl_module))

    def on_validation_batch_start(self, *args: Any) -> None:
        self.phase = "val"

    def on_test_batch_start(self, *args: Any) -> None:
        self.phase = "test"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.record["loss_scale"] = float(scaler.get_scale()) if scaler is not None else None
        self._write()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.phase = "figures"
        self.record["figures_weights"] = self._weights(pl_module)
        self._write()


class CudaPeakMemory(L.Callback):
    """Writes to ``path`` (JSON), as training ends: the peak CUDA memory allocated during
    training (``torch.cuda.max_memory_allocated``, counted from training's start; null on
    a CPU), the steps trained and their wall-clock seconds."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        import torch

        self.cuda = pl_module.device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.started = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        import torch

        if self.cuda:
            torch.cuda.synchronize()
        record = {
            "peak_bytes": torch.cuda.max_memory_allocated() if self.cuda else None,
            "device": torch.cuda.get_device_name() if self.cuda else "cpu",
            "steps": trainer.global_step,
            "seconds": time.perf_counter() - self.started,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(record))


class MeetOtherJobs(L.Callback):
    """Shows which jobs of a sweep trained at the same time.  Each job writes
    ``<folder>/<pid>.json``: its ``CUDA_VISIBLE_DEVICES``, when training started and ended,
    and, at the start of training step ``step`` (the model on its device, one step done),
    the memory it held there.  At that step it waits, up to ``timeout`` seconds, until
    ``jobs`` jobs have reached it; ``met`` says whether they all did.  Jobs that run one
    after another never meet: the first waits out its timeout alone and ends before the
    next one starts, so their intervals do not overlap either."""

    def __init__(self, folder: str, jobs: int, step: int = 1, timeout: float = 180.0) -> None:
        import os
        import time

        self.folder, self.jobs, self.step, self.timeout = Path(folder), jobs, step, timeout
        self.record: dict[str, Any] = {
            "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "created": time.time(),
        }

    def _write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.record['pid']}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record))
        tmp.replace(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        self.record.update(start=time.time(), device=str(pl_module.device))
        self._write()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        import time

        import torch

        cuda = pl_module.device.type == "cuda"
        self.record.update(
            arrived=time.time(), memory_bytes=torch.cuda.memory_allocated(pl_module.device) if cuda else None
        )
        (self.folder / f"{self.record['pid']}.arrived").parent.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{self.record['pid']}.arrived").touch()
        deadline = time.time() + self.timeout
        while len(list(self.folder.glob("*.arrived"))) < self.jobs and time.time() < deadline:
            time.sleep(0.1)
        self.record.update(met=len(list(self.folder.glob("*.arrived"))) >= self.jobs, left=time.time())
        self._write()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        self.record["end"] = time.time()
        self._write()
