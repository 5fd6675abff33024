"""Count the calls that would make a CUDA host wait for the device, on any device.

A CPU run cannot sync with a GPU, but it runs the same Python: every ``Tensor.item``,
``bool(tensor)``, ``tolist``, ``cpu``/``numpy`` conversion and every tensor built from a
Python number on an explicit device (a blocking host-to-device copy on CUDA) is a call
that would stall the GPU there.  Counting them per training step on the CPU shows which
steps would sync on a GPU.

Adam's step counters are the one exception: with ``capturable=False`` (the default)
PyTorch keeps them on the host even on CUDA, so their ``.item()`` never syncs.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch

_METHODS = ("item", "__bool__", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__")
_FACTORIES = ("tensor", "as_tensor")


class SyncAudit:
    """Patches the syncing calls; ``counts`` maps a label to the calls made under it."""

    def __init__(self) -> None:
        self.label: Any = None
        self.counts: Counter = Counter()
        self.sites: dict[Any, list[str]] = {}
        self.host_tensors: set[int] = set()  # ids of tensors that live on the host on CUDA too

    def _record(self, what: str) -> None:
        if self.label is None:
            return
        self.counts[self.label] += 1
        frame = traceback.extract_stack(limit=4)[0]
        self.sites.setdefault(self.label, []).append(f"{what} at {frame.filename}:{frame.lineno}")

    @contextmanager
    def patched(self) -> Iterator[SyncAudit]:
        originals = {name: getattr(torch.Tensor, name) for name in _METHODS}
        factories = {name: getattr(torch, name) for name in _FACTORIES}
        audit = self

        def method(name: str):
            original = originals[name]

            def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if id(self) not in audit.host_tensors:
                    audit._record(f"Tensor.{name}")
                return original(self, *args, **kwargs)

            return wrapper

        def factory(name: str):
            original = factories[name]

            def wrapper(data: Any, *args: Any, **kwargs: Any) -> Any:
                if kwargs.get("device") is not None and isinstance(data, (int, float, bool)):
                    audit._record(f"torch.{name}(scalar, device=...)")
                return original(data, *args, **kwargs)

            return wrapper

        for name in _METHODS:
            setattr(torch.Tensor, name, method(name))
        for name in _FACTORIES:
            setattr(torch, name, factory(name))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
            for name, original in factories.items():
                setattr(torch, name, original)


AUDIT = SyncAudit()  # the one audit a run's PerStepSyncs callback (built from config) reports to


class PerStepSyncs(L.Callback):
    """Labels every sync with the training step it belongs to.

    Lightning fetches and transfers batch k (``on_after_batch_transfer``) before
    ``on_train_batch_start``, so the label moves on at ``on_train_batch_end``: step k's
    count holds everything from the end of step k-1 to the end of step k.
    """

    def __init__(self, audit: SyncAudit | None = None) -> None:
        self.audit = audit or AUDIT

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.audit.label = trainer.global_step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for optimizer in trainer.optimizers:
            for state in optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    self.audit.host_tensors.add(id(state["step"]))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.audit.label = trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.audit.label = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.audit.label = None
