"""Hydra callbacks (``hydra.callbacks``) for the tests.  Kept apart from probes.py: Hydra
sends its callbacks to every job of a sweep, and this module imports nothing heavy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback


class SweepEnd(Callback):
    """Writes ``path`` when the sweep's ``on_multirun_end`` runs, i.e. when the launcher
    returned and the sweeper did not raise."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        self.path.write_text(json.dumps({"sweep_dir": str(config.hydra.sweep.dir)}))
