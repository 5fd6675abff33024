"""Callbacks that capsnet's config groups name (conf/callbacks/) and that Lightning lacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint


class RunDirCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint that keeps its best score when its run dir was moved or synced.

    Lightning restores ``best_model_score`` only when the stored dirpath equals the new one;
    otherwise the next validation would overwrite best.ckpt however bad it is.  The stored
    paths are re-rooted in the new dir instead.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old, new = state_dict.get("dirpath"), self.dirpath
        if old and new and old != new:

            def moved(path: Any) -> Any:
                return str(Path(new) / Path(path).name) if path else path

            state_dict = {
                **state_dict,
                "dirpath": new,
                **{k: moved(state_dict.get(k)) for k in ("best_model_path", "kth_best_model_path", "last_model_path")},
                "best_k_models": {moved(k): v for k, v in state_dict.get("best_k_models", {}).items()},
            }
        super().load_state_dict(state_dict)
