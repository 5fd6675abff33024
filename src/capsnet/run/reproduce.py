"""``make reproduce-table``: every experiment's sweep at once, then the table from what completed.

Each experiment (``experiment=table1``, ``multimnist``, ...) is a sweep of its own, driven by
``src/train.py``.  With a launcher that places jobs on GPUs, all the drivers run at the
same time and feed **one queue**: SLURM's, or one Ray cluster's (for ``ray_gpus`` on one
machine a Ray head is started here for the drivers to share, and stopped at the end), so
no GPU idles while another experiment's jobs wait.  Without a launcher the jobs run here,
one after another.  A failed, refused or lost job never stops the others; at the end the
table is built from the completed runs, the others are listed with their reasons, and the
exit status is 1 if any job did not complete.  Rerunning the same command skips what
completed and resumes what did not (a job still running elsewhere is refused by its run
dir's lock, never trained twice).

``--detach`` runs all of it in the background with its log in ``multirun/``, so nothing
has to stay on a cluster's login node for the days the paper's schedule takes.  Sweeps
go to ``multirun/<experiment>`` under the working directory (the repository's, from make).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the checkout: src/capsnet/run/reproduce.py
LAUNCHERS = ("ray_gpus", "slurm")
PROFILES_NEEDING_A_LAUNCHER_CHOICE = ("fast", "paper")


def train_script() -> Path:
    """The working directory's ``src/train.py`` when it is a checkout (make runs here from the
    repository root), so that its ``conf/`` (with the per-user ``conf/local/``) is the one the
    sweeps compose; this package's own checkout otherwise."""
    here = Path.cwd() / "src" / "train.py"  # not resolved: a linked src/ keeps this conf/
    return here if here.is_file() else ROOT / "src" / "train.py"


def driver_command(experiment: str, args: argparse.Namespace, ray_address: str | None) -> list[str]:
    command = [sys.executable, str(train_script()), f"experiment={experiment}", f"profile={args.profile}"]
    if args.launcher:
        command.append(f"hydra/launcher={args.launcher}")
    if args.launcher == "ray_gpus":
        command.append(f"hydra.launcher.jobs_per_gpu={args.jobs_per_gpu}")
        if ray_address:
            command.append(f"hydra.launcher.ray.init.address={ray_address}")
    if args.wandb:
        command.append("logger=wandb")
    return command + list(args.overrides)


def start_local_ray(base: Path) -> tuple[str, dict[str, str]]:
    """A Ray head for the drivers to share (its GPUs are this machine's)."""
    import torch

    env = {"RAY_HEAD_NUM_GPUS": str(torch.cuda.device_count()), **os.environ}  # a value in the environment wins
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "ray" / "start_head.sh"), str(base)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"could not start a Ray head for the sweeps:\n{result.stderr}")
    address = (base / "address").read_text().strip()
    driver_env = dict(line.split("=", 1) for line in (base / "driver.env").read_text().split())
    return address, driver_env


def sweep_outcomes(experiment: str, since: float) -> list[dict]:
    from capsnet.run.sweep import read_outcomes

    return read_outcomes(Path("multirun") / experiment, since=since)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, help="smoke, demo, fast or paper")
    parser.add_argument("--experiments", nargs="+", default=["table1", "multimnist"])
    parser.add_argument("--launcher", choices=LAUNCHERS, default=None)
    parser.add_argument("--jobs-per-gpu", type=int, default=1)
    parser.add_argument("--wandb", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--detach", action="store_true", help="run in the background; log in multirun/")
    parser.add_argument("overrides", nargs="*", help="more overrides for every job, e.g. hydra.launcher.partition=gpu")
    args = parser.parse_args(argv)

    if args.detach:
        log = Path("multirun").resolve() / f"reproduce-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--detach"]
        with log.open("w") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", "capsnet.run.reproduce", *rest],
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives the end of the login session
            )
        print(f"running in the background (pid {process.pid}); follow it with: tail -f {log}")
        return 0

    started = time.time()
    ray_base: Path | None = None
    env = dict(os.environ)
    address = None
    if args.launcher == "ray_gpus" and not any(
        o.startswith("hydra.launcher.ray.init.address=") for o in args.overrides
    ):
        ray_base = Path(tempfile.mkdtemp(prefix="capsray-", dir="/tmp"))
        address, driver_env = start_local_ray(ray_base)
        env.update(driver_env)
        print(f"one Ray head for every experiment's jobs: {address}")
    try:
        commands = {e: driver_command(e, args, address) for e in args.experiments}
        codes: dict[str, int] = {}
        if args.launcher:  # every driver at once: one queue for every GPU
            processes = {e: subprocess.Popen(c, env=env) for e, c in commands.items()}
            codes = {e: p.wait() for e, p in processes.items()}
        else:  # here, one job after another; a failure never stops the rest
            for experiment, command in commands.items():
                codes[experiment] = subprocess.run(command, env=env, check=False).returncode
    finally:
        if ray_base is not None:
            subprocess.run(["bash", str(ROOT / "scripts" / "ray" / "stop_head.sh"), str(ray_base)], check=False)
            shutil.rmtree(ray_base, ignore_errors=True)

    table = [sys.executable, "-m", "capsnet.reporting.table", *[str(Path("multirun") / e) for e in args.experiments]]
    table += ["--out", str(args.out), "--profile", args.profile] + (["--wandb"] if args.wandb else [])
    built = subprocess.run(table, env=env, check=False).returncode
    not_done = {
        e: [o for o in sweep_outcomes(e, started) if o["status"] not in ("completed", "skipped")]
        for e in args.experiments
    }
    print("\nreproduce-table:")
    for experiment in args.experiments:
        problems = not_done[experiment]
        state = "every job completed" if codes[experiment] == 0 else f"driver exit {codes[experiment]}"
        print(f"  {experiment}: {state}" + (f", {len(problems)} job(s) did not complete:" if problems else ""))
        for outcome in problems:
            print(f"    {','.join(outcome.get('overrides') or [])}: {outcome['status']}: {outcome.get('reason')}")
    if any(codes.values()) or built != 0:
        print("rerun the same command to retry what did not complete (completed jobs are skipped)")
        return 1
    summary = {e: len(sweep_outcomes(e, started)) for e in args.experiments}
    print(f"jobs per experiment this time: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
