"""Evaluate a checkpoint: python src/eval.py ckpt_path=... data=mnist"""

import sys

import hydra
from omegaconf import DictConfig

from capsnet.data.mnist import DataError
from capsnet.run import resolvers
from capsnet.run.evaluation import CheckpointError, evaluate
from capsnet.run.rundir import DamagedFileError, RunDirBusyError
from capsnet.run.validation import ConfigError

resolvers.register()  # before Hydra composes the config


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        record = evaluate(cfg)
    except (CheckpointError, ConfigError, DataError, DamagedFileError, RunDirBusyError) as error:  # before any work
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print({k: v for k, v in record.items() if k.endswith("error")})


if __name__ == "__main__":
    main()
