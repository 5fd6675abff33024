"""Callbacks that capsnet's runs rely on and that Lightning lacks.

``LastCheckpoint`` writes ``last.ckpt`` only at points a resume can start from, and stops
the run there on a signal; ``RunDirCheckpoint`` keeps ``best.ckpt`` and the score that
describes it in step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from capsnet.run.rundir import LAST, DamagedFileError, load_checkpoint_file
from capsnet.run.signals import Interrupted, SignalCatcher

log = logging.getLogger(__name__)


class LastCheckpoint(Checkpoint):
    """``<run dir>/checkpoints/last.ckpt``: what a resume starts from.

    Written every ``every_n_steps`` training steps and at the end of every epoch (after its
    validation and its history row), but never at an epoch's last step: a checkpoint taken
    there, before the epoch's validation, resumes past that validation (Lightning does not
    run it again), which lost the epoch's score and history row.  A kill during validation
    therefore resumes from the step before and validates again.

    On a stop signal (:mod:`capsnet.run.signals`) the run stops at the next such point, after
    saving there; during validation or test it stops at the next batch (under DDP at the end
    of the evaluation loop).
    """

    def __init__(self, dirpath: Path | str, every_n_steps: int, catcher: SignalCatcher | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps)
        self.catcher = catcher

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path)

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        flag = self.catcher is not None and self.catcher.received
        if trainer.world_size > 1:  # every rank stops at the same step, or the others hang
            flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
        return flag

    def _loop_started(self, *_: Any) -> None:
        if self.catcher is not None:
            self.catcher.reclaim()
            self.catcher.deferring = True

    def _loop_ended(self, *_: Any) -> None:
        if self.catcher is not None:
            self.catcher.deferring = False

    on_train_start = on_validation_start = on_test_start = _loop_started
    on_train_end = on_test_end = _loop_ended

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit":  # inside fit, training resumes after validation
            self._loop_ended()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        batch_idx = args[-1]
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        self._stopping = self._stop_requested(trainer)
        if not last_of_epoch and (self._stopping or trainer.global_step % self.every_n_steps == 0):
            self.save(trainer)
            self._saved_at = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        """A stop asked during the last step takes effect here, once Lightning has logged that
        step (its row in the step log belongs to the checkpoint just written)."""
        if getattr(self, "_stopping", False):
            saved = getattr(self, "_saved_at", None) == trainer.global_step
            raise Interrupted(self.catcher.signum, trainer.global_step, saved=saved)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)
        if self._stop_requested(trainer):
            raise Interrupted(self.catcher.signum, trainer.global_step, saved=True)

    def _check_eval(self, trainer: L.Trainer, *_: Any) -> None:
        # Under DDP the ranks' evaluation shards may differ by a batch, so a collective per
        # batch would pair different calls across ranks: the stop waits for the loop's end
        # (fit: the next training step; test: the handler once the test loop is over).
        if trainer.world_size > 1:
            return
        if self._stop_requested(trainer):
            raise Interrupted(self.catcher.signum, trainer.global_step, saved=False)

    on_validation_batch_end = on_test_batch_end = _check_eval


class RunDirCheckpoint(ModelCheckpoint):
    """The best-validation checkpoint, whose remembered score always describes the file.

    * Lightning restores ``best_model_score`` only when the stored dirpath equals the new
      one; a moved or synced run dir would then overwrite best.ckpt however bad the next
      epoch.  The stored paths are re-rooted in the new dir instead.
    * A resume restores the score remembered by ``last.ckpt``; if a killed attempt wrote a
      newer best.ckpt after that, the file on disk wins (its own embedded score), so the
      record and the table never describe other weights than the file's.
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
        self._match_file_on_disk()

    def _match_file_on_disk(self) -> None:
        if self.dirpath is None:
            return
        path = Path(self.dirpath) / f"{self.filename}{self.FILE_EXTENSION}"
        if not path.is_file():
            if self.best_model_path:
                log.warning("best checkpoint %s is missing: the next validation writes a new one", path)
            self.best_model_path, self.best_model_score, self.best_k_models = "", None, {}
            self.kth_best_model_path, self.kth_value = "", self.kth_value
            return
        try:
            raw = load_checkpoint_file(path, verify=False)
        except DamagedFileError as error:
            log.warning("%s; the next validation writes a new best checkpoint", error)
            self.best_model_path, self.best_model_score, self.best_k_models = "", None, {}
            return
        own = next((v for k, v in (raw.get("callbacks") or {}).items() if k == self.state_key), None)
        score = own.get("best_model_score") if isinstance(own, dict) else None
        if score is None:
            return
        score = score if isinstance(score, torch.Tensor) else torch.tensor(score)
        if self.best_model_score is None or not torch.equal(score.cpu(), self.best_model_score.cpu()):
            log.info("best.ckpt on disk scores %s: taking that as the best so far", float(score))
        self.best_model_score, self.best_model_path = score, str(path)
        self.best_k_models = {str(path): score}
        self.kth_best_model_path, self.kth_value = str(path), score
