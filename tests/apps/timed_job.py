"""A stand-in sweep job for launcher tests: sleeps a seeded random time and records which
device it was given and when it ran (one JSON file per job in ``record_dir``).  Every start
of a job also leaves ``job<n>.<pid>.start`` there (a retried job leaves two), and the jobs
named by ``kill_job`` and ``exit_job`` end their process (SIGKILL, ``sys.exit(2)``) midway,
as a worker killed for memory and a job that refuses its config would."""

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=".", config_name="timed_job")
def main(cfg: DictConfig) -> None:
    import ray

    started = time.time()
    Path(cfg.record_dir, f"job{cfg.job}.{os.getpid()}.start").touch()
    time.sleep(random.Random(cfg.job).uniform(cfg.min_seconds, cfg.max_seconds))
    if cfg.job == cfg.kill_job:
        os.kill(os.getpid(), signal.SIGKILL)
    if cfg.job == cfg.exit_job:
        sys.exit(2)
    record = {
        "job": cfg.job,
        "start": started,
        "end": time.time(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "ray_gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        "pid": os.getpid(),
    }
    Path(cfg.record_dir, f"job{cfg.job}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
