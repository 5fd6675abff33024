"""What users of Lightning-Hydra-template projects expect: the config groups they know
(callbacks, logger, debug, hparams_search), tags, ckpt_path, a logged config equal to the
resolved one, W&B runs that follow resumes, and models added by one class + one YAML."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from capsnet.nn.models import count_parameters
from capsnet.run.signature import _flatten
from capsnet.run.training import run
from capsnet.run.validation import ConfigError
from conftest import CONF, ROOT, run_cli
from wandb_log import run_config, run_tags, wait_for_bytes

TEST_CONFIGS = ROOT / "tests" / "configs"
TINY = [
    "trainer.limit_train_batches=2",
    "data.batch_size=16",
    "data.train_subset=64",
    "data.val_subset=32",
    "data.test_subset=32",
    "figures=false",
]


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def _flat_resolved(run_dir: Path) -> dict[str, Any]:
    return _flatten(yaml.safe_load((run_dir / "config_resolved.yaml").read_text()))


def test_the_template_groups_compose() -> None:
    callbacks = _compose().callbacks
    assert set(callbacks) == {"model_checkpoint", "lr_monitor", "progress_bar", "model_summary"}
    assert callbacks.lr_monitor.logging_interval == "step"
    assert "early_stopping" in _compose("callbacks=[default,early_stopping]").callbacks
    assert set(_compose("logger=many").logger) == {"csv", "tensorboard", "wandb"}
    assert _compose("debug=fdr").trainer.fast_dev_run is True
    overfit = _compose("debug=overfit")
    assert overfit.data.overfit_batches == 3 and overfit.data.max_shift == 0 and overfit.experiment_name == "debug"
    assert _compose("debug=limit").trainer.limit_val_batches == 2
    assert _compose("debug=profiler").trainer.profiler._target_.endswith("SimpleProfiler")
    search = _compose("hparams_search=mnist_optuna").hydra.sweeper
    assert search._target_.endswith("OptunaSweeper") and search.direction == "minimize"
    assert set(search.params) == {"optim.lr", "optim.decay_rate", "loss.recon_weight", "model.weight_std"}
    assert list(_compose("tags=[a,b]").tags) == ["a", "b"]


def test_every_logger_records_the_resolved_config_and_wandb_follows_a_resume(
    make_cfg, tmp_path: Path, monkeypatch
) -> None:
    """logger=many: W&B (offline), CSV and TensorBoard each record exactly config_resolved.yaml,
    key by key; the run's tags reach W&B; a crashed run, resumed, continues its W&B run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    run_dir = tmp_path / "run"
    args = ["logger=many", "tags=[study_a,v2]", "trainer.max_epochs=2", *TINY, "figures=true"]
    crashed = run(
        make_cfg(*args, "+callbacks.crash._target_=apps.probes.FailAt", "+callbacks.crash.step=3", output_dir=run_dir)
    )
    assert crashed["status"] == "failed"
    watch = ["+callbacks.watch._target_=capsnet.run.tracking.WatchModel", "+callbacks.watch.log_freq=1"]
    resumed = run(make_cfg(*args, *watch, output_dir=run_dir))
    assert resumed["status"] == "completed" and resumed["resumed_from"].endswith("last.ckpt")
    assert resumed["tags"] == ["study_a", "v2"]

    expected = _flat_resolved(run_dir)
    assert expected["data.batch_size"] == 16 and expected["data.name"] == "mnist"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in wandb_runs)  # one W&B run
    (log_file,) = wandb_runs[-1].glob("run-*.wandb")
    wait_for_bytes(log_file, (b"val/error", b"figures", b"gradients/"))
    assert b"gradients/digit_caps.weight" in log_file.read_bytes()  # callbacks=[default,watch_model]
    recorded = {
        "wandb": _flatten(run_config(log_file)),
        "csv": _flatten(yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())),
        "tensorboard": _flatten(yaml.safe_load((run_dir / "tensorboard" / "hparams.yaml").read_text())),
    }
    for logger, config in recorded.items():
        missing = sorted(expected.keys() - config.keys())
        extra = sorted(config.keys() - expected.keys())
        changed = {k: (config[k], expected[k]) for k in expected.keys() & config.keys() if config[k] != expected[k]}
        assert (missing, extra, changed) == ([], [], {}), logger
    assert {"study_a", "v2", "capsnet", "r3"} <= set(run_tags(log_file))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    images = list(wandb_runs[-1].glob("files/media/images/*.png"))
    assert "reconstructions.png" in resumed["figures"] and len(images) == len(resumed["figures"])
    assert "routing" in (run_dir / "config_tree.log").read_text()


@pytest.mark.parametrize(
    ("setup", "online"),
    [("none", False), ("netrc_saas", True), ("netrc_self_hosted", True), ("mode_offline", False)],
)
def test_wandb_decides_online_or_offline_by_its_own_rules(setup: str, online: bool, tmp_path: Path) -> None:
    """No credentials: offline, no prompt.  A key in the netrc file that NETRC names counts,
    also for a self-hosted server (WANDB_BASE_URL), which a reader of ~/.netrc for
    api.wandb.ai alone would have sent offline.  WANDB_MODE wins when set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "cfg"), WANDB_SILENT="true")
    key = "a" * 40
    if setup.startswith("netrc"):
        host = "api.wandb.ai" if setup == "netrc_saas" else "wandb.example.org"
        netrc = tmp_path / "elsewhere.netrc"
        netrc.write_text(f"machine {host}\n  login user\n  password {key}\n")
        netrc.chmod(0o600)
        env["NETRC"] = str(netrc)
        if setup == "netrc_self_hosted":
            env["WANDB_BASE_URL"] = "https://wandb.example.org"
    if setup == "mode_offline":
        env["WANDB_MODE"] = "offline"
        env["WANDB_API_KEY"] = key
    code = (
        "from capsnet.run.tracking import wandb_offline, wandb_has_credentials\n"
        "print(wandb_offline(None), wandb_has_credentials())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    offline, has_key = result.stdout.split()[-2:]
    if setup == "mode_offline":  # left to wandb, which reads WANDB_MODE itself
        assert offline == "False"
    else:
        assert (offline, has_key) == (str(not online), str(online))


def test_logger_wandb_without_credentials_runs_offline(tmp_path: Path, mnist_dir: Path) -> None:
    """The real command, as a user without a W&B account runs it: no WANDB_MODE, no key, a
    fresh HOME, NETRC naming a missing file, nothing on stdin.  Both jobs of a sweep (one
    process) train and test offline with no prompt; each leaves an offline W&B log that
    holds its config.  It used to stop at wandb.init: UsageError: No API key configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(
        HOME=str(tmp_path / "home"),
        NETRC=str(tmp_path / "home" / "no.netrc"),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])),
    )
    (tmp_path / "home").mkdir()
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "src" / "train.py"),
            "-m",
            "seed=0,1",
            "profile=smoke",
            "logger=wandb",
            "trainer=cpu",
            *TINY,
            f"paths.data_dir={mnist_dir}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "API key" not in result.stdout + result.stderr
    for seed in (0, 1):
        (run_dir,) = sweep.glob(f"*seed={seed}*")
        record = json.loads((run_dir / "metrics.json").read_text())
        assert record["status"] == "completed", record.get("error")
        (log_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
        wait_for_bytes(log_file, (b"val/error",))
        assert run_config(log_file)["seed"] == seed and f"seed={seed}" in run_tags(log_file)
    assert not (tmp_path / "home" / ".netrc").exists()  # nothing logged in on the user's behalf


def test_debug_overfit_trains_on_the_same_batches_every_epoch(make_cfg, tmp_path: Path) -> None:
    def digests(*overrides: str) -> dict[int, list[list[float]]]:
        path = tmp_path / f"digests_{len(overrides)}.jsonl"
        record = run(
            make_cfg(
                *overrides,
                "trainer.max_epochs=2",
                "trainer.limit_train_batches=null",
                "data.batch_size=16",
                "data.train_subset=96",
                "data.val_subset=16",
                "data.test_subset=16",
                "figures=false",
                "+callbacks.digests._target_=apps.probes.BatchDigests",
                f"+callbacks.digests.path={path}",
                output_dir=tmp_path / f"run{len(overrides)}",
            )
        )
        assert record["status"] == "completed"
        by_epoch: dict[int, list[list[float]]] = {0: [], 1: []}
        for line in path.read_text().splitlines():
            epoch, *digest = json.loads(line)
            by_epoch[epoch].append(digest)
        return by_epoch

    overfit = digests("debug=overfit")
    assert len(overfit[0]) == 3 and overfit[0] == overfit[1]
    normal = digests()  # the control: without debug=overfit the epochs differ
    assert len(normal[0]) == 6 and normal[0] != normal[1]


@pytest.mark.slow
def test_debug_fdr_and_profiler_run_from_the_command_line(tmp_path: Path, mnist_dir: Path) -> None:
    fdr = run_cli(
        "train.py", "debug=fdr", "profile=smoke", f"paths.data_dir={mnist_dir}", f"hydra.run.dir={tmp_path / 'fdr'}"
    )
    assert fdr.returncode == 0, fdr.stderr[-3000:]
    record = json.loads((tmp_path / "fdr" / "metrics.json").read_text())
    assert record["status"] == "completed" and record["steps"] == 1 and record["experiment"] == "debug"
    profiled = run_cli(
        "train.py",
        "debug=profiler",
        "profile=smoke",
        "trainer.limit_train_batches=2",
        f"paths.data_dir={mnist_dir}",
        f"hydra.run.dir={tmp_path / 'profiler'}",
    )
    assert profiled.returncode == 0, profiled.stderr[-3000:]
    assert "run_training_batch" in (tmp_path / "profiler" / "fit-profile.txt").read_text()


def test_ckpt_path_starts_from_the_weights_and_refuses_a_mismatch(make_cfg, tmp_path: Path) -> None:
    first = run(make_cfg(*TINY, output_dir=tmp_path / "first"))
    best = Path(first["best_checkpoint"])
    start = tmp_path / "start.pt"
    second = run(
        make_cfg(
            *TINY,
            f"ckpt_path={best}",
            "+callbacks.start._target_=apps.probes.WeightsAtStart",
            f"+callbacks.start.path={start}",
            output_dir=tmp_path / "second",
        )
    )
    assert second["status"] == "completed" and second["warm_start"] == str(best)
    assert "resumed_from" not in second and second["steps"] == 2  # a fresh schedule, not a resume
    trained = {
        k.removeprefix("net."): v
        for k, v in torch.load(best, weights_only=False)["state_dict"].items()
        if k.startswith("net.")
    }
    started = torch.load(start)
    assert started.keys() == trained.keys() and all(torch.equal(started[k], trained[k]) for k in trained)

    with pytest.raises(ConfigError, match="ckpt_path") as refused:
        run(make_cfg(*TINY, "model=baseline", f"ckpt_path={best}", output_dir=tmp_path / "third"))
    assert "does not fit" in str(refused.value)
    assert not (tmp_path / "third").exists()


def test_hparams_search_runs_optuna_trials_and_stores_them_beside_the_sweep(tmp_path: Path, mnist_dir: Path) -> None:
    sweep = tmp_path / "search"
    result = run_cli(
        "train.py",
        "hparams_search=mnist_optuna",
        "profile=smoke",
        "logger=none",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=1",
        *TINY,
        f"paths.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with sqlite3.connect(sweep / "optuna.db") as db:
        values = sorted(v for (v,) in db.execute("SELECT value FROM trial_values"))
        states = [s for (s,) in db.execute("SELECT state FROM trials")]
    assert states == ["COMPLETE", "COMPLETE"]
    records = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    assert sorted(r["val_error"] for r in records) == pytest.approx(values)
    assert (sweep / "optimization_results.yaml").is_file()


def test_a_model_is_one_class_and_one_yaml(make_cfg, tmp_path: Path) -> None:
    """The README's worked example: tests/apps/tiny_cnn.py + tests/configs/model/tiny_cnn.yaml."""
    searchpath = f"hydra.searchpath=[file://{TEST_CONFIGS}]"
    record = run(make_cfg(searchpath, "model=tiny_cnn", *TINY, output_dir=tmp_path / "tiny"))
    assert record["status"] == "completed" and record["model"] == "tiny_cnn" and record["routing_iters"] is None

    cfg = make_cfg(searchpath, "model=capsnet_small")
    from capsnet.run.module import build_model

    net = build_model(dict(cfg.model), image_size=28, in_channels=1, num_classes=10, task="single")
    # Independent count: conv1 1->32 9x9; primary 32->4*8 9x9; W: 4*6*6 capsules x 8x16 per class; decoder.
    expected = (
        (32 * 81 + 32)
        + (32 * 81 * 32 + 32)
        + 4 * 36 * 8 * 16 * 10
        + (160 * 512 + 512)
        + (512 * 1024 + 1024)
        + (1024 * 784 + 784)
    )
    assert count_parameters(net) == expected


def test_wandb_ids_follow_the_run_dir_and_artifacts_need_wandb_online(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from capsnet.run.tracking import wandb_arguments

    node = OmegaConf.create({"_target_": "WandbLogger", "offline": True, "log_model": True, "tags": ["capsnet"]})
    with pytest.raises(ConfigError, match=r"logger\.wandb\.log_model"):
        wandb_arguments(node, tmp_path, resuming=False, tags=[])
    node.log_model = False
    fresh = wandb_arguments(node, tmp_path, resuming=False, tags=["mine"])
    assert fresh["offline"] is True and fresh["tags"] == ["capsnet", "mine"] and len(fresh["id"]) == 8
    (tmp_path / "wandb_run_id").write_text("abc12345\n")
    assert wandb_arguments(node, tmp_path, resuming=True, tags=[])["id"] == "abc12345"
    assert wandb_arguments(node, tmp_path, resuming=False, tags=[])["id"] != "abc12345"  # retrained: a new run
