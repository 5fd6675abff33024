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
