"""CUDA checks: make test-gpu (pytest -m gpu).  Each test is skipped, with its reason, without a GPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from capsnet.nn.routing.dynamic import dynamic_routing
from capsnet.run.training import run
from conftest import run_cli

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA GPUs")
pytestmark = [pytest.mark.gpu, needs_cuda]


def test_routing_on_cuda_matches_cpu() -> None:
    u_hat = torch.randn(8, 1152, 10, 16, dtype=torch.float64)
    v_cpu, c_cpu = dynamic_routing(u_hat, 3)
    v_gpu, c_gpu = dynamic_routing(u_hat.cuda(), 3)
    torch.testing.assert_close(v_gpu.cpu(), v_cpu)
    torch.testing.assert_close(c_gpu.cpu(), c_cpu)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_training_on_gpu(precision: str, make_cfg) -> None:
    cfg = make_cfg(
        "trainer=gpu",
        f"trainer.precision={precision}",
        "data.train_subset=2048",
        "trainer.limit_train_batches=null",
        "data.val_subset=500",
    )
    record = run(cfg)
    assert record["status"] == "completed", record
    assert record["val_error"] < 0.9


@pytest.mark.parametrize("data", ["mnist", "multimnist"])
def test_steady_training_steps_never_sync(make_cfg, data: str) -> None:
    """Under torch.cuda.set_sync_debug_mode("error"), any sync in steps 3..39 raises."""
    cfg = make_cfg(
        "trainer=gpu",
        f"data={data}",
        "data.batch_size=128",
        "data.train_subset=5120",
        "trainer.limit_train_batches=40",
        "data.val_subset=256",
        "data.test_subset=256",
        "nan_check_every=1000",
        "trainer.log_every_n_steps=1000",
        "checkpoint.every_n_steps=1000",
        "figures=false",
        "+callbacks.sync._target_=apps.probes.SyncDebugAfter",
        "+callbacks.sync.step=3",
    )
    record = run(cfg)
    assert record["status"] == "completed", record
    assert record["steps"] == 40


def test_two_jobs_share_one_gpu_under_ray(tmp_path: Path, mnist_dir: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "train.py",
        "-m",
        "hydra/launcher=ray_gpus",
        "hydra.launcher.jobs_per_gpu=2",
        "trainer=gpu",
        "routing.iters=1,3",
        "profile=smoke",
        "logger=none",
        "figures=false",
        f"paths.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")]
    assert sorted(r["routing_iters"] for r in records) == [1, 3]
    assert all(r["status"] == "completed" for r in records)


@needs_two
def test_ddp_on_two_gpus_counts_every_test_example_once(tmp_path: Path, mnist_dir: Path) -> None:
    run_dir = tmp_path / "ddp"
    result = run_cli(
        "train.py",
        "trainer=ddp",
        "trainer.devices=2",
        "profile=smoke",
        "logger=none",
        "data.test_subset=999",
        f"paths.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["world_size"] == 2 and record["test_examples"] == 999


def test_seconds_per_epoch_of_profile_fast(tmp_path: Path, mnist_dir: Path) -> None:
    """One epoch of the fast profile, CapsNet r3 + recon; prints seconds per epoch."""
    run_dir = tmp_path / "fast"
    started = time.time()
    result = run_cli(
        "train.py",
        "profile=fast",
        "trainer=gpu",
        "trainer.max_epochs=1",
        "logger=csv",
        "figures=false",
        f"paths.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    print(
        f"\nGPU {torch.cuda.get_device_name()}: profile=fast r3+recon, one epoch of {record['steps']} steps, "
        f"precision {record['precision']}: {record['wall_time_s']:.1f} s in the run ({time.time() - started:.1f} s "
        f"with start-up and test); val error {record['val_error']:.4f}, test error {record['test_error']:.4f}"
    )
