"""hydra/launcher=ray_gpus without starting Ray: what it passes to ray.init and ray.remote,
which environment it hands to the jobs, and how it records a lost job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF
from hydra_plugins.capsnet_launchers import ray_gpus

# Names are looked up on the module at call time: Hydra's plugin scan (on compose) executes
# the plugin modules again, which rebinds their classes.
LOCAL_OBJECT_STORE_BYTES = ray_gpus.LOCAL_OBJECT_STORE_BYTES


def _launcher(*overrides: str) -> ray_gpus.RayGpuLauncher:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=ray_gpus", *overrides], return_hydra_config=True)
    return instantiate(cfg.hydra.launcher)


def test_starting_ray_here_sizes_the_object_store_and_never_joins_by_surprise() -> None:
    args, joins = ray_gpus.ray_init_args({"address": None, "include_dashboard": False}, environ={})
    assert not joins
    assert args == {"address": "local", "include_dashboard": False, "object_store_memory": LOCAL_OBJECT_STORE_BYTES}
    args, _ = ray_gpus.ray_init_args({"address": None, "num_gpus": 2, "object_store_memory": 10**9}, environ={})
    assert args == {"address": "local", "num_gpus": 2, "object_store_memory": 10**9}


@pytest.mark.parametrize(
    ("init", "environ", "address"),
    [
        ({"address": "auto"}, {}, "auto"),
        ({"address": "10.0.0.5:6379", "include_dashboard": False}, {}, "10.0.0.5:6379"),
        ({"address": None}, {"RAY_ADDRESS": "10.0.0.7:6379"}, "10.0.0.7:6379"),  # as `ray job submit` sets it
    ],
)
def test_joining_a_cluster_passes_no_start_only_argument(init: dict, environ: dict, address: str) -> None:
    args, joins = ray_gpus.ray_init_args(init, environ=environ)
    assert joins and args["address"] == address
    assert "object_store_memory" not in args  # Ray refuses it when connecting


def test_a_start_only_argument_is_refused_when_joining_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"hydra\.launcher\.ray\.init\.num_gpus .*ray start --num-gpus"):
        ray_gpus.ray_init_args({"address": "auto", "num_gpus": 2}, environ={})


def test_the_driver_environment_that_matters_reaches_every_job() -> None:
    environ = {
        "CAPSNET_DATA_DIR": "/shared/data",
        "WANDB_MODE": "offline",
        "PYTHONPATH": "/shared/capsnet/src",
        "HOME": "/home/me",
        "CUDA_VISIBLE_DEVICES": "3",
        "RAY_ADDRESS": "10.0.0.5:6379",
    }
    launcher = _launcher()
    options = launcher.remote_options(environ)
    assert options["runtime_env"] == {
        "env_vars": {"CAPSNET_DATA_DIR": "/shared/data", "PYTHONPATH": "/shared/capsnet/src", "WANDB_MODE": "offline"}
    }
    # A Ray started here: its workers inherit the driver's whole environment, no runtime_env.
    assert "runtime_env" not in launcher.remote_options(environ, forward=False)
    # Ray sets the GPU and its own address per task and node: never copied, even when asked.
    assert ray_gpus.forwarded_env(["*"], environ) == {
        k: v for k, v in environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "RAY_ADDRESS")
    }


def test_task_options_share_gpus_run_each_job_in_a_fresh_process_and_do_not_retry() -> None:
    options = _launcher("hydra.launcher.jobs_per_gpu=4", "hydra.launcher.cpus_per_job=2").remote_options({})
    assert options == {"max_retries": 0, "num_gpus": 0.25, "num_cpus": 2, "max_calls": 1}
    assert _launcher("hydra.launcher.ray.remote={}").remote_options({})["max_retries"] == 0
    assert _launcher("hydra.launcher.ray.remote.max_retries=2").remote_options({})["max_retries"] == 2


def test_an_explicit_runtime_env_variable_wins_over_the_forwarded_one() -> None:
    launcher = _launcher(
        "+hydra.launcher.ray.remote.runtime_env.env_vars.CAPSNET_DATA_DIR=/node/data",
        "+hydra.launcher.ray.remote.runtime_env.pip=[einops]",
    )
    options = launcher.remote_options({"CAPSNET_DATA_DIR": "/driver/data", "WANDB_MODE": "offline"})
    assert options["runtime_env"] == {
        "env_vars": {"CAPSNET_DATA_DIR": "/node/data", "WANDB_MODE": "offline"},
        "pip": ["einops"],
    }


@pytest.mark.parametrize("bad", ["CAPSNET_*", [1]])
def test_forward_env_must_be_a_list_of_names(bad: object) -> None:
    with pytest.raises(ValueError, match="forward_env"):
        ray_gpus.RayGpuLauncher(ray=OmegaConf.create({"init": {}, "remote": {}}), forward_env=bad)  # type: ignore[arg-type]


def test_a_record_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "jobs" / "3.json"
    ray_gpus.write_json_atomically(path, {"job": 3, "status": "running"})
    ray_gpus.write_json_atomically(path, {"job": 3, "status": "lost"})
    assert json.loads(path.read_text()) == {"job": 3, "status": "lost"}
    assert [p.name for p in path.parent.iterdir()] == ["3.json"]  # no temp file left behind


def test_the_reason_names_the_job_own_error_where_ray_carries_one() -> None:
    class FakeRayTaskError(Exception):
        def __init__(self, cause: BaseException) -> None:
            super().__init__("traceback of the remote task ...")
            self.cause = cause

    assert (
        ray_gpus.lost_reason(FakeRayTaskError(ray_gpus.JobExit("the job ended its process")))
        == "JobExit: the job ended its process"
    )
    assert (
        ray_gpus.lost_reason(RuntimeError("The worker died unexpectedly"))
        == "RuntimeError: The worker died unexpectedly"
    )
    assert len(ray_gpus.lost_reason(RuntimeError("x" * 10_000))) < 2100


def test_a_job_whose_node_cannot_see_the_sweep_dir_stops_instead_of_writing_elsewhere(tmp_path: Path) -> None:
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "not-shared")}}})
    with pytest.raises(ray_gpus.SweepDirNotShared, match="shared by every node"):
        ray_gpus._run_job_in_worker(None, config, None, {}, driver_cwd=str(tmp_path), driver_host="driver")
