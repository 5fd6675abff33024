"""Train one configuration (or a sweep with -m).  See README.md and conf/config.yaml."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from capsnet.data.mnist import DataError
from capsnet.schema import ConfigError
from capsnet.signature import ResumeMismatchError
from capsnet.training import run


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        record = run(cfg)
    except (ConfigError, DataError, ResumeMismatchError) as error:  # before any training: stop, even a sweep
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    summary = {k: record.get(k) for k in ("status", "val_error", "test_error", "affnist_error") if k in record}
    print(f"{summary} -> {cfg.paths.output_dir}/metrics.json")
    if record.get("status") == "failed":
        print(f"run failed: {record.get('error')}", file=sys.stderr)
        if HydraConfig.get().mode.name == "RUN":
            sys.exit(1)
    return record.get("val_error")


if __name__ == "__main__":
    main()
