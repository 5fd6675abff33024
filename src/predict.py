"""Classify your own images with a trained checkpoint:
python src/predict.py ckpt_path=outputs/.../checkpoints/best.ckpt inputs=path/to/images

Exit codes: 0 done; 2 refused before any work (a missing or unreadable checkpoint, inputs
that match no readable image, an invalid setting: the message names the key or the file).
"""

import sys

import hydra
from omegaconf import DictConfig

from capsnet.data.base import DataError
from capsnet.run import resolvers
from capsnet.run.evaluation import CheckpointError
from capsnet.run.prediction import predict
from capsnet.run.rundir import DamagedFileError
from capsnet.run.validation import ConfigError

resolvers.register()  # before Hydra composes the config


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        predict(cfg)
    except (CheckpointError, ConfigError, DataError, DamagedFileError) as error:  # before any work
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
