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
    """Stops a run with an error at the start of training step ``step`` (a stand-in for a crash)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
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
