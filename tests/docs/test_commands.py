"""Every command in README.md and docs/*.md, run as a user would, at smoke scale.

The commands of each page run in order, in one scratch workspace that looks like the
checkout (src, tests, bench, scripts, the Makefile and .venv linked in; conf/ copied) so
that what they write lands there and one command can use what an earlier one made (an
evaluation reads the checkpoint a training wrote).  They are made small without changing
their text: the workspace's ``conf/local/default.yaml`` (the per-user config every run
loads last) shrinks data and steps and narrows every experiment's grid to seed 0 with
reconstruction (the other keys keep their grid), so run dirs keep the names the page gives
them.  The scripts of src/ are copies, not links: Hydra finds conf/ beside a script's real
path, and a link would compose the checkout's conf/ without the narrowing.  Only Ray's
declared GPUs are added on the command line (this machine has none).

A command that cannot run here is listed below with the test that runs it instead; a new
command in a page fails this test until it runs or is listed.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT
from docs_workspace import PAGES, adapted, commands, workspace

pytestmark = pytest.mark.docs

# Commands run elsewhere, with the test that does (checked to exist below).
ELSEWHERE = {
    "make test": "CI: .ci/run runs `make test` itself",
    ". .venv/bin/activate": "setup: every command here runs with .venv/bin first on PATH",
    'make reproduce-table PROFILE=paper LAUNCHER=slurm ARGS="hydra.launcher.partition=gpu"': (
        "tests/engines/test_slurm.py::test_the_docs_slurm_commands_on_the_cluster"
    ),
    'make reproduce-table PROFILE=paper LAUNCHER=slurm ARGS="hydra.launcher.partition=gpu" DETACH=1': (
        "tests/engines/test_slurm.py::test_the_docs_slurm_commands_on_the_cluster"
    ),
    "python src/train.py experiment=table1 profile=paper hydra/launcher=slurm hydra.launcher.partition=gpu": (
        "tests/engines/test_slurm.py::test_the_docs_slurm_commands_on_the_cluster"
    ),
}


def test_every_command_run_elsewhere_is_run_there() -> None:
    listed = [line for page in PAGES for line in commands(page)]
    assert listed, "no command found in the docs"
    for command, where in ELSEWHERE.items():
        assert command in listed, f"ELSEWHERE names a command no page has any more: {command}"
        if "::" in where:
            path, name = where.split("::")
            assert f"def {name}(" in (ROOT / path).read_text(), f"{where} does not exist"


def run_in(work: Path, env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    """A command in the workspace, as a user's shell there would run it."""
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=1200, check=False)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_of_the_page_runs(page: Path, tmp_path: Path, mnist_dir: Path) -> None:
    """The page's commands in order, in one workspace."""
    report = []
    work, env = workspace(tmp_path, mnist_dir)
    for command in commands(page):
        if command in ELSEWHERE:
            report.append(f"{page.name}: {command}  ->  {ELSEWHERE[command]}")
            continue
        started = time.time()
        result = run_in(work, env, "bash", "-c", adapted(command))
        took = time.time() - started
        report.append(f"{page.name}: {command}  ->  exit {result.returncode} in {took:.0f} s")
        assert result.returncode == 0, (
            f"{page.name}: `{command}` exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
    print("\n".join(report))


def test_the_elsewhere_list_is_honest() -> None:
    """Only commands that need SLURM, CI itself or a shell's own state are run elsewhere."""
    for command in ELSEWHERE:
        assert "slurm" in command or command in ("make test", ". .venv/bin/activate"), command
    assert all(shlex.split(c) for c in ELSEWHERE)


def test_the_workspace_runs_compose_its_narrowing(tmp_path: Path, mnist_dir: Path) -> None:
    """The workspace's commands load its conf/local/ (a linked src/ had made Hydra compose the
    checkout's conf/: nothing was narrowed, and reproduce-table ran every experiment's grid)."""
    work, env = workspace(tmp_path, mnist_dir)
    searchpath = run_in(work, env, "python", "src/train.py", "--info", "searchpath")
    shown = run_in(work, env, "python", "src/train.py", "experiment=table1", "profile=smoke", "--cfg", "hydra")
    assert searchpath.returncode == 0 and shown.returncode == 0, searchpath.stderr + shown.stderr
    assert f"file://{work / 'conf'}" in searchpath.stdout, searchpath.stdout
    assert "seed: '0'" in shown.stdout and "routing.iters: 1,3,5,7,10" in shown.stdout, shown.stdout
