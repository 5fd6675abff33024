"""hydra/launcher=ray_gpus: Ray started with declared GPUs on this GPU-less machine places
every job of a sweep on a GPU share, never over-fills a GPU, and starts a job as soon as a
share is free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

pytestmark = pytest.mark.engines

APP = ROOT / "tests" / "apps" / "timed_job.py"
RAY_INIT = ["+hydra.launcher.ray.init.num_gpus=2", "+hydra.launcher.ray.init.num_cpus=8"]


def _sweep(tmp_path: Path, jobs: int, jobs_per_gpu: int, *extra: str) -> tuple[subprocess.CompletedProcess, list]:
    records = tmp_path / "records"
    records.mkdir()
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
    }
    result = subprocess.run(
        [
            sys.executable,
            str(APP),
            "-m",
            f"job=range(0,{jobs})",
            f"record_dir={records}",
            f"hydra.searchpath=[file://{ROOT / 'conf'}]",
            f"hydra.launcher.jobs_per_gpu={jobs_per_gpu}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *extra,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return result, [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]


def _wait_while_free(jobs: list[dict], capacity: int, gpus: int, dt: float = 0.01) -> float:
    """Seconds during which some job had not started although a GPU share was free."""
    t, end, waited = min(j["start"] for j in jobs), max(j["end"] for j in jobs), 0.0
    while t < end:
        pending = any(j["start"] > t for j in jobs)
        running = sum(j["start"] <= t < j["end"] for j in jobs)
        if pending and running < capacity * gpus:
            waited += dt
        t += dt
    return waited


def _most_at_once(jobs: list[dict], gpu: str) -> int:
    on_gpu = [j for j in jobs if j["cuda_visible_devices"] == gpu]
    return max(sum(o["start"] <= j["start"] < o["end"] for o in on_gpu) for j in on_gpu)


@pytest.mark.parametrize("jobs_per_gpu", [1, 2])
def test_ray_places_jobs_on_free_gpu_shares(tmp_path: Path, jobs_per_gpu: int) -> None:
    result, jobs = _sweep(tmp_path, 8, jobs_per_gpu, *RAY_INIT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(jobs) == 8
    for job in jobs:  # each job sees exactly the device Ray gave it
        assert job["cuda_visible_devices"] in ("0", "1") and job["ray_gpu_ids"] == [job["cuda_visible_devices"]]
    assert len({j["pid"] for j in jobs}) == 8  # a fresh process per job: CUDA reads its device list anew
    most = {gpu: _most_at_once(jobs, gpu) for gpu in ("0", "1")}
    assert max(most.values()) == jobs_per_gpu, most  # filled to, never over, jobs_per_gpu
    waited = _wait_while_free(jobs, jobs_per_gpu, gpus=2)
    # A free share is taken within Ray's start of a fresh worker process (about a second here).
    assert waited < 2.0 * len(jobs), waited
    print(
        f"jobs_per_gpu={jobs_per_gpu}: most jobs at once per GPU {most}; waited while a share was free {waited:.2f} s"
    )


def test_no_gpu_at_all_is_refused_instead_of_waiting_forever(tmp_path: Path) -> None:
    result, jobs = _sweep(tmp_path, 2, 1, "+hydra.launcher.ray.init.num_gpus=0", "+hydra.launcher.ray.init.num_cpus=2")
    assert result.returncode != 0 and "Ray sees none here" in result.stderr and not jobs


def test_a_lost_job_is_recorded_and_the_others_finish(tmp_path: Path) -> None:
    """One job's worker is SIGKILLed, another job calls sys.exit(2): the sweep goes on, both
    are recorded as lost with their reason, neither is retried, and the sweep's end-of-run
    callbacks run."""
    sweep_end = tmp_path / "sweep_end.json"
    result, jobs = _sweep(
        tmp_path,
        5,
        1,
        *RAY_INIT,
        "kill_job=1",
        "exit_job=2",
        "+hydra.callbacks.sweep_end._target_=apps.hydra_callbacks.SweepEnd",
        f"+hydra.callbacks.sweep_end.path={sweep_end}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(j["job"] for j in jobs) == [0, 3, 4]  # the others ran to their end
    starts = sorted(p.name.split(".")[0] for p in (tmp_path / "records").glob("*.start"))
    assert starts == ["job0", "job1", "job2", "job3", "job4"]  # each job started once: no retry
    sweep_dir = tmp_path / "sweep"
    lost = {p.name: json.loads(p.read_text()) for p in (sweep_dir / "jobs").glob("*.json")}
    assert sorted(lost) == ["1.json", "2.json"]
    killed, exited = lost["1.json"], lost["2.json"]
    assert killed["job"] == 1 and killed["status"] == "lost" and "job=1" in killed["overrides"]
    assert killed["reason"].startswith("WorkerCrashedError: The worker died"), killed["reason"]
    assert exited["job"] == 2 and exited["status"] == "lost"
    assert exited["reason"] == "JobExit: the job ended its process with sys.exit(2) instead of returning"
    assert killed["run_dir"] == str(sweep_dir / "1") and Path(killed["run_dir"]).is_dir()  # Hydra's subdir: the job num
    assert json.loads(sweep_end.read_text()) == {"sweep_dir": str(sweep_dir)}
    assert "2 of 5 jobs were lost" in result.stdout


def test_training_sweep_under_ray(tmp_path: Path, mnist_dir: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "train.py",
        "-m",
        "hydra/launcher=ray_gpus",
        "hydra.launcher.jobs_per_gpu=2",
        *RAY_INIT,
        "trainer=cpu",
        "routing.iters=1,2",
        "profile=smoke",
        "logger=none",
        "figures=false",
        "trainer.limit_train_batches=1",
        "data.batch_size=8",
        "data.val_subset=16",
        "data.test_subset=16",
        f"paths.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")]
    assert sorted(r["routing_iters"] for r in records) == [1, 2]
    assert all(r["status"] == "completed" for r in records)
