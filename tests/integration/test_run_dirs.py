"""A run dir holds one configuration: resumes are checked, nothing a user made is deleted,
best.ckpt survives a moved dir, and the cluster's requeue is owned by one side."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.plugins.environments import SLURMEnvironment

from capsnet.run.signature import ResumeMismatchError
from capsnet.run.training import build_trainer, run
from conftest import CONF, SMALL_RUN, run_cli

SMALL = SMALL_RUN
FAIL_AT_3 = ["+callbacks.crash._target_=apps.probes.FailAt", "+callbacks.crash.step=3"]


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.engines
def test_a_one_process_run_is_not_continued_on_more_ranks(tmp_path: Path, mnist_dir: Path) -> None:
    """The issue's case: a run stopped at step 3 on one device, rerun as DDP on two."""
    run_dir = tmp_path / "run"
    common = ["profile=smoke", "logger=none", *SMALL, f"paths.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}"]
    crashed = run_cli("train.py", *common, *FAIL_AT_3)
    assert crashed.returncode == 1 and "stopped at step 3" in crashed.stderr
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    refused = run_cli("train.py", *common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    assert refused.returncode == 2
    assert "world_size: 1 -> 2" in refused.stderr and "resume=false" in refused.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "failed"  # untouched

    resumed = run_cli("train.py", *common)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["steps"] == 4 and "resumed_from" in record


@pytest.mark.slow
def test_resume_with_another_precision_is_refused_and_resume_false_retrains(make_cfg, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run(make_cfg(*SMALL, *FAIL_AT_3, output_dir=run_dir))
    assert first["status"] == "failed" and first["signature"]["trainer.precision"] == "32-true"
    with pytest.raises(ResumeMismatchError, match=r"trainer.precision: '32-true' -> 'bf16-mixed'.*resume=false"):
        run(make_cfg(*SMALL, "trainer.precision=bf16-mixed", output_dir=run_dir))
    fresh = run(make_cfg(*SMALL, "trainer.precision=bf16-mixed", "resume=false", output_dir=run_dir))
    assert fresh["status"] == "completed" and "resumed_from" not in fresh
    # a completed run of another configuration is not passed off as this one
    with pytest.raises(ResumeMismatchError, match=r"a completed run .*optim.lr: 0.001 -> 0.002"):
        run(make_cfg(*SMALL, "trainer.precision=bf16-mixed", "optim.lr=0.002", output_dir=run_dir))
    # an unfinished run may be continued with a longer schedule: it is the same run, trained longer
    assert run(make_cfg(*SMALL, *FAIL_AT_3, output_dir=tmp_path / "other"))["status"] == "failed"
    longer = run(make_cfg(*SMALL, "trainer.max_epochs=2", output_dir=tmp_path / "other"))
    assert longer["status"] == "completed" and "resumed_from" in longer and longer["steps"] == 8


def test_a_refused_run_never_deletes_other_runs_or_user_files(tmp_path: Path, mnist_dir: Path) -> None:
    parent = tmp_path / "outputs" / "default"
    (parent / "routing.iters=1").mkdir(parents=True)
    (parent / "routing.iters=1" / "metrics.json").write_text('{"status": "completed"}')
    (parent / "notes.txt").write_text("mine")
    result = run_cli("train.py", "profile=smoke", "paths.data_dir=/typo", f"hydra.run.dir={parent}")
    assert result.returncode == 2 and "MNIST file missing" in result.stderr
    assert (parent / "routing.iters=1" / "metrics.json").is_file() and (parent / "notes.txt").read_text() == "mine"
    fresh = tmp_path / "fresh"
    result = run_cli("train.py", "profile=smoke", "paths.data_dir=/typo", f"hydra.run.dir={fresh}")
    assert result.returncode == 2 and not fresh.exists()  # what this invocation made is gone


@pytest.mark.parametrize(
    ("overrides", "run_dir"),
    [((), "outputs/default/defaults"), (("routing.iters=1",), "outputs/default/routing.iters=1")],
)
def test_the_plain_command_has_its_own_run_dir(overrides: tuple[str, ...], run_dir: str) -> None:
    cfg = _compose(*overrides)
    HydraConfig().set_config(cfg)
    assert cfg.hydra.run.dir == run_dir


@pytest.mark.parametrize(("data", "decay"), [("mnist", 2000), ("affnist", 2000), ("multimnist", 20000)])
def test_the_learning_rate_schedule_comes_with_the_data(data: str, decay: int) -> None:
    assert _compose(f"data={data}").optim.decay_steps == decay
    assert _compose(f"data={data}", "optim.decay_steps=500").optim.decay_steps == 500
    assert _compose("experiment=multimnist").optim.decay_steps == 20000


@pytest.mark.slow
def test_best_checkpoint_survives_a_moved_run_dir(make_cfg, tmp_path: Path) -> None:
    two_epochs = [
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=10",
        "data.batch_size=64",
        "data.train_subset=640",
        "data.val_subset=100",
        "data.test_subset=32",
        "figures=false",
        "checkpoint.every_n_steps=2",
        "logger=csv",
    ]
    first = run(
        make_cfg(
            *two_epochs,
            "+callbacks.crash._target_=apps.probes.FailAt",
            "+callbacks.crash.step=12",
            output_dir=tmp_path / "before",
        )
    )
    assert first["status"] == "failed"  # after epoch 0 validated, inside epoch 1
    val_errors = _val_errors(tmp_path / "before")
    shutil.move(tmp_path / "before", tmp_path / "after")
    # epoch 1 is made worse on purpose: only a remembered epoch-0 score keeps best.ckpt from it
    record = run(
        make_cfg(
            *two_epochs,
            "+callbacks.worse._target_=apps.probes.ZeroWeightsAt",
            "+callbacks.worse.step=12",
            output_dir=tmp_path / "after",
        )
    )
    assert record["status"] == "completed" and "resumed_from" in record
    assert Path(record["best_checkpoint"]) == tmp_path / "after" / "checkpoints" / "best.ckpt"
    # the step log continues across the move and the resume: epoch 0's row once, then epoch 1's
    assert _val_errors(tmp_path / "after")[:1] == val_errors
    val_errors = _val_errors(tmp_path / "after")
    assert len(val_errors) == 2 and val_errors[0] < val_errors[1], val_errors
    assert record["val_error"] == pytest.approx(val_errors[0])


def _val_errors(run_dir: Path) -> list[float]:
    with (run_dir / "csv" / "metrics.csv").open() as handle:
        return [float(row["val/error"]) for row in csv.DictReader(handle) if row.get("val/error")]


def test_under_slurm_submitit_alone_requeues(make_cfg, monkeypatch) -> None:
    for key, value in {
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "capsnet",
        "SLURM_JOB_ID": "7",
        "SLURM_NODELIST": "n1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(SLURMEnvironment, "_validate_srun_used", staticmethod(lambda: None))
    cfg = make_cfg(*SMALL)
    trainer, _ = build_trainer(cfg, Path(cfg.paths.output_dir))
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False
    assert _compose("hydra/launcher=slurm").hydra.launcher.max_num_timeout >= 1


def test_history_is_kept_by_a_crash_and_a_resume_never_lists_an_epoch_twice(make_cfg, tmp_path: Path) -> None:
    from capsnet.run.history import read_history

    args = [
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=3",
        "data.batch_size=8",
        "data.val_subset=16",
        "data.test_subset=16",
        "figures=false",
        "checkpoint.every_n_steps=4",
    ]
    crashed = run(
        make_cfg(
            *args,
            "+callbacks.crash._target_=apps.probes.FailAt",
            "+callbacks.crash.step=7",
            output_dir=tmp_path / "run",
        )
    )
    assert crashed["status"] == "failed"
    assert [row["epoch"] for row in read_history(tmp_path / "run")] == [0, 1]  # what it had, kept
    # last.ckpt is from step 4, inside epoch 1: the resume trains epoch 1 again and rewrites its row
    record = run(make_cfg(*args, output_dir=tmp_path / "run"))
    rows = read_history(tmp_path / "run")
    assert record["status"] == "completed" and record["resumed_from"].endswith("last.ckpt")
    assert [row["epoch"] for row in rows] == [0, 1, 2] and [row["step"] for row in rows] == [3, 6, 9]
    assert rows[2]["wall_time_s"] > rows[1]["wall_time_s"] > rows[0]["wall_time_s"] > 0
    assert {"train_loss", "train_margin_loss", "train_recon_loss", "val_error", "lr", "train_images_per_s"} <= set(
        rows[0]
    )
    assert record["history"]["epochs"] == 3 and record["history"]["best_epoch"] in (0, 1, 2)
