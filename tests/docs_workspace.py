"""A scratch workspace in which the docs' commands run as a user would, at smoke scale
(tests/docs/test_commands.py; the SLURM ones in tests/engines/test_slurm.py)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LOCAL = """# @package _global_
# The docs-commands test's per-user config: every command of the docs, at smoke scale.
trainer:
  accelerator: cpu
  max_epochs: 1
  max_steps: -1
  limit_train_batches: 2
  limit_val_batches: 1
  limit_test_batches: 1
data:
  batch_size: 8
  eval_batch_size: 16
  train_subset: 64
  val_subset: 16
  test_subset: 16
checkpoint:
  every_n_steps: 2
figures: false
nan_check_every: 1
hydra:
  sweeper:
    params:  # every experiment's grid narrowed to seed 0 and recon=true: keys every config has (not
      seed: "0"     # routing.iters: routing=uniform has none); an experiment that does not sweep recon
      recon: "true"  # gets recon=True in its run dir names (the docs name no such dir)
"""


def commands(page: Path) -> list[str]:
    """The commands of a page's ```bash blocks, one per line (continuations joined)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def workspace(base: Path, mnist_dir: Path) -> tuple[Path, dict[str, str]]:
    work = base / "work"
    work.mkdir(parents=True)
    for name in ("tests", "bench", "scripts", "Makefile", "pyproject.toml", ".venv"):
        (work / name).symlink_to(ROOT / name)
    (work / "src").mkdir()
    for entry in (ROOT / "src").iterdir():  # the scripts copied: Hydra finds conf/ beside a script's real path
        if entry.suffix == ".py":
            shutil.copy(entry, work / "src" / entry.name)
        else:
            (work / "src" / entry.name).symlink_to(entry)
    shutil.copytree(ROOT / "conf", work / "conf", ignore=shutil.ignore_patterns("local"))
    (work / "conf" / "local").mkdir()
    (work / "conf" / "local" / "default.yaml").write_text(LOCAL)
    images = work / "my_images"
    from PIL import Image

    for k, name in enumerate(("circle", "square")):
        (images / name).mkdir(parents=True)
        for i in range(80):  # the config's own splits (20% test, 100 validation) leave training data
            Image.new("RGB", (30, 26), (3 * i, 120 * k, 200)).save(images / name / f"{i}.png")
    home = base / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANDB_", "RAY_", "CUDA_", "SLURM_"))}
    env.update(
        PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env['PATH']}",
        CAPSNET_DATA_DIR=str(mnist_dir),
        HOME=str(home),  # W&B finds no login: logger=wandb must run offline by itself
        NETRC=str(home / "no-netrc"),
        RAY_HEAD_NUM_GPUS="2",  # make reproduce-table's Ray head declares GPUs this machine has not
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    return work, env


def adapted(command: str) -> str:
    """The command as run here: Ray gets declared GPUs (hydra.* overrides: not in run dir names)."""
    if "hydra/launcher=ray_gpus" in command:
        command += " +hydra.launcher.ray.init.num_gpus=2 +hydra.launcher.ray.init.num_cpus=4"
    return command
