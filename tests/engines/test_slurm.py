"""hydra/launcher=slurm on a real SLURM cluster: the user's command, ``python src/train.py -m
hydra/launcher=slurm ...``, submitted through Hydra's submitit launcher to a single-node
cluster with two (fake) GPUs and accounting (scripts/slurm/start.sh).

Uses the cluster that ``SLURM_CONF`` names; without it, starts one with scripts/slurm/start.sh
(``CAPSNET_SLURM_DIR``, default /tmp/capsnet-slurm) and stops it at the end.  A cluster that
cannot start fails the tests with the reason.  Run with ``pytest -m engines tests/engines/test_slurm.py``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.engines

SCRIPTS = ROOT / "scripts" / "slurm"
# Smoke scale: a few steps on tiny subsets, on the CPU (the GPUs are SLURM's bookkeeping only).
SMOKE = [
    "profile=smoke",
    "logger=none",
    "figures=false",
    "trainer=cpu",
    "data.batch_size=8",
    "data.val_subset=32",
    "data.test_subset=32",
]
# conf/hydra/launcher/slurm.yaml asks for 8 CPUs and 32 GB per job: more than this node has.
FITS_THIS_NODE = ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]
PROBE = "apps.probes"


def _slurm(*args: str, timeout: float = 60) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _cluster_info() -> dict[str, object]:
    """The default partition (marked * by sinfo) and how many GPUs its node(s) declare."""
    try:
        rows = [r.split() for r in _slurm("sinfo", "-h", "-o", "%P %G").splitlines()]
    except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as error:
        pytest.fail(f"the SLURM cluster of SLURM_CONF={os.environ.get('SLURM_CONF')} does not answer: {error}")
    default = [r for r in rows if r[0].endswith("*")]
    if not default:
        pytest.fail(f"the SLURM cluster has no default partition: sinfo says {rows}")
    partition, gres = default[0][0].rstrip("*"), default[0][1]  # e.g. "capsnet*", "gpu:2"
    gpus = sum(int(m) for m in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
    if gpus < 1:
        pytest.fail(f"partition {partition} declares no GPU (gres {gres}): see scripts/slurm/start.sh")
    return {"partition": partition, "gpus": gpus}


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, object]]:
    """The running cluster (``SLURM_CONF``), else one started here and stopped at the end."""
    cluster_dir = os.environ.get("CAPSNET_SLURM_DIR", "/tmp/capsnet-slurm")
    saved = os.environ.get("SLURM_CONF")
    started = False
    try:
        if not saved:
            began = time.time()
            result = subprocess.run(
                ["bash", str(SCRIPTS / "start.sh"), cluster_dir],
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            if result.returncode != 0:
                pytest.fail(f"scripts/slurm/start.sh could not start the SLURM cluster:\n{result.stderr[-4000:]}")
            started = "already running" not in result.stderr
            line = result.stdout.strip().splitlines()[-1]
            assert line.startswith("export SLURM_CONF="), result.stdout
            os.environ["SLURM_CONF"] = line.removeprefix("export SLURM_CONF=")
            print(f"\nSLURM cluster {'started' if started else 'reused'} in {time.time() - began:.1f} s")
        yield _cluster_info()
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        if started:
            result = subprocess.run(
                ["bash", str(SCRIPTS / "stop.sh"), cluster_dir],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert result.returncode == 0, f"scripts/slurm/stop.sh failed:\n{result.stderr[-3000:]}"


def _env() -> dict[str, str]:
    """The environment of a user's command: src/ and tests/ (the probes) on the path; sbatch
    passes it on to every job."""
    path = [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join(filter(None, path))}


def _train(*overrides: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python src/train.py <overrides>``, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), *overrides],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _sweep(name: str, *overrides: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess[str], Path, float]:
    """A sweep under hydra/launcher=slurm, its jobs named ``name``; returns the driver's
    result, the sweep dir it named, and its seconds.  The driver returns once every job has
    written its result; this waits until SLURM has seen them end too (up to 60 s), and
    cancels what is left when the driver failed or did not end in time."""
    began = time.time()
    finished = False
    try:
        result = _train("-m", "hydra/launcher=slurm", f"hydra.launcher.name={name}", *overrides, timeout=timeout)
        deadline = time.time() + 60
        while _slurm("squeue", "-h", f"--name={name}", "-o", "%i").strip() and time.time() < deadline:
            time.sleep(1)
        finished = result.returncode == 0
    finally:
        if not finished:
            subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=60, check=False)
    seconds = time.time() - began
    output = result.stdout + result.stderr
    named = re.search(r"Submitit 'slurm' sweep output dir : (\S+)", output)
    assert named, f"the driver named no sweep dir:\n{output[-3000:]}"
    return result, Path(named.group(1)), seconds


def _accounting(job_ids: list[str]) -> list[dict[str, str]]:
    """sacct's allocation records of these jobs, every attempt of a requeued job included."""
    fields = ["JobID", "State", "Start", "End", "AllocTRES"]
    out = _slurm("sacct", "-X", "-D", "-n", "-P", "-j", ",".join(job_ids), "-o", ",".join(fields))
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line]


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The most half-open intervals [start, end) that hold one instant."""
    return max(sum(s <= start < e for s, e in intervals) for start, _ in intervals)


def _records(path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(path.glob("*.json"))]


def _job_ids(sweep_dir: Path) -> list[str]:
    """The SLURM job ids submitit used (its folders in <sweep dir>/.submitit)."""
    return sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir())


def test_sweep_runs_one_job_per_gpu_and_every_run_reaches_the_table(
    slurm_cluster: dict, mnist_dir: Path, tmp_path: Path
) -> None:
    gpus = int(slurm_cluster["gpus"])
    jobs = gpus + 1  # more jobs than GPUs: one must wait for a free GPU
    seeds = ",".join(str(s) for s in range(jobs))
    records = tmp_path / "records"
    result, sweep_dir, seconds = _sweep(
        f"capsnet-test-{uuid.uuid4().hex[:8]}",
        f"hydra.launcher.partition={slurm_cluster['partition']}",
        *FITS_THIS_NODE,
        "hydra.launcher.timeout_min=20",
        *SMOKE,
        "trainer.limit_train_batches=4",
        f"seed={seeds}",
        f"+callbacks.job_record._target_={PROBE}.JobRecord",
        f"+callbacks.job_record.path={records}",
        f"paths.data_dir={mnist_dir}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert sweep_dir == tmp_path / "sweep"

    # Every job completed and wrote its record in the sweep dir the driver named.
    metrics = [json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")]
    assert sorted(m["seed"] for m in metrics) == list(range(jobs)), [m.get("seed") for m in metrics]
    assert all(m["status"] == "completed" for m in metrics), [(m["seed"], m.get("error")) for m in metrics]
    assert all(m["steps"] == 4 for m in metrics)

    # The table finds every run.
    table = subprocess.run(
        [sys.executable, "-m", "capsnet.reporting.table", str(sweep_dir), "--out", str(tmp_path / "table")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert table.returncode == 0, table.stderr[-3000:]
    assert f"from {jobs} completed runs" in table.stdout, table.stdout[-2000:]
    with (tmp_path / "table" / "table1.csv").open() as handle:
        cell = [r for r in csv.DictReader(handle) if r["model"] == "CapsNet" and r["routing"] == "3"]
    assert [r["mnist_n"] for r in cell if r["reconstruction"] == "yes"] == [str(jobs)]

    # Each job ran once, as its own SLURM job, on the one GPU SLURM gave it.
    probes = _records(records)
    assert len(probes) == jobs and len({p["slurm_job_id"] for p in probes}) == jobs, probes
    assert sorted(int(p["slurm_array_task_id"]) for p in probes) == list(range(jobs))
    for probe in probes:
        assert probe["cuda_visible_devices"] in {str(g) for g in range(gpus)}, probe
        assert probe["cuda_visible_devices"] == probe["slurm_job_gpus"], probe
        assert probe["end"] is not None and probe["restart_count"] == 0, probe
    # Jobs that ran at the same time never shared a GPU.
    for a in probes:
        for b in probes:
            if a is not b and a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["cuda_visible_devices"] != b["cuda_visible_devices"], (a, b)

    # Never more jobs at once than GPUs, by SLURM's accounting (whole allocations) and by
    # the jobs' own clocks; and the GPUs were used side by side.
    accounting = _accounting(_job_ids(sweep_dir))
    assert len(accounting) == jobs and all(r["State"] == "COMPLETED" for r in accounting), accounting
    assert all("gres/gpu=1" in r["AllocTRES"] for r in accounting), accounting
    allocations = [(_seconds(r["Start"]), _seconds(r["End"])) for r in accounting]
    running = [(p["start"], p["end"]) for p in probes]
    assert _most_at_once(allocations) == gpus, accounting
    assert _most_at_once(running) <= gpus, running
    span = max(e for _, e in allocations) - min(s for s, _ in allocations)
    print(
        f"\n{jobs} jobs on {gpus} GPUs: driver {seconds:.0f} s, allocations over {span:.0f} s, "
        f"most at once {_most_at_once(allocations)} (allocations) / {_most_at_once(running)} (training)"
    )


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def test_job_at_its_time_limit_is_requeued_and_resumes_to_the_same_result(
    slurm_cluster: dict, mnist_dir: Path, tmp_path: Path
) -> None:
    # Deterministic, 20 steps, a checkpoint every 2.  Under SLURM the run sleeps 8 s before
    # each step after the first until it has resumed, so its first attempt (over 150 s)
    # outlasts the 2-minute limit.  SLURM checks limits every 30 s and signals early rather
    # than late: with signal_delay_s=5 the warning (SIGUSR2) comes 85-115 s in, and the
    # stop must reach the end of a step before the limit's SIGTERM, when a requeue is still
    # possible (`scontrol requeue` fails on a job SLURM is already ending).  Short slow steps
    # leave that margin on a loaded machine (with 20 s steps the warning came 30 s before
    # the limit and the step in progress outlasted it), and the resumed attempt (start-up
    # and the remaining fast steps) time to finish.
    run = [
        *SMOKE,
        "deterministic=true",
        "trainer.limit_train_batches=20",
        "checkpoint.every_n_steps=2",
        f"paths.data_dir={mnist_dir}",
    ]
    reference_dir, reference_log = tmp_path / "reference", tmp_path / "reference.log"
    # The uninterrupted reference trains here, meanwhile.
    with reference_log.open("w") as log:
        reference = subprocess.Popen(
            [sys.executable, str(ROOT / "src" / "train.py"), *run, f"hydra.run.dir={reference_dir}"],
            cwd=ROOT,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    records = tmp_path / "records"
    try:
        result, sweep_dir, seconds = _sweep(
            f"capsnet-test-{uuid.uuid4().hex[:8]}",
            f"hydra.launcher.partition={slurm_cluster['partition']}",
            *FITS_THIS_NODE,
            "hydra.launcher.timeout_min=2",
            "hydra.launcher.signal_delay_s=5",
            "hydra.launcher.max_num_timeout=4",
            *run,
            "seed=0",
            f"+callbacks.slow._target_={PROBE}.SlowUntilResumed",
            "+callbacks.slow.seconds=8",
            f"+callbacks.job_record._target_={PROBE}.JobRecord",
            f"+callbacks.job_record.path={records}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        )
        reference.wait(timeout=600)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    assert reference.returncode == 0, reference_log.read_text()[-3000:]
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    # SLURM stopped the job at its time limit, submitit requeued it, and the job finished.
    (job_id,) = _job_ids(sweep_dir)
    attempts = _accounting([job_id])
    assert [r["State"] for r in attempts[:-1]] == ["REQUEUED"] * (len(attempts) - 1), attempts
    assert len(attempts) >= 2 and attempts[-1]["State"] == "COMPLETED", attempts
    submitit_log = "".join(p.read_text() for p in (sweep_dir / ".submitit" / job_id).glob("*_log.*"))
    requeues = set(re.findall(rf"Requeued job {job_id} \((\d+) remaining timeouts\)", submitit_log))
    assert len(requeues) == len(attempts) - 1, submitit_log[-3000:]
    # The attempt that finished is the last one, and it resumed.  (An attempt cut before it
    # built its trainer leaves no record.)
    probes = sorted(_records(records), key=lambda p: p["restart_count"])
    assert {p["slurm_job_id"] for p in probes} == {job_id}, probes
    assert probes[-1]["restart_count"] == len(attempts) - 1 and probes[-1]["end"] is not None, probes
    assert probes[-1]["resumed"], "the last attempt did not resume from a checkpoint"

    # ...from last.ckpt, to what the uninterrupted run reached: metrics and every weight.
    (run_dir,) = [p.parent for p in sweep_dir.glob("*/metrics.json")]
    resumed = json.loads((run_dir / "metrics.json").read_text())
    expected = json.loads((reference_dir / "metrics.json").read_text())
    assert resumed["status"] == "completed", resumed.get("error")
    assert resumed.get("resumed_from") == str(run_dir / "checkpoints" / "last.ckpt"), resumed.get("resumed_from")
    assert "resumed_from" not in expected
    for key in ("steps", "epochs", "val_error", "test_error", "val_examples", "test_examples"):
        assert resumed[key] == expected[key], key
    assert resumed["steps"] == 20
    reference_weights, resumed_weights = _final_weights(reference_dir), _final_weights(run_dir)
    assert resumed_weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=0, msg=name)
    cut_at = {p["restart_count"]: p.get("last_step") for p in probes[:-1]}
    print(
        f"\nrequeued {len(attempts) - 1}x (attempt: last step before the cut {cut_at}); "
        f"driver {seconds:.0f} s; attempts {[(r['State'], r['Start'][11:], r['End'][11:]) for r in attempts]}"
    )


def test_the_docs_slurm_commands_on_the_cluster(
    slurm_cluster: dict[str, object], tmp_path: Path, mnist_dir: Path
) -> None:
    """The SLURM commands of README.md and docs/, verbatim, on the real cluster (whose GPU
    partition is called gpu, as the docs' commands say), at smoke scale through the docs
    workspace's per-user config: each exits 0, and the detached one finishes in the background
    with every job completed."""
    from docs_workspace import PAGES, commands, workspace

    wanted = [c for page in PAGES for c in commands(page) if "slurm" in c]
    assert len(wanted) == 3, wanted
    work, env = workspace(tmp_path, mnist_dir)
    env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    for command in wanted:
        started = time.time()
        result = subprocess.run(
            ["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=1800, check=False
        )
        assert result.returncode == 0, (
            f"`{command}` exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
        if "DETACH=1" in command:
            (log,) = (work / "multirun").glob("reproduce-*.log")
            deadline = time.time() + 1500
            while "reproduce-table:" not in log.read_text() and time.time() < deadline:
                time.sleep(5)
            text = log.read_text()
            assert "table1: every job completed" in text and "multimnist: every job completed" in text, text[-3000:]
        print(f"{command}: {time.time() - started:.0f} s")
    records = [json.loads(p.read_text()) for p in (work / "multirun").rglob("metrics.json")]
    assert records and all(r["status"] in ("completed", "skipped") for r in records), records
