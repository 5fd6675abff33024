"""The GPU tier (tests/gpu/test_gpu.py), checked as far as a CPU can check it.

Every run the GPU tests make composes from the real config with the tests' own overrides and
passes validate_config, its probes and launcher instantiate, and, with ``trainer=cpu`` in
place of ``trainer=gpu``, Lightning builds its Trainer: a typo in a GPU test's overrides
fails here, in the default suite.  The checks whose code path a CPU can take run here on the
CPU (the slow ones under ``-m slow``), and the two CUDA-graph and compile fixes of the run's
code are pinned down.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from capsnet.nn.models import CapsNet, count_parameters
from capsnet.run.validation import validate_config
from conftest import CONF, run_cli
from gpu import tier


def _compose(overrides: list[str], output_dir: Path, data_dir: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.data_dir = str(data_dir)
    return cfg


def _as_run(name: str, folder: Path) -> list[str]:
    overrides, through_make_cfg = tier.all_runs(folder)[name]
    return [*tier.MAKE_CFG_BASE, *overrides] if through_make_cfg else overrides


@pytest.mark.parametrize("name", tier.RUN_NAMES)
def test_every_gpu_tier_run_composes_validates_and_builds(name: str, tmp_path: Path, mnist_dir: Path) -> None:
    overrides = _as_run(name, tmp_path)
    assert tier.GPU in overrides, "a GPU-tier run must ask for the GPU trainer"
    cfg = _compose(overrides, tmp_path / "run", mnist_dir)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
    validate_config(cfg)
    for node in cfg.callbacks.values():  # the probes exist and take these arguments
        instantiate(node)
    if "ray" in name:
        launcher = instantiate(cfg.hydra.launcher)
        assert launcher.jobs_per_gpu == 2 and cfg.hydra.launcher.ray.init.num_gpus == 1
    # the same run on the CPU: Lightning accepts the trainer arguments (precision, deterministic, ...)
    from capsnet.run.training import build_trainer

    cpu = _compose(tier.on_device(overrides, "cpu"), tmp_path / "cpu", mnist_dir)
    validate_config(cpu)
    trainer, _ = build_trainer(cpu, tmp_path / "cpu")
    assert trainer.max_epochs == cpu.trainer.max_epochs
    torch.use_deterministic_algorithms(False)  # Trainer(deterministic=True) sets it process-wide


def test_the_larger_capsnets_have_the_sizes_the_memory_test_expects() -> None:
    for data, size in (("multimnist", 36), ("affnist", 40)):
        assert count_parameters(CapsNet(input_size=size)) == tier.MEMORY_PARAMETERS[data], data


def test_a_deterministic_run_gets_the_cublas_workspace_config(tmp_path: Path, mnist_dir: Path, monkeypatch) -> None:
    """deterministic=true reaches Lightning's Trainer(deterministic=True), which sets
    CUBLAS_WORKSPACE_CONFIG (torch refuses cuBLAS calls under deterministic algorithms
    without it) when the run builds its trainer, before any CUDA work of the run."""
    from capsnet.run.training import build_trainer

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    cfg = _compose(tier.on_device(tier.DETERMINISTIC_RUN, "cpu"), tmp_path / "run", mnist_dir)
    try:
        build_trainer(cfg, tmp_path / "run")
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


# ---- the fixes: figures drawn eagerly, one CUDA-graph step per batch ----------------------
def test_figures_are_drawn_eagerly_when_the_network_is_compiled(tmp_path: Path) -> None:
    """perf.compile compiles each layer; the figures' new batch sizes and iterations=1..10
    recompiled the digit capsules past dynamo's limit (about 45 s at the end of a smoke run
    on this CPU) and, under CUDA graphs, keep outputs that the next call overwrites.  They
    are drawn with compilation off (dynamo's backend "eager" here: tracing, no codegen)."""
    from torch._dynamo.utils import counters

    from capsnet.reporting.figures import write_run_figures

    torch.manual_seed(0)
    net = CapsNet(conv1_channels=16, primary_types=4)
    for child in net.children():
        child.compile(backend="eager")
    images, labels = torch.rand(8, 1, 28, 28), torch.arange(8)
    torch._dynamo.reset()
    counters.clear()
    written = write_run_figures(net, {"test": (images, labels)}, tmp_path, "single")
    assert {p.name for p in written} >= {"reconstructions.png", "dimension_perturbation.png", "routing_convergence.png"}
    assert counters["frames"]["total"] == 0, dict(counters["frames"])
    net.conv1(images)  # the layers are compiled all the same
    assert counters["frames"]["total"] > 0


@pytest.mark.parametrize(
    ("mode", "marks"), [("reduce-overhead", 3), ("max-autotune", 3), (True, 0), ("max-autotune-no-cudagraphs", 0)]
)
def test_cuda_graph_modes_begin_a_cuda_graph_step_at_every_batch(mode, marks: int, monkeypatch) -> None:
    """Each layer is compiled on its own; without a backward pending (validation, test) each
    compiled call would start a new CUDA-graph step and free the previous layer's output,
    this layer's input.  Every batch marks one step instead (only under CUDA-graph modes)."""
    from capsnet.run.module import CapsNetModule

    calls = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: calls.append(1))
    model = {"name": "capsnet", "conv1_channels": 16, "primary_types": 4}
    data = {"image_size": 28, "in_channels": 1, "num_classes": 10, "task": "single"}
    loss = {"m_pos": 0.9, "m_neg": 0.1, "lam": 0.5, "recon_weight": 0.0005, "official_scaling": False}
    module = CapsNetModule(model, data, {**loss, "mask_with_label_at_test": False}, {}, compile=mode)
    module.on_train_batch_start(None, 0)
    module.on_validation_batch_start(None, 0)
    module.on_test_batch_start(None, 0, 1)
    assert len(calls) == marks


# ---- the GPU checks, run on the CPU ---------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16-true", "16-mixed"])
def test_the_precision_check_passes_on_the_cpu(precision: str, make_cfg, tmp_path: Path) -> None:
    """The GPU tier's precision check, on a narrow CapsNet: figures in bfloat16 under
    bf16-true, exact counts, the dtypes each phase computes in (16-mixed runs as bf16-mixed
    here)."""
    overrides = tier.replacing(tier.on_device(tier.PRECISION_RUN, "cpu"), *tier.CPU_SCALE)
    seen = tier.check_precision_run(make_cfg, tmp_path, precision, overrides, device="cpu")
    print(f"{precision} on the CPU: {seen['dtypes']}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", tier.COMPILE_MODES)
def test_the_compile_check_passes_on_the_cpu(mode: str, make_cfg, tmp_path: Path, monkeypatch) -> None:
    """torch accepts every compile mode on a CPU (CUDA graphs are skipped there), the run
    completes with figures, and its first loss equals the uncompiled one.  Minutes: dynamo
    and inductor compile each layer for training and for evaluation on two cores.  Under a
    CUDA-graph mode every training, validation and test batch marks one CUDA-graph step."""
    from capsnet.run.module import CUDA_GRAPH_MODES

    marks = []
    original = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1) or original())
    overrides = tier.on_device(tier.COMPILE_RUN, "cpu")
    _, eager = tier.check_compile_run(make_cfg, tmp_path / "eager", "false", overrides)
    assert marks == []
    _, compiled = tier.check_compile_run(make_cfg, tmp_path, mode, overrides)
    tier.assert_same_first_loss(compiled, eager, mode)
    # 6 training steps, 2 validation and 2 test batches of 32
    assert len(marks) == (tier.COMPILE_STEPS + 2 + 2 if mode in CUDA_GRAPH_MODES else 0)
    print(f"perf.compile={mode} on the CPU: first loss {compiled[0]['loss']:.7f}, uncompiled {eager[0]['loss']:.7f}")


@pytest.mark.slow
def test_the_two_jobs_check_passes_on_the_cpu_with_a_declared_gpu(tmp_path: Path, mnist_dir: Path) -> None:
    """The Ray sweep of the GPU tier with trainer=cpu (Ray is told of one GPU, which it hands
    both jobs): both complete, meet at step 1 and overlap, with the same CUDA_VISIBLE_DEVICES."""
    sweep_dir, meet_dir = tmp_path / "sweep", tmp_path / "meet"
    args = tier.on_device(tier.ray_sweep_args(meet_dir), "cpu")
    small = ["trainer.limit_train_batches=3", "data.batch_size=8", "data.val_subset=16", "data.test_subset=16"]
    result = run_cli(
        "train.py", *args, *small, f"paths.data_dir={mnist_dir}", f"hydra.sweep.dir={sweep_dir}", timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")]
    assert sorted(r["routing_iters"] for r in records) == [1, 3] and all(r["status"] == "completed" for r in records)
    jobs = tier.check_jobs_met(meet_dir, 2)
    assert {j["cuda_visible_devices"] for j in jobs} == {"0"} and {j["device"] for j in jobs} == {"cpu"}
    print(f"two jobs on the CPU, Ray's GPU {jobs[0]['cuda_visible_devices']}: overlapped", file=sys.stderr)
