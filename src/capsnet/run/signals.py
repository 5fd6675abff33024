"""Stop a job cleanly on SIGTERM, SIGINT (Ctrl-C) or a scheduler's requeue signal.

What a scheduler, a preemption or Ctrl-C sends must never lose work or leave a record
that lies.  The handler itself only notes the signal and returns at once; the run stops
at the next safe point (the end of a training step, of a validation or test batch), saves
``last.ckpt`` there when that is a point a resume can start from, records
``status: interrupted`` and exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT).
Outside the loops (setup, figures) nothing needs saving, so the signal stops the job
right away.  A second signal stops it at once wherever it is: every file is written
atomically, so the last checkpoint and record on disk stay whole.

Under submitit (SLURM), its own handler of the requeue signal (SIGUSR2) runs after the
checkpoint and the record are written, so a requeued job resumes from the current step.  It
runs also when a second signal cut the save short: a later SIGTERM never hides the requeue
signal.  (When that SIGTERM is SLURM ending the job at its limit, SLURM no longer requeues
it and the job stays ``interrupted``, to resume by the same command: the stop must reach
a step's end within ``signal_delay_s`` of the warning.)
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SCHEDULER_SIGNALS = (signal.SIGUSR2,)  # submitit's requeue signal: caught only where submitit set a handler


class Interrupted(Exception):
    """The job was asked to stop by a signal.

    Args:
        signum: the signal.
        step: the training step reached when the job stopped.
        saved: whether ``last.ckpt`` was written at that step.
    """

    def __init__(self, signum: int, step: int | None = None, saved: bool = False, forced: bool = False) -> None:
        self.signum, self.step, self.saved, self.forced = signum, step, saved, forced
        name = signal.Signals(signum).name
        where = f" at step {step}" if step is not None else ""
        what = "; last.ckpt saved there" if saved else ""
        super().__init__(f"stopped by {name}{where}{what}" + (" (second signal: stopped at once)" if forced else ""))

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class SignalCatcher:
    """Notes stop signals; :meth:`check` raises :class:`Interrupted` at a safe point.

    ``deferring`` is true while a loop runs, whose callbacks call :meth:`check` at every
    batch; otherwise the handler raises at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferring = False
        self._previous: dict[int, Any] = {}
        self._noted: list[int] = []  # every signal received, in order, once each

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum not in self._noted:
            self._noted.append(signum)
        if self.signum is not None or not self.deferring:
            self.signum = signum
            raise Interrupted(signum, forced=self.deferring)
        self.signum = signum
        log.warning(
            "received %s: stopping at the end of this step (send it again to stop at once)", signal.Signals(signum).name
        )

    @property
    def received(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        for signum in SCHEDULER_SIGNALS:
            current = signal.getsignal(signum)
            if callable(current):
                self._previous[signum] = signal.signal(signum, self._handle)

    def reclaim(self) -> None:
        """Take SIGTERM back from Lightning, which composes its own handler with ours when a
        fit starts and would otherwise end the run by SystemExit(0) after the step."""
        if signal.getsignal(signal.SIGTERM) is not self._handle and signal.SIGTERM in self._previous:
            signal.signal(signal.SIGTERM, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def chain(self) -> None:
        """Give every signal received, in order, to the handler that was there before
        (submitit requeues the job on SIGUSR2 and ignores SIGTERM, which it expects before
        the final kill): a SIGTERM that followed the requeue signal must not hide it."""
        for signum in self._noted:
            previous = self._previous.get(signum)
            if callable(previous) and previous is not signal.default_int_handler:
                previous(signum, None)


@contextmanager
def catching_signals() -> Iterator[SignalCatcher]:
    """Install the stop handlers for the duration of a job."""
    catcher = SignalCatcher()
    catcher.install()
    try:
        yield catcher
    finally:
        catcher.restore()
