"""Experiment sweeps end to end, launchers, and W&B offline tracking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from capsnet.reporting.table import build_table, load_records, to_markdown
from conftest import CONF, run_cli
from wandb_log import wait_for_bytes

TINY = [
    "trainer.limit_train_batches=1",
    "data.batch_size=8",
    "data.val_subset=16",
    "data.test_subset=16",
    "figures=false",
]


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_table1_declares_the_whole_grid() -> None:
    cfg = _compose("experiment=table1")
    params = cfg.hydra.sweeper.params
    assert params["routing.iters"] == "1,3,5,7,10" and params.recon == "true,false"
    assert params.model == "capsnet,baseline" and params.seed == "0,1,2"
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.experiment_name == "table1"
    multi = _compose("experiment=multimnist")
    assert multi.data.name == "multimnist" and multi.hydra.sweeper.params["routing.iters"] == "1,3"
    affnist = _compose("experiment=affnist")
    assert affnist.data.name == "affnist" and affnist.hydra.sweeper.params.model == "capsnet,baseline_affnist"
    cifar = _compose("experiment=cifar10")  # §7: 7 members, r=3, leaky routing, 64 primary types
    assert cifar.hydra.sweeper.params.seed == "0,1,2,3,4,5,6" and cifar.hydra.mode.name == "MULTIRUN"
    assert cifar.data.name == "cifar10" and cifar.data.crop_size == 24 and cifar.model.name == "capsnet_cifar10"
    assert cifar.model.router.leaky is True and cifar.model.router.iters == 3 and cifar.model.primary_types == 64


def test_launcher_configs_compose() -> None:
    slurm = _compose("hydra/launcher=slurm").hydra.launcher
    assert slurm.gpus_per_node == 1 and "submitit" in slurm._target_
    assert slurm.max_num_timeout >= 1  # jobs that reach the time limit are requeued and resume
    ray = _compose("hydra/launcher=ray_gpus", "hydra.launcher.jobs_per_gpu=3").hydra.launcher
    assert ray._target_.endswith("RayGpuLauncher") and ray.jobs_per_gpu == 3


def test_optuna_launches_as_many_trials_at_once_as_the_launcher_runs(tmp_path: Path, monkeypatch) -> None:
    """hparams_search under ray_gpus: one batch of trials fills every GPU share (it used to
    stay at one trial at a time on any number of GPUs)."""
    search = ["hparams_search=mnist_optuna", f"hydra.sweep.dir={tmp_path / 'search'}"]
    assert _compose(*search).hydra.sweeper.n_jobs == 1  # the basic launcher runs one job at a time
    ray = [*search, "hydra/launcher=ray_gpus"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # a machine with 8 GPUs
    assert _compose(*ray).hydra.sweeper.n_jobs == 8
    doubled = _compose(*ray, "hydra.launcher.jobs_per_gpu=2")
    assert doubled.hydra.sweeper.n_jobs == 16
    assert instantiate(doubled.hydra.sweeper).sweeper.n_jobs == 16  # what the Optuna sweeper batches by
    declared = _compose(*ray, "+hydra.launcher.ray.init.num_gpus=2", "hydra.launcher.jobs_per_gpu=3")
    assert declared.hydra.sweeper.n_jobs == 6  # Ray's declared GPUs win over this machine's
    assert _compose(*ray, "hydra.sweeper.n_jobs=5").hydra.sweeper.n_jobs == 5  # a cluster: say it


@pytest.mark.slow
def test_smoke_table1_sweep_builds_the_table(tmp_path: Path, mnist_dir: Path) -> None:
    sweep_dir = tmp_path / "table1"
    result = run_cli(
        "train.py",
        "-m",
        "experiment=table1",
        "profile=smoke",
        "logger=none",
        "routing.iters=1,3",
        "recon=true,false",
        "seed=0",
        *TINY,
        f"paths.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = load_records([sweep_dir])
    statuses = sorted((r["model"], r["status"]) for r in records)
    assert statuses == [("baseline", "completed")] + [("baseline", "skipped")] * 3 + [("capsnet", "completed")] * 4
    markdown = to_markdown(build_table(records, profile="smoke"))
    assert "(profile: smoke)" in markdown
    filled = [line for line in markdown.splitlines() if "(n=1)" in line]
    assert {
        line.split("|")[1].strip() + line.split("|")[2].strip() + line.split("|")[3].strip() for line in filled
    } == {"Baseline CNN––", "CapsNet1no", "CapsNet1yes", "CapsNet3no", "CapsNet3yes"}

    rerun = run_cli(
        "train.py",
        "-m",
        "experiment=table1",
        "profile=smoke",
        "logger=none",
        "routing.iters=1",
        "recon=true",
        "seed=0",
        *TINY,
        f"paths.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert rerun.returncode == 0
    assert "already completed; skipping" in rerun.stderr + rerun.stdout


def test_table_logged_to_wandb_offline(monkeypatch, tmp_path: Path) -> None:
    from capsnet.reporting.table import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir = tmp_path / "runs" / "r3"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(
        json.dumps(
            {
                "model": "capsnet",
                "data": "mnist",
                "routing_iters": 3,
                "recon": True,
                "seed": 0,
                "profile": "smoke",
                "status": "completed",
                "test_error": 0.5,
            }
        )
    )
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "results"), "--wandb"])
    (run_file,) = (tmp_path / "results" / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"table1" in wait_for_bytes(run_file, (b"table1",))
