"""Train one configuration (or a sweep with -m).  See README.md and conf/config.yaml.

Exit codes: 0 done (or skipped as already done); 1 the run failed (recorded in its
metrics.json), or a sweep in which some job did not complete; 2 refused before any work
(the message names the key or the file; nothing of the run is written); 128 + signal when
stopped by SIGTERM (143) or SIGINT (130), after saving and recording where it stopped.
Hydra's own errors (an unknown group option, a misspelt key) exit 1 before the job starts.
"""

import sys

import hydra
from omegaconf import DictConfig

from capsnet.run import resolvers
from capsnet.run.signals import Interrupted
from capsnet.run.sweep import in_sweep, record_job_outcome, runs_in_driver
from capsnet.run.training import REFUSALS, RecordWriteError, run

resolvers.register()  # before Hydra composes the config


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    run_dir = cfg.paths.output_dir
    try:
        record = run(cfg)
    except REFUSALS as error:  # before any work
        print(f"error: {error}", file=sys.stderr)
        if not in_sweep():
            sys.exit(2)
        record_job_outcome("refused", str(error), run_dir)  # the sweep goes on
        return None
    except RecordWriteError as error:
        print(f"error: {error}", file=sys.stderr)
        record_job_outcome("failed", str(error), run_dir)
        if not in_sweep():
            sys.exit(1)
        return None
    except Interrupted as error:
        print(f"{error}; run the same command again to resume", file=sys.stderr)
        record_job_outcome("interrupted", str(error), run_dir)
        if not in_sweep() or runs_in_driver():  # Ctrl-C / SIGTERM stops the whole local sweep
            sys.exit(error.exit_code)
        return None
    summary = {k: record.get(k) for k in ("status", "val_error", "test_error", "affnist_error") if k in record}
    print(f"{summary} -> {run_dir}/metrics.json")
    record_job_outcome(record.get("status", "failed"), record.get("error"), run_dir)
    if record.get("status") == "failed":
        print(f"run failed: {record.get('error')}", file=sys.stderr)
        if not in_sweep():
            sys.exit(1)
    return record.get("val_error")


if __name__ == "__main__":
    main()
