"""A stand-in sweep job for launcher tests: sleeps a seeded random time and records which
device it was given and when it ran (one JSON file per job in ``record_dir``)."""

import json
import os
import random
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=".", config_name="timed_job")
def main(cfg: DictConfig) -> None:
    import ray

    started = time.time()
    time.sleep(random.Random(cfg.job).uniform(cfg.min_seconds, cfg.max_seconds))
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
