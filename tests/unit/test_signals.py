"""The stop-signal catcher hands the scheduler's requeue signal on, even when a second
signal cut the save short (SLURM: SIGUSR2 signal_delay_s before the limit, then SIGTERM at
the limit while the step in progress had not ended)."""

from __future__ import annotations

import os
import signal

import pytest

from capsnet.run.signals import Interrupted, catching_signals


@pytest.fixture
def requeue_handler():
    """A stand-in for submitit's SIGUSR2 handler (set before the job, as submitit does)."""
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def test_the_requeue_signal_is_chained_after_the_save(requeue_handler: list[int]) -> None:
    with catching_signals() as catcher:
        catcher.deferring = True  # inside the training loop: noted, not raised
        os.kill(os.getpid(), signal.SIGUSR2)
        assert catcher.received and requeue_handler == []  # nothing requeued before the save
        catcher.deferring = False
        catcher.chain()
    assert requeue_handler == [signal.SIGUSR2]


def test_a_sigterm_during_the_save_does_not_hide_the_requeue_signal(requeue_handler: list[int]) -> None:
    with catching_signals() as catcher:
        catcher.deferring = True
        os.kill(os.getpid(), signal.SIGUSR2)
        with pytest.raises(Interrupted, match="second signal"):
            os.kill(os.getpid(), signal.SIGTERM)
        catcher.deferring = False
        catcher.chain()
    assert requeue_handler == [signal.SIGUSR2]  # submitit still requeues the job


def test_a_signal_outside_the_loops_stops_at_once() -> None:
    with catching_signals() as catcher, pytest.raises(Interrupted) as stopped:
        os.kill(os.getpid(), signal.SIGTERM)
    assert not stopped.value.forced and stopped.value.exit_code == 143 and catcher.signum == signal.SIGTERM
