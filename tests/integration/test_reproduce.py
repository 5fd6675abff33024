"""``make reproduce-table``: every experiment runs, a failed or refused job never stops the
others, the table is built from what completed and the rest is listed, and the exit status
says whether everything completed."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

TINY = (
    "model=capsnet routing.iters=1 recon=true logger=none figures=false trainer.limit_train_batches=1 "
    "data.batch_size=8 data.val_subset=16 data.test_subset=16"
)


def _make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-C", str(ROOT), *args], capture_output=True, text=True, env=env or dict(os.environ), check=False
    )


@pytest.mark.slow
def test_reproduce_table_runs_every_experiment_past_a_refused_job_and_lists_it(tmp_path: Path, mnist_dir: Path) -> None:
    # The recipe's own command (make -n prints it), run from a scratch dir so the sweeps and
    # the table land there and not in this checkout's multirun/ and results/.
    args = f"{TINY} seed=0,4294967296 paths.data_dir={mnist_dir}"
    dry = _make("-n", "reproduce-table", "PROFILE=smoke", "EXPERIMENTS=table1 multimnist", f"ARGS={args}")
    assert dry.returncode == 0, dry.stderr
    recipe = dry.stdout.replace("\\\n", " ")  # the recipe's continued lines, joined as the shell does
    (line,) = [line for line in recipe.splitlines() if "-m capsnet.run.reproduce" in line]
    command = shlex.split(line)
    command[0] = sys.executable
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]  # not every job completed
    table = (tmp_path / "results" / "table1.md").read_text()
    mnist_row = next(row for row in table.splitlines() if row.startswith("| CapsNet | 1 | yes |"))
    assert mnist_row.count("(n=1)") == 2, mnist_row  # both experiments' completed runs are in the table
    for experiment in ("table1", "multimnist"):
        assert f"  {experiment}: driver exit 1, 1 job(s) did not complete:" in result.stdout
    assert result.stdout.count("refused: invalid config value seed=4294967296") == 2


def test_a_launcher_needs_a_named_profile() -> None:
    refused = _make("reproduce-table", "LAUNCHER=slurm")
    assert refused.returncode != 0 and "name the profile: PROFILE=fast or PROFILE=paper" in refused.stderr
