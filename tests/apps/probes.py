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

        from capsnet.module import top_k_error

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
