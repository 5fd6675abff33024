"""hydra/launcher=ray_gpus against a real Ray cluster: a head started by
scripts/ray/start_head.sh (``ray start --head``, two declared GPUs) in a directory of its
own, with an environment that lacks the driver's CAPSNET_DATA_DIR and PYTHONPATH, as a
cluster node's would.  The README's cluster command runs from the repo root as a user would
run it; everything the jobs need from the driver must reach them through the launcher."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.engines

SCRIPTS = ROOT / "scripts" / "ray"
# Not the head's: what the driver has and the head must not (so a job sees it only when the
# launcher passes it on).
DRIVER_ONLY = ("CAPSNET_DATA_DIR", "PYTHONPATH")
SMOKE = [
    "hydra.launcher.jobs_per_gpu=2",
    "profile=smoke",
    "logger=none",
    "figures=false",
    "trainer=cpu",
    "trainer.limit_train_batches=1",
    "data.batch_size=8",
    "data.val_subset=16",
    "data.test_subset=16",
]
TEST_CONFIGS = f"hydra.searchpath=[file://{ROOT / 'tests' / 'configs'}]"


@dataclass
class Head:
    address: str
    dir: Path
    pid: int
    driver_env: dict[str, str]  # what a driver needs to join it (its authentication token)


def _free_ports(count: int) -> int:
    """A port p with p .. p+count-1 free now (the head takes GCS, client, dashboard and
    agent ports there), away from Ray's worker range (10002-19999) and the ephemeral one."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(21000, 29000)
        try:
            for p in range(port, port + count):
                with socket.socket() as probe:
                    probe.bind(("", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no 4 free consecutive ports in 21000-29000")


def _run(script: str, *args: str, env: dict[str, str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPTS / script), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def ray_head() -> Iterator[Head]:
    """A real Ray head for the session, stopped (exactly it) at the end.  A head that cannot
    start fails the tests with its log; it never skips them."""
    # Short: Ray's Unix sockets live under <dir>/ray, and a socket path has at most 107 bytes.
    head_dir = Path(tempfile.mkdtemp(prefix="capsray-", dir="/tmp" if Path("/tmp").is_dir() else None))
    env = {k: v for k, v in os.environ.items() if k not in DRIVER_ONLY and k != "RAY_ADDRESS"}
    env.update(
        RAY=str(Path(sys.executable).parent / "ray"),
        RAY_HEAD_NUM_GPUS="2",
        RAY_HEAD_NUM_CPUS="2",
        RAY_HEAD_OBJECT_STORE_BYTES=str(200 * 2**20),  # a good neighbour on a shared machine
        RAY_USAGE_STATS_ENABLED="0",
    )
    started = time.monotonic()
    start = _run("start_head.sh", str(head_dir), str(_free_ports(4)), env=env, cwd=head_dir)
    try:
        if start.returncode != 0:
            pytest.fail(f"the Ray head did not start (exit {start.returncode}):\n{start.stdout}\n{start.stderr}")
        driver_env = dict(line.split("=", 1) for line in (head_dir / "driver.env").read_text().split())
        head = Head(start.stdout.split()[-1], head_dir, int((head_dir / "head.pid").read_text()), driver_env)
        head_env = Path(f"/proc/{head.pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in head_env if v.split(b"=")[0].decode() in DRIVER_ONLY], "the head has the driver's env"
        print(f"\nRay head {head.address} up in {time.monotonic() - started:.1f} s")
        yield head
    finally:
        if (head_dir / "head.pid").exists():
            stopped = time.monotonic()
            stop = _run("stop_head.sh", str(head_dir), env=env, cwd=head_dir)
            assert stop.returncode == 0, f"could not stop the Ray head of {head_dir}:\n{stop.stdout}\n{stop.stderr}"
            print(f"\nRay head stopped in {time.monotonic() - stopped:.1f} s")
        shutil.rmtree(head_dir, ignore_errors=True)


def _driver_env(head: Head) -> dict[str, str]:
    """The user's shell: CAPSNET_DATA_DIR set, this checkout's code and the tests' probes
    on PYTHONPATH, the head's token (scripts/ray/start_head.sh's driver.env), W&B off."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    env.update(head.driver_env)
    paths = [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in paths if p),
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


def _sweep(head: Head, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """``python src/train.py -m hydra/launcher=ray_gpus hydra.launcher.ray.init.address=<head> ...``
    from the repo root."""
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "src/train.py",
            "-m",
            "hydra/launcher=ray_gpus",
            f"hydra.launcher.ray.init.address={head.address}",
            *args,
        ],
        cwd=ROOT,
        env=_driver_env(head),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    return result, time.monotonic() - started


def _records(sweep_dir: Path) -> dict[int, dict]:
    """Each run's metrics.json by routing.iters, with its run dir."""
    records = {}
    for path in sweep_dir.glob("*/metrics.json"):
        record = json.loads(path.read_text())
        records[record["routing_iters"]] = {**record, "run_dir": path.parent}
    return records


def test_the_readme_cluster_command_fills_the_driver_sweep_dir(ray_head: Head, mnist_dir: Path, tmp_path: Path) -> None:
    relative = f"multirun/test-ray-cluster-{uuid.uuid4().hex[:8]}"  # resolved against the driver's cwd
    sweep_dir = ROOT / relative
    try:
        result, seconds = _sweep(
            ray_head,
            "routing.iters=1,2",
            *SMOKE,
            f"hydra.sweep.dir={relative}",
            TEST_CONFIGS,
            "callbacks=[default,record_env]",  # <run dir>/job_env.json: what each job's process saw
        )
        print(f"\ncluster sweep of 2 jobs: {seconds:.1f} s")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        records = _records(sweep_dir)
        assert sorted(records) == [1, 2], sorted(sweep_dir.iterdir())
        assert all(r["status"] == "completed" for r in records.values()), [r.get("error") for r in records.values()]
        # Nothing landed under the head's working dir (the nodes' cwd).
        assert not list(ray_head.dir.rglob("metrics.json")) and not (ray_head.dir / "multirun").exists()

        seen = [json.loads((r["run_dir"] / "job_env.json").read_text()) for r in records.values()]
        for job in seen:
            # The GPU Ray gave the job (of the two the head declared), as CUDA reads it.
            assert job["cuda_visible_devices"] in ("0", "1") and job["ray_gpu_ids"] == [job["cuda_visible_devices"]]
            assert job["capsnet_data_dir"] == str(mnist_dir)  # only the driver had it
            assert job["cwd"] == str(ROOT)  # the driver's working dir
            assert Path(job["capsnet_file"]).is_relative_to(ROOT / "src")  # this checkout's code
        assert len({job["pid"] for job in seen}) == 2

        table = subprocess.run(
            [sys.executable, "-m", "capsnet.reporting.table", relative, "--out", str(tmp_path / "results")],
            cwd=ROOT,
            env=_driver_env(ray_head),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert table.returncode == 0, table.stderr[-3000:]
        assert "from 2 completed runs" in table.stdout, table.stdout[-2000:]
    finally:
        shutil.rmtree(sweep_dir, ignore_errors=True)


def test_a_worker_killed_mid_job_loses_only_that_job(ray_head: Head, mnist_dir: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    sweep_end = tmp_path / "sweep_end.json"
    result, seconds = _sweep(
        ray_head,
        "routing.iters=1,2,3",  # jobs 0, 1, 2; two run at once (the head declares 2 CPUs)
        *SMOKE,
        f"hydra.sweep.dir={sweep_dir}",
        TEST_CONFIGS,
        "callbacks=[default,kill_r2]",  # routing.iters=2 SIGKILLs its own worker at step 0
        "+hydra.callbacks.sweep_end._target_=apps.hydra_callbacks.SweepEnd",
        f"+hydra.callbacks.sweep_end.path={sweep_end}",
    )
    print(f"\ncluster sweep of 3 jobs, one killed: {seconds:.1f} s")
    # the sweep ran to its end, and its summary says that one job did not complete: exit 1
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "sweep summary: 2 completed, 1 lost" in result.stderr
    assert "job 1 (routing.iters=2" in result.stderr and "lost: WorkerCrashedError" in result.stderr

    records = _records(sweep_dir)
    assert records[1]["status"] == "completed" and records[3]["status"] == "completed"
    assert records.get(2, {}).get("status") != "completed"

    killed_dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and "routing.iters=2" in p.name]
    assert len(killed_dirs) == 1
    lost = json.loads((sweep_dir / "jobs" / "1.json").read_text())
    assert lost["job"] == 1 and lost["status"] == "lost"
    assert "routing.iters=2" in lost["overrides"]
    assert lost["run_dir"] == str(killed_dirs[0])
    assert lost["reason"].startswith("WorkerCrashedError: The worker died"), lost["reason"]
    others = {p.name: json.loads(p.read_text())["status"] for p in (sweep_dir / "jobs").glob("*.json")}
    assert others == {"0.json": "completed", "1.json": "lost", "2.json": "completed"}

    starts = (sweep_dir / "kill_r2_starts.log").read_text().split()
    assert len(starts) == 1, starts  # Ray did not retry the killed job
    assert json.loads(sweep_end.read_text()) == {"sweep_dir": str(sweep_dir)}  # the sweep ended normally
