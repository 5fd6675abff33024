"""Nothing lost, proven by fault injection: a real training run is killed at each phase,
the same command is run again, and the run dir must then hold what an uninterrupted run
holds (deterministic=true: the same steps, scores and bit-identical weights), with the
record describing the weights on disk, each epoch and step logged once, and nothing left
in ``$TMPDIR``.  The run dir lives on a tmpfs (/dev/shm) and ``$TMPDIR`` on the disk, the
layout of a cluster whose outputs are on another file system than the node's /tmp.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from capsnet.run.rundir import DIGEST_KEY, LOCK_FILE, TMP_MARK, load_checkpoint_file
from conftest import ROOT

pytestmark = pytest.mark.faults

SHM = Path("/dev/shm")
ARGS = [
    "profile=smoke",
    "trainer=cpu",
    "logger=csv",
    "hydra.searchpath=[file://tests/configs]",
    "model=capsnet_small",
    "deterministic=true",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "data.batch_size=8",
    "data.val_subset=48",
    "data.eval_batch_size=16",
    "data.test_subset=32",
    "checkpoint.every_n_steps=2",
    "trainer.log_every_n_steps=1",
    "figures=true",
]
STEPS = 12  # 2 epochs of 6 steps


def _env(tmpdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "TMPDIR": str(tmpdir),
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])),
    }


def train(run_dir: Path, tmpdir: Path, mnist_dir: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The user's command, in a subprocess, with its own $TMPDIR."""
    return subprocess.run(
        [sys.executable, "src/train.py", *ARGS, f"paths.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}", *extra],
        cwd=ROOT,
        env=_env(tmpdir),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A fresh folder on the tmpfs, removed afterwards."""
    path = SHM / f"capsnet-faults-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> dict:
    """An uninterrupted run of the same command: what every rerun must reproduce."""
    base = tmp_path_factory.mktemp("reference")
    (base / "tmp").mkdir()
    result = train(base / "run", base / "tmp", mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return snapshot(base / "run")


def snapshot(run_dir: Path) -> dict:
    """What the invariants compare: record, history, step log, final weights."""
    record = json.loads((run_dir / "metrics.json").read_text())
    with (run_dir / "history.csv").open() as handle:
        history = list(csv.DictReader(handle))
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        steps = [row for row in csv.DictReader(handle)]
    last = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    best = load_checkpoint_file(run_dir / "checkpoints" / "best.ckpt")
    best_state = next(v for k, v in best["callbacks"].items() if k.startswith("RunDirCheckpoint"))
    return {
        "record": record,
        "history": history,
        "train_steps": sorted(int(r["step"]) for r in steps if r.get("train/loss_step")),
        "val_rows": sorted(int(r["step"]) for r in steps if r.get("val/error")),
        "weights": last["state_dict"],
        "best_score": float(best_state["best_model_score"]),
        "best_step": best["global_step"],
    }


def check_invariants(run_dir: Path, tmpdir: Path, reference: dict) -> dict:
    """Item 2 of the reliability contract, after the rerun."""
    got = snapshot(run_dir)
    record, ref = got["record"], reference["record"]
    assert record["status"] == "completed", record
    assert record["steps"] == ref["steps"] == STEPS
    assert record["val_error"] == ref["val_error"] == got["best_score"], "the record must describe best.ckpt"
    assert record["test_error"] == ref["test_error"]
    assert got["best_step"] == reference["best_step"]
    # each epoch once, with the reference's scores; wall time grows over every segment
    assert [r["epoch"] for r in got["history"]] == ["0", "1"]
    assert [r["val_error"] for r in got["history"]] == [r["val_error"] for r in reference["history"]]
    walls = [float(r["wall_time_s"]) for r in got["history"]]
    assert 0 < walls[0] < walls[1] <= record["wall_time_s"]
    # the step log spans every segment, each step once
    assert got["train_steps"] == reference["train_steps"] == list(range(STEPS))
    assert got["val_rows"] == reference["val_rows"]
    for name, tensor in reference["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, rtol=0, atol=0, msg=name)
    # nothing half-written is left anywhere, and nothing at all in $TMPDIR
    assert not [p for p in run_dir.rglob("*") if TMP_MARK in p.name], "temporary files left in the run dir"
    assert not list(tmpdir.iterdir()), f"left in $TMPDIR: {list(tmpdir.iterdir())}"
    return got


PHASES = {
    # phase: the probe that kills the first attempt (SIGKILL: no handler runs)
    "inside a training step": ["+callbacks.kill._target_=apps.probes.KillAt", "+callbacks.kill.phase=train_step",
                               "+callbacks.kill.step=3"],
    "during a checkpoint write": ["+callbacks.kill._target_=apps.probes.KillInCheckpointWrite",
                                  "+callbacks.kill.step=3"],
    "during epoch 0's validation": ["+callbacks.kill._target_=apps.probes.KillAt", "+callbacks.kill.phase=validation",
                                    "+callbacks.kill.epoch=0", "+callbacks.kill.batch=1"],
    "during the last epoch's validation": ["+callbacks.kill._target_=apps.probes.KillAt",
                                           "+callbacks.kill.phase=validation", "+callbacks.kill.epoch=1",
                                           "+callbacks.kill.batch=1"],
    "during test": ["+callbacks.kill._target_=apps.probes.KillAt", "+callbacks.kill.phase=test",
                    "+callbacks.kill.batch=0"],
    "during figures": ["+callbacks.kill._target_=apps.probes.KillInFigures"],
    "during the record write": ["+callbacks.kill._target_=apps.probes.KillInRecordWrite"],
}  # fmt: skip


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_kill_at_each_phase_then_the_same_command_ends_as_an_uninterrupted_run(
    phase: str, reference: dict, shm_dir: Path, tmp_path: Path, mnist_dir: Path
) -> None:
    run_dir, tmpdir = shm_dir / "run", tmp_path / "tmp"
    tmpdir.mkdir()
    killed = train(run_dir, tmpdir, mnist_dir, *PHASES[phase])
    assert killed.returncode == -signal.SIGKILL, f"the probe did not kill the run: {killed.stderr[-2000:]}"
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "running", "a killed run must never look finished"
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():  # whatever the kill cut, the checkpoint on disk is whole
        assert DIGEST_KEY in load_checkpoint_file(last)
    at_kill = _step(last)
    rerun = train(run_dir, tmpdir, mnist_dir)  # the same command, without the probe (not in the signature)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_invariants(run_dir, tmpdir, reference)
    print(f"{phase}: killed with last.ckpt at step {at_kill}; the rerun resumed from there and matched")


def _step(path: Path) -> str:
    return str(load_checkpoint_file(path)["global_step"]) if path.exists() else "none"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_the_current_step_record_interrupted_and_exit_non_zero(
    signum: int, code: int, reference: dict, shm_dir: Path, tmp_path: Path, mnist_dir: Path
) -> None:
    run_dir, tmpdir = shm_dir / "run", tmp_path / "tmp"
    tmpdir.mkdir()
    stopped = train(
        run_dir, tmpdir, mnist_dir, "+callbacks.sig._target_=apps.probes.SignalSelfAt", "+callbacks.sig.step=3",
        f"+callbacks.sig.signum={int(signum)}",
    )  # fmt: skip
    assert stopped.returncode == code, stopped.stderr[-2000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["signal"] == signal.Signals(signum).name
    assert record["steps"] == 4 and "stopped by" in record["error"]
    # the signal came as step 3 started: the run finished that step and saved it
    assert load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4
    rerun = train(run_dir, tmpdir, mnist_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_invariants(run_dir, tmpdir, reference)


def test_a_signal_from_outside_stops_a_running_job_promptly(shm_dir: Path, tmp_path: Path, mnist_dir: Path) -> None:
    """SIGTERM as a scheduler sends it: from another process, at no particular moment."""
    run_dir, tmpdir = shm_dir / "run", tmp_path / "tmp"
    tmpdir.mkdir()
    command = [sys.executable, "src/train.py", *ARGS, f"paths.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}",
               "trainer.max_epochs=50", "+callbacks.slow._target_=apps.probes.SlowSteps", "+callbacks.slow.seconds=0.5"]  # fmt: skip
    log = (tmp_path / "stderr.txt").open("w+")
    process = subprocess.Popen(command, cwd=ROOT, env=_env(tmpdir), stdout=subprocess.DEVNULL, stderr=log)
    _wait_for((run_dir / "checkpoints" / "last.ckpt").exists, process, timeout=300)
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    waited = time.time() - sent
    log.seek(0)
    assert process.returncode == 143, log.read()[-2000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["signal"] == "SIGTERM"
    saved = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert saved == record["steps"], "last.ckpt holds the step the run stopped at"
    assert waited < 30, f"took {waited:.1f} s to stop"
    print(f"SIGTERM from outside: stopped after {waited:.2f} s at step {saved}")


def _wait_for(condition, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended early (exit {process.returncode})"
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_two_processes_on_one_run_dir_exactly_one_trains(
    reference: dict, shm_dir: Path, tmp_path: Path, mnist_dir: Path
) -> None:
    """The same command twice at once (a rerun while a driver's job still runs): the second
    stops at once, naming the first, which trains on undisturbed."""
    run_dir, tmpdir, go = shm_dir / "run", tmp_path / "tmp", tmp_path / "go"
    tmpdir.mkdir()
    hold = ["+callbacks.hold._target_=apps.probes.WaitForFile", "+callbacks.hold.step=3", f"+callbacks.hold.path={go}"]
    command = [sys.executable, "src/train.py", *ARGS, f"paths.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}", *hold]
    log = (tmp_path / "stderr.txt").open("w+")
    first = subprocess.Popen(command, cwd=ROOT, env=_env(tmpdir), stdout=subprocess.DEVNULL, stderr=log)
    _wait_for((tmp_path / "go.waiting").exists, first, timeout=300)  # the first is mid-training
    second = train(run_dir, tmpdir, mnist_dir, *hold)
    go.touch()
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"pid {first.pid} on host" in second.stderr and "in use by another job" in second.stderr
    assert first.wait(timeout=600) == 0, log.seek(0) or log.read()[-2000:]
    got = check_invariants(run_dir, tmpdir, reference)  # as if the second had never been started
    assert "resumed_from" not in got["record"]


def test_a_dead_holders_lock_is_taken_over_with_a_message(
    reference: dict, shm_dir: Path, tmp_path: Path, mnist_dir: Path
) -> None:
    run_dir, tmpdir = shm_dir / "run", tmp_path / "tmp"
    tmpdir.mkdir()
    killed = train(run_dir, tmpdir, mnist_dir, *PHASES["inside a training step"])
    assert killed.returncode == -signal.SIGKILL
    holder = json.loads((run_dir / LOCK_FILE).read_text())
    assert "released" not in holder  # it died holding the lock
    rerun = train(run_dir, tmpdir, mnist_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    said = rerun.stdout + rerun.stderr
    assert f"from pid {holder['pid']} on host {holder['host']}" in said and "no longer running" in said
    check_invariants(run_dir, tmpdir, reference)


def _mount_tmpfs(path: Path, size_mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=False).returncode
        == 0
    )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 45 MB tmpfs: room for two checkpoints of capsnet_small (about 20 MB each), not three."""
    mountpoint = tmp_path / "disk"
    if not _mount_tmpfs(mountpoint, 45):
        pytest.fail("mounting a tmpfs needs root (CAP_SYS_ADMIN): the full-disk tests run as root in CI")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_full_disk_fails_the_run_with_whole_files_and_the_rerun_completes(
    reference: dict, small_disk: Path, tmp_path: Path, mnist_dir: Path
) -> None:
    run_dir, tmpdir = small_disk / "run", tmp_path / "tmp"
    tmpdir.mkdir()
    full = train(run_dir, tmpdir, mnist_dir)
    assert full.returncode == 1, full.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "failed" and "No space left on device" in record["error"], record
    last = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")  # whole, checksum verified
    assert not [p for p in run_dir.rglob("*") if TMP_MARK in p.name] and not list(tmpdir.iterdir())
    subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)
    rerun = train(run_dir, tmpdir, mnist_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_invariants(run_dir, tmpdir, reference)
    print(f"full disk: failed at step {record['steps']} with last.ckpt whole at step {last['global_step']}")


def test_a_checkpoint_dir_turned_read_only_fails_the_run_clearly_and_the_rerun_completes(
    reference: dict, shm_dir: Path, tmp_path: Path, mnist_dir: Path
) -> None:
    run_dir, tmpdir = shm_dir / "run", tmp_path / "tmp"
    tmpdir.mkdir()
    folder = run_dir / "checkpoints"
    try:
        stopped = train(
            run_dir, tmpdir, mnist_dir, "+callbacks.ro._target_=apps.probes.ReadOnlyAt", "+callbacks.ro.step=3",
            f"+callbacks.ro.folder={folder}",
        )  # fmt: skip
        assert stopped.returncode == 1, stopped.stderr[-3000:]
        record = json.loads((run_dir / "metrics.json").read_text())
        assert record["status"] == "failed" and "Read-only file system" in record["error"], record
        assert load_checkpoint_file(folder / "last.ckpt")["global_step"] == 2  # the last one written, whole
    finally:
        subprocess.run(["umount", str(folder)], check=False)
    assert not [p for p in run_dir.rglob("*") if TMP_MARK in p.name] and not list(tmpdir.iterdir())
    rerun = train(run_dir, tmpdir, mnist_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_invariants(run_dir, tmpdir, reference)
