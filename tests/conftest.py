"""Shared fixtures: the real MNIST location, composed configs, the CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from capsnet.run import resolvers

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# A run small enough to crash, resume and damage many times in one test: 4 steps an epoch,
# last.ckpt every 2 steps, no figures.
SMALL_RUN = [
    "trainer.limit_train_batches=4",
    "data.batch_size=8",
    "data.val_subset=32",
    "data.test_subset=32",
    "figures=false",
    "checkpoint.every_n_steps=2",
]

os.environ.setdefault("WANDB_MODE", "disabled")
resolvers.register()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST root.  Tests that need it fail (never skip) when it is absent."""
    root = os.environ.get("CAPSNET_DATA_DIR")
    if not root or not (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.fail("real MNIST not found: set CAPSNET_DATA_DIR to a folder holding MNIST/raw/*-ubyte")
    return Path(root)


@pytest.fixture
def make_cfg(tmp_path: Path, mnist_dir: Path) -> Callable[..., DictConfig]:
    """Compose the real config with overrides; outputs go to a fresh tmp dir."""

    def _make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            device = [] if any(o.startswith("trainer=") for o in overrides) else ["trainer=cpu"]
            cfg = compose(
                config_name="config",
                overrides=["profile=smoke", "logger=none", *device, *overrides],
                return_hydra_config=True,
            )
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir or tmp_path / "run")
            cfg.paths.data_dir = str(mnist_dir)
            cfg.trainer.enable_progress_bar = False
        return cfg

    return _make


@pytest.fixture
def make_eval_cfg(tmp_path: Path, mnist_dir: Path) -> Callable[..., DictConfig]:
    """Compose src/eval.py's config (conf/eval.yaml) with ``ckpt_path`` and overrides, as
    the evaluator's CLI would; outputs go to ``output_dir``."""

    def _make(ckpt_path: str | Path, *overrides: str, output_dir: Path | None = None) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(
                config_name="eval",
                overrides=["trainer=cpu", "logger=none", *overrides],
                return_hydra_config=True,
            )
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.ckpt_path = str(ckpt_path)
            cfg.paths.output_dir = str(output_dir or tmp_path / "eval")
            cfg.paths.data_dir = str(mnist_dir)
            cfg.trainer.enable_progress_bar = False
        return cfg

    return _make


def run_cli(script: str, *args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run src/<script> in a subprocess, as a user would."""
    # tests/ on the path: runs can load the tests' own callbacks (tests/apps) by _target_.
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
