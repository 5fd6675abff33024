"""A Hydra launcher that places sweep jobs on free GPUs through Ray.

Hydra's Ray launcher submits every job of a sweep as a Ray task at once; Ray starts a task
only when its resources are free, assigns it GPU ids and sets ``CUDA_VISIBLE_DEVICES`` for
it.  This subclass only turns ``jobs_per_gpu`` into each task's GPU share
(``num_gpus = 1 / jobs_per_gpu``), gives every job a fresh worker process
(``max_calls = 1``, so ``CUDA_VISIBLE_DEVICES`` is read before CUDA starts), and refuses to
launch where Ray sees no GPU at all, where the tasks would otherwise wait forever.
The same config reaches a Ray cluster with ``hydra.launcher.ray.init.address=auto``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher


class NoGpuError(RuntimeError):
    """Ray sees no GPU, so no job could ever start."""


class RayGpuLauncher(RayLauncher):
    """Hydra's Ray launcher with ``jobs_per_gpu`` jobs sharing each GPU.

    Args:
        ray: ``init`` (``ray.init`` arguments) and ``remote`` (``ray.remote`` arguments).
        jobs_per_gpu: jobs that run at once on one GPU (an integer >= 1).
        cpus_per_job: CPU cores Ray reserves for each job.
    """

    def __init__(self, ray: DictConfig, jobs_per_gpu: int = 1, cpus_per_job: float = 1.0) -> None:
        if isinstance(jobs_per_gpu, bool) or not isinstance(jobs_per_gpu, int) or jobs_per_gpu < 1:
            raise ValueError(f"hydra.launcher.jobs_per_gpu must be an integer >= 1, got {jobs_per_gpu!r}")
        if isinstance(cpus_per_job, bool) or not isinstance(cpus_per_job, (int, float)) or cpus_per_job < 0:
            raise ValueError(f"hydra.launcher.cpus_per_job must be a number >= 0, got {cpus_per_job!r}")
        config: dict[str, Any] = OmegaConf.to_container(ray, resolve=True)  # type: ignore[assignment]
        config["remote"] = {
            **(config.get("remote") or {}),
            "num_gpus": 1.0 / jobs_per_gpu,
            "num_cpus": cpus_per_job,
            "max_calls": 1,
        }
        super().__init__(ray=OmegaConf.create(config))
        self.jobs_per_gpu = jobs_per_gpu

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        from hydra_plugins.hydra_ray_launcher._launcher_util import start_ray

        self.ray_cfg.init.setdefault("object_store_memory", 78643200)
        start_ray(self.ray_cfg.init)
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus <= 0:
            raise NoGpuError(
                "hydra/launcher=ray places each job on a GPU, and Ray sees none here. "
                "Run the sweep without it (jobs one after another), or declare GPUs with "
                "hydra.launcher.ray.init.num_gpus=N, or connect to a cluster with GPUs "
                "(hydra.launcher.ray.init.address=auto)."
            )
        return super().launch(job_overrides, initial_job_idx)
