"""Bad input fails early and clearly; killed runs resume exactly; failures are recorded."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from capsnet.data.mnist import MNIST_SHA256, DataError, verify_mnist
from capsnet.run.evaluation import CheckpointError, load_checkpoint
from capsnet.run.objectives import CapsuleObjective
from capsnet.run.training import run
from capsnet.run.validation import ConfigError
from conftest import ROOT, run_cli

BAD_VALUES = [
    ("routing.iters=0", "routing.iters"),
    ("routing.iters=-2", "routing.iters"),
    ("recon=maybe", "recon"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.batch_size=-5", "data.batch_size"),
    ("optim.lr=-0.001", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("model._target_=capsnet.nn.models.ResNet", "model._target_"),
    ("data._target_=capsnet.data.cifar.Nope", "data._target_"),
    ("trainer.precision=16-true", "trainer.precision"),
    ("perf.compile=fastest", "perf.compile"),
    ("perf.matmul_precision=tf32", "perf.matmul_precision"),
    ("data.train_subset=8", "data.train_subset"),
    # each of these was accepted, or failed inside training, before the reliability work
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("trainer.max_epochs=abc", "trainer.max_epochs"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("data.val_size=60000", "data.val_size"),
    ("data.batch_size=60000", "data.batch_size"),
    ("seed=4294967296", "seed"),
    ("seed=-1", "seed"),
    ("loss.recon_weight=nan", "loss.recon_weight"),
    ("loss.m_pos=-1", "loss.m_pos"),
    ("loss.m_neg=0.95", "loss.m_neg"),
    ("loss.lam=inf", "loss.lam"),
    ("data.max_shift=-3", "data.max_shift"),
    ("experiment_name=''", "experiment_name"),
    ("+optim.momentum=0.9", "optim.momentum"),
    ("+loss.margin=0.2", "loss.margin"),
    ("+model.dropout=0.3", "model.dropout"),
    ("+data.shuffle=false", "data.shuffle"),
    ("+trainer.max_epoch=3", "trainer.max_epoch"),
    ("+learning_rate=0.1", "learning_rate"),
    ("routing.iters=1000000000", "routing.iters"),
    ("routing.leaky=maybe", "routing.leaky"),
    ("trainer.limit_train_batches=0", "trainer.limit_train_batches"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.precision=8-true", "trainer.precision"),
    ("optim.decay_rate=1.5", "optim.decay_rate"),
]


@pytest.mark.parametrize(("override", "key"), BAD_VALUES)
def test_bad_value_fails_before_work_naming_the_key(override: str, key: str, make_cfg, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"^invalid config value {re.escape(key)}="):
        run(make_cfg(override, output_dir=run_dir))
    assert not run_dir.exists(), "a rejected run must not leave a run dir behind"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        BAD_VALUES[0],
        ("model._target_=capsnet.nn.models.ResNet", "model._target_"),
        ("optim.lr=nan", "optim.lr"),
        ("data.val_size=60000", "data.val_size"),
        ("experiment_name=''", "experiment_name"),
        ("+optim.momentum=0.9", "optim.momentum"),
    ],
)
def test_bad_value_on_the_command_line_exits_with_the_message(
    override: str, key: str, tmp_path: Path, mnist_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train.py", override, "profile=smoke", f"paths.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    assert f"invalid config value {key}=" in result.stderr, result.stderr[-2000:]
    assert not run_dir.exists(), "a rejected run must not leave a run dir behind"


@pytest.mark.parametrize(
    ("override", "needle"), [("model=resnet", "model"), ("profile=huge", "profile"), ("data=cifar", "data")]
)
def test_unknown_group_option_lists_the_choices(override: str, needle: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train.py", override, f"hydra.run.dir={run_dir}")
    assert result.returncode != 0
    assert f"Could not find '{needle}/" in result.stderr and "Available options" in result.stderr
    assert not run_dir.exists()


def test_misspelt_key_is_rejected_at_compose_time(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train.py", "rooting.iters=3", f"hydra.run.dir={run_dir}")
    assert result.returncode != 0
    assert "Could not override 'rooting.iters'" in result.stderr and "Key 'rooting' is not in struct" in result.stderr
    assert not run_dir.exists()


def _copy_mnist(src: Path, dst: Path) -> Path:
    raw = dst / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_SHA256:
        os.symlink(src / "MNIST" / "raw" / name, raw / name)
    return raw


def test_missing_and_corrupt_files_are_named(tmp_path: Path, mnist_dir: Path) -> None:
    raw = _copy_mnist(mnist_dir, tmp_path)
    verify_mnist(tmp_path)  # intact copy passes
    labels = raw / "t10k-labels-idx1-ubyte"
    labels.unlink()
    with pytest.raises(DataError, match=r"missing: .*t10k-labels-idx1-ubyte.*CAPSNET_DATA_DIR"):
        verify_mnist(tmp_path)
    data = (mnist_dir / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()
    labels.write_bytes(data[:-100])  # truncated
    with pytest.raises(DataError, match=r"corrupt: .*t10k-labels-idx1-ubyte has SHA-256 .* expected ff7bcfd4"):
        verify_mnist(tmp_path)


def test_missing_data_fails_the_cli_with_the_fix(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train.py", "profile=smoke", f"paths.data_dir={tmp_path / 'nowhere'}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    assert "MNIST file missing" in result.stderr and "CAPSNET_DATA_DIR" in result.stderr
    assert not run_dir.exists()


RESUME_ARGS = [
    "profile=smoke",
    "logger=none",
    "trainer=cpu",
    "deterministic=true",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=6",
    "data.batch_size=16",
    "data.val_subset=64",
    "data.test_subset=64",
    "checkpoint.every_n_steps=2",
    "routing.iters=2",
]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.faults
def test_sigkill_mid_epoch_then_same_command_resumes_exactly(tmp_path: Path, mnist_dir: Path) -> None:
    data = f"paths.data_dir={mnist_dir}"
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    result = run_cli("train.py", *RESUME_ARGS, data, f"hydra.run.dir={reference_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    reference = json.loads((reference_dir / "metrics.json").read_text())
    assert reference["steps"] == 18

    command = [sys.executable, str(ROOT / "src" / "train.py"), *RESUME_ARGS, data, f"hydra.run.dir={killed_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step_file = killed_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and process.poll() is None:
        if step_file.exists():
            time.sleep(0.3)
            try:
                killed_at = torch.load(step_file, map_location="cpu", weights_only=False)["global_step"]
            except Exception:  # noqa: BLE001, S112  (a file caught mid-write fails in many ways: try again)
                continue
            if killed_at >= 4:
                process.send_signal(signal.SIGKILL)
                break
        time.sleep(0.05)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert killed_at is not None and killed_at < 18
    assert json.loads((killed_dir / "metrics.json").read_text())["status"] == "running"  # never "completed"

    result = run_cli("train.py", *RESUME_ARGS, data, f"hydra.run.dir={killed_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = json.loads((killed_dir / "metrics.json").read_text())
    assert resumed["status"] == "completed" and "resumed_from" in resumed
    assert resumed["steps"] == reference["steps"]
    assert resumed["val_error"] == reference["val_error"]
    assert resumed["test_error"] == reference["test_error"]
    ref_weights, new_weights = _final_weights(reference_dir), _final_weights(killed_dir)
    for name, tensor in ref_weights.items():
        torch.testing.assert_close(new_weights[name], tensor, rtol=0, atol=0, msg=name)


def test_completed_run_is_skipped_when_rerun(make_cfg) -> None:
    cfg = make_cfg("trainer.limit_train_batches=1", "data.val_subset=32", "data.test_subset=32")
    first = run(cfg)
    assert first["status"] == "completed"
    mtime = (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").stat().st_mtime
    second = run(cfg)
    assert second == first
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").stat().st_mtime == mtime


def test_injected_nan_stops_the_run_naming_step_and_parts(make_cfg, monkeypatch) -> None:
    original = CapsuleObjective.__call__

    def poisoned(self, net, images, labels, parts, *, training, step):
        lengths, loss_parts = original(self, net, images, labels, parts, training=training, step=step)
        if step == 2:
            loss_parts["recon"] = loss_parts["recon"] * float("nan")
        return lengths, loss_parts

    monkeypatch.setattr(CapsuleObjective, "__call__", poisoned)
    cfg = make_cfg("trainer.limit_train_batches=4", "data.val_subset=32", "data.test_subset=32")
    record = run(cfg)
    assert record["status"] == "failed"
    assert "non-finite loss at step 2" in record["error"] and "recon=nan" in record["error"]
    assert "margin=" in record["error"]
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk["status"] == "failed" and on_disk["error"] == record["error"]


def test_a_sweep_survives_a_failed_and_a_refused_job_and_sums_them_up(tmp_path: Path, mnist_dir: Path) -> None:
    """One job trains, one fails while training, one is refused before any work: the sweep
    goes on, each outcome is recorded with its reason, and the driver exits 1."""
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "train.py",
        "-m",
        "seed=0,1,4294967296",
        "+callbacks.crash._target_=apps.probes.FailAt",
        "+callbacks.crash.step=0",
        "+callbacks.crash.seed=1",
        "profile=smoke",
        "logger=none",
        "figures=false",
        "trainer.limit_train_batches=1",
        "data.val_subset=32",
        "data.test_subset=32",
        f"paths.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    outcomes = {
        json.loads(p.read_text())["job"]: json.loads(p.read_text()) for p in (sweep_dir / "jobs").glob("*.json")
    }
    assert [outcomes[k]["status"] for k in (0, 1, 2)] == ["completed", "failed", "refused"]
    assert "stopped at step 0 by the test" in outcomes[1]["reason"]
    assert "invalid config value seed=4294967296" in outcomes[2]["reason"]
    records = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")}
    assert sorted(r["status"] for r in records.values()) == ["completed", "failed"]  # the refused job left no run dir
    assert "sweep summary: 1 completed, 1 failed, 1 refused" in result.stderr
    assert "job 2 (seed=4294967296" in result.stderr and "refused: invalid config value seed" in result.stderr


def test_bad_checkpoints_are_refused(tmp_path: Path, make_cfg) -> None:
    not_a_ckpt = tmp_path / "notes.ckpt"
    not_a_ckpt.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(not_a_ckpt, {})
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "epoch": 3}, foreign)
    with pytest.raises(CheckpointError, match="not a capsnet training checkpoint"):
        load_checkpoint(foreign, {})
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "absent.ckpt", {})

    cfg = make_cfg("trainer.limit_train_batches=1", "data.val_subset=32", "data.test_subset=32")
    assert run(cfg)["status"] == "completed"
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    shutil.copy(ckpt, tmp_path / "good.ckpt")
    assert load_checkpoint(tmp_path / "good.ckpt", {"image_size": 28, "task": "single"}) is not None
    with pytest.raises(CheckpointError, match="image_size: checkpoint 28 vs data 36"):
        load_checkpoint(tmp_path / "good.ckpt", {"image_size": 36, "task": "multi"})


def test_eval_cli_on_a_trained_checkpoint(tmp_path: Path, make_cfg, mnist_dir: Path) -> None:
    cfg = make_cfg("trainer.limit_train_batches=1", "data.val_subset=32", "data.test_subset=32")
    assert run(cfg)["status"] == "completed"
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    out = tmp_path / "eval"
    result = run_cli(
        "eval.py",
        f"ckpt_path={ckpt}",
        "data.test_subset=64",
        f"paths.data_dir={mnist_dir}",
        "trainer=cpu",
        f"hydra.run.dir={out}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["model"] == "capsnet" and 0 <= record["test_error"] <= 1
    assert (out / "figures" / "reconstructions.png").is_file()
    refused = run_cli(
        "eval.py",
        f"ckpt_path={ckpt}",
        "data=multimnist",
        f"paths.data_dir={mnist_dir}",
        f"hydra.run.dir={tmp_path / 'refused'}",
    )
    assert refused.returncode == 2 and "trained for other inputs" in refused.stderr
