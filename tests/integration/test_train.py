"""Training through run(cfg) and the real CLI, on small slices of real MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capsnet.run.training import run
from conftest import run_cli


@pytest.mark.slow
def test_capsnet_learns_on_real_mnist(make_cfg) -> None:
    """~1.5k real digits, one epoch of 24 steps: far better than chance (90% error)."""
    cfg = make_cfg(
        "data.train_subset=1536",
        "data.batch_size=64",
        "data.val_subset=500",
        "data.test_subset=500",
        "trainer.limit_train_batches=null",
    )
    record = run(cfg)
    assert record["status"] == "completed", record
    assert record["steps"] == 24
    assert record["val_error"] < 0.5, record
    assert record["test_error"] < 0.5, record
    run_dir = Path(cfg.paths.output_dir)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    for key in (
        "model",
        "data",
        "routing_iters",
        "recon",
        "seed",
        "val_error",
        "test_error",
        "epochs",
        "steps",
        "wall_time_s",
        "git_commit",
        "status",
    ):
        assert key in on_disk, key
    assert on_disk["routing_iters"] == 3 and on_disk["recon"] is True and on_disk["model"] == "capsnet"


def test_baseline_trains_a_few_steps(make_cfg) -> None:
    record = run(make_cfg("model=baseline", "trainer.limit_train_batches=2", "data.batch_size=16"))
    assert record["status"] == "completed", record
    assert record["model"] == "baseline" and record["routing_iters"] is None
    assert 0.0 <= record["test_error"] <= 1.0


@pytest.mark.slow
def test_smoke_multirun_writes_four_metrics(tmp_path: Path, mnist_dir: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "train.py",
        "-m",
        "routing.iters=1,3",
        "recon=true,false",
        "profile=smoke",
        "logger=none",
        "trainer.limit_train_batches=2",
        "data.val_subset=64",
        "data.test_subset=64",
        f"paths.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))]
    assert len(records) == 4, [p.parent.name for p in sweep_dir.iterdir()]
    cells = {(r["routing_iters"], r["recon"]) for r in records}
    assert cells == {(1, True), (1, False), (3, True), (3, False)}
    assert all(r["status"] == "completed" for r in records)
    assert all((p.parent / ".hydra" / "config.yaml").is_file() for p in sweep_dir.glob("*/metrics.json"))


def test_run_dir_holds_the_resolved_config(make_cfg) -> None:
    from omegaconf import OmegaConf

    cfg = make_cfg("routing.iters=5", "trainer.limit_train_batches=1", "data.val_subset=16", "data.test_subset=16")
    run(cfg)
    resolved = OmegaConf.load(Path(cfg.paths.output_dir) / "config_resolved.yaml")
    assert resolved.model.router.iters == 5  # was ${routing}
    assert resolved.paths.output_dir == cfg.paths.output_dir
    assert "${" not in OmegaConf.to_yaml(resolved)
