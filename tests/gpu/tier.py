"""The GPU tier's runs in one place: the overrides of every run of tests/gpu/test_gpu.py, and
the checks that do not need a GPU to be stated.

tests/integration/test_gpu_tier_configs.py composes and validates each override list in the
default CPU suite (a typo in a GPU test's overrides fails there, on any machine), and runs
on the CPU those checks whose code path a CPU can take.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

GPU = "trainer=gpu"
# What conftest's make_cfg puts before a test's own overrides; run_cli runs name them.
MAKE_CFG_BASE = ["profile=smoke", "logger=none"]


def on_device(overrides: list[str], device: str) -> list[str]:
    """``overrides`` with ``trainer=gpu`` replaced by ``trainer=<device>``."""
    return [f"trainer={device}" if o == GPU else o for o in overrides]


def replacing(overrides: list[str], *changes: str) -> list[str]:
    """``overrides`` with each key of ``changes`` set to its new value (Hydra refuses a key
    given twice)."""
    keys = {c.split("=", 1)[0].lstrip("+") for c in changes}
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+") not in keys] + list(changes)


# ---- 1. precisions: figures on, exact counts ---------------------------------------------
PRECISIONS = ["32-true", "bf16-mixed", "bf16-true", "16-mixed"]
# Odd totals above 256 that bfloat16 (8 significant bits) cannot represent: a count kept in
# the model's dtype would be off.  The last eval batches are partial.
PRECISION_RUN = [
    GPU,
    "data.train_subset=2048",
    "trainer.limit_train_batches=null",
    "data.val_subset=301",
    "data.test_subset=333",
    "data.eval_batch_size=64",
    "figures=true",
    "+callbacks.counts._target_=apps.probes.ErrorCounts",
    "+callbacks.dtypes._target_=apps.probes.PrecisionRecord",
]
# A narrow CapsNet and few examples, for a CPU to run the same check in seconds (the CPU
# suite's test_precision_counts.py counts above 256 under every precision already).
CPU_SCALE = [
    "model.conv1_channels=16",
    "model.primary_types=4",
    "data.train_subset=64",
    "data.val_subset=37",
    "data.test_subset=45",
    "data.eval_batch_size=16",
]


def precision_run(overrides: list[str], precision: str, folder: Path) -> list[str]:
    return [
        *overrides,
        f"trainer.precision={precision}",
        f"+callbacks.counts.path={folder / 'counts.json'}",
        f"+callbacks.dtypes.path={folder / 'dtypes.json'}",
    ]


def expected_dtypes(precision: str, device: str) -> dict[str, str]:
    """What each phase computes in: the first layer's output in training (autocast's dtype
    under a mixed precision, the weights' under a pure one) and in the figures (drawn in
    the weights' dtype, outside autocast).  Lightning runs 16-mixed as bf16-mixed on a CPU."""
    if device == "cpu" and precision == "16-mixed":
        precision = "bf16-mixed"
    train = {"32-true": "float32", "bf16-mixed": "bfloat16", "bf16-true": "bfloat16", "16-mixed": "float16"}
    weights = "bfloat16" if precision == "bf16-true" else "float32"
    return {"train": f"torch.{train[precision]}", "weights": f"torch.{weights}"}


def check_precision_run(
    make_cfg: Callable[..., DictConfig], tmp_path: Path, precision: str, overrides: list[str], device: str
) -> dict[str, Any]:
    """A real run under ``precision`` with figures on: it completes, draws every figure in
    the weights' dtype, counts each validation and test example exactly once (the record's
    counts equal the subsets), its errors match an independent recount, and it computes
    in the dtype the precision promises (16-mixed on CUDA: float16 with a loss scaler)."""
    from capsnet.run.training import run

    counts, dtypes = tmp_path / "counts.json", tmp_path / "dtypes.json"
    cfg = make_cfg(*precision_run(overrides, precision, tmp_path), output_dir=tmp_path / "run")
    record = run(cfg)
    assert record["status"] == "completed", record.get("error")
    assert "figures_error" not in record, record["figures_error"]
    assert {"reconstructions.png", "dimension_perturbation.png", "routing_convergence.png"} <= set(record["figures"])
    val_n, test_n = int(cfg.data.val_subset), int(cfg.data.test_subset)
    assert (record["val_examples"], record["test_examples"]) == (val_n, test_n)
    probe = json.loads(counts.read_text())
    assert set(probe["state_dtypes"].values()) == {"torch.float32"}, probe["state_dtypes"]
    (_, val_wrong), (_, test_wrong) = probe["counts"]["val"], probe["counts"]["test"]
    assert [probe["counts"][s][0] for s in ("val", "test")] == [val_n, test_n]
    # the recount is a second forward pass: on a GPU a kernel may round one example differently
    assert abs(record["val_error"] * val_n - val_wrong) <= 1 + 1e-4, (record["val_error"], val_wrong)
    assert abs(record["test_error"] * test_n - test_wrong) <= 1 + 1e-4, (record["test_error"], test_wrong)
    seen = json.loads(dtypes.read_text())
    want = expected_dtypes(precision, device)
    outputs = seen["outputs"]
    assert outputs["train"] == {"dtype": want["train"], "device": device}, outputs
    assert outputs["figures"] == {"dtype": want["weights"], "device": device}, outputs
    assert seen["train_weights"] == seen["figures_weights"] == want["weights"], seen
    if device == "cuda" and precision == "16-mixed":  # float16 autocast with loss scaling
        assert seen["loss_scale"] is not None and 0 < seen["loss_scale"] < float("inf"), seen
    else:
        assert seen["loss_scale"] is None, seen
    return {"record": record, "counts": probe, "dtypes": seen}


# ---- 2. torch.compile modes --------------------------------------------------------------
COMPILE_MODES = ["true", "reduce-overhead", "max-autotune-no-cudagraphs"]
# float32 without TF32, so the compiled first loss must equal the eager one to float rounding.
COMPILE_RUN = [
    GPU,
    "perf.matmul_precision=highest",
    "data.batch_size=32",
    "data.train_subset=256",
    "trainer.limit_train_batches=6",
    "data.val_subset=64",
    "data.test_subset=64",
    "data.eval_batch_size=32",
    "figures=true",
    "+callbacks.losses._target_=apps.probes.StepLosses",
]
COMPILE_STEPS = 6


def compile_run(overrides: list[str], mode: str, folder: Path) -> list[str]:
    return [*overrides, f"perf.compile={mode}", f"+callbacks.losses.path={folder / f'losses-{mode}'}"]


def step_losses(folder: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (folder / "rank0.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: r["step"])


def check_compile_run(
    make_cfg: Callable[..., DictConfig], tmp_path: Path, mode: str, overrides: list[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A short run with ``perf.compile=<mode>`` completes (training, validation, test and
    figures), every training loss is finite, and every training batch has the same shape
    (what CUDA graphs need to replay instead of re-recording).  The run really compiled
    (dynamo captured graphs; its caches are reset first, so no earlier run's compiled code
    or recompile count carries over), and under a CUDA-graph mode on a GPU no graph fell
    back from CUDA graphs."""
    from torch._dynamo.utils import counters

    from capsnet.run.module import CUDA_GRAPH_MODES
    from capsnet.run.training import run

    losses = tmp_path / f"losses-{mode}"
    cfg = make_cfg(*compile_run(overrides, mode, tmp_path), output_dir=tmp_path / f"run-{mode}")
    torch._dynamo.reset()
    counters.clear()
    record = run(cfg)
    assert record["status"] == "completed", record.get("error")
    graphs = counters["stats"]["unique_graphs"]
    assert (graphs > 0) == (mode != "false"), f"perf.compile={mode}: dynamo captured {graphs} graphs"
    if mode in CUDA_GRAPH_MODES and cfg.trainer.accelerator == "gpu":
        assert counters["inductor"]["cudagraph_skips"] == 0, "some compiled graphs did not run as CUDA graphs"
    assert "figures_error" not in record, record["figures_error"]
    rows = step_losses(losses)
    assert [r["step"] for r in rows] == list(range(COMPILE_STEPS)), rows
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows), rows
    assert {r["n"] for r in rows} == {int(cfg.data.batch_size)}, rows
    return record, rows


def assert_same_first_loss(compiled: list[dict[str, Any]], eager: list[dict[str, Any]], mode: str) -> None:
    """Step 0 sees the same weights (same seed) and the same batch: float32 without TF32
    agrees to rounding (a fused kernel sums in another order)."""
    assert compiled[0]["step"] == eager[0]["step"] == 0
    assert compiled[0]["loss"] == pytest.approx(eager[0]["loss"], rel=1e-4), (mode, compiled[0], eager[0])


# ---- 3, 4. deterministic runs and exact resume -------------------------------------------
# Two epochs of 6 steps, last.ckpt every 2 steps; the kill falls mid-epoch 1 (after the
# step-8 checkpoint), so the rerun resumes across an epoch's validation.
DETERMINISTIC_RUN = [
    GPU,
    "profile=smoke",
    "logger=none",
    "deterministic=true",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "data.batch_size=32",
    "data.val_subset=64",
    "data.eval_batch_size=32",
    "data.test_subset=64",
    "checkpoint.every_n_steps=2",
    "trainer.log_every_n_steps=1",
    "figures=false",
]
DETERMINISTIC_STEPS = 12
KILL_MID_EPOCH = [
    "+callbacks.kill._target_=apps.probes.KillAt",
    "+callbacks.kill.phase=train_step",
    "+callbacks.kill.step=9",
]


# ---- 5. peak memory of the 36×36 and 40×40 CapsNets at batch 128 -------------------------
MEMORY_RUNS = {
    data: [
        GPU,
        f"data={data}",
        "data.batch_size=128",
        "data.train_subset=1280",
        "trainer.limit_train_batches=5",
        "data.val_subset=256",
        "data.test_subset=256",
        "data.eval_batch_size=128",
        "figures=false",
        "nan_check_every=1000",
        "+callbacks.memory._target_=apps.probes.CudaPeakMemory",
    ]
    for data in ("multimnist", "affnist")
}
MEMORY_STEPS = 5
# The paper's CapsNet on 36×36 (3200 primary capsules) and 40×40 (4608) inputs, with decoder.
MEMORY_PARAMETERS = {"multimnist": 11_361_808, "affnist": 13_475_648}
# The docs' sizing (reliability.md: 100 routing iterations already take about 6 GB of a
# 16 GB GPU): at r = 3 a job must fit a 16 GB GPU with room to spare.
MEMORY_LIMIT_BYTES = 15 * 2**30


def memory_run(data: str, folder: Path) -> list[str]:
    return [*MEMORY_RUNS[data], f"+callbacks.memory.path={folder / f'memory-{data}.json'}"]


# ---- 6. two sweep jobs on one GPU under Ray ----------------------------------------------
# num_gpus=1: Ray sees one GPU even on a larger machine, so both jobs must share it.
RAY_SWEEP = [
    "-m",
    "hydra/launcher=ray_gpus",
    "hydra.launcher.jobs_per_gpu=2",
    "+hydra.launcher.ray.init.num_gpus=1",
    GPU,
    "profile=smoke",
    "logger=none",
    "figures=false",
    "+callbacks.meet._target_=apps.probes.MeetOtherJobs",
    "+callbacks.meet.jobs=2",
]
RAY_SWEEP_PARAMS = ("routing.iters", [1, 3])


def ray_sweep_args(meet_dir: Path) -> list[str]:
    key, values = RAY_SWEEP_PARAMS
    return [*RAY_SWEEP, f"+callbacks.meet.folder={meet_dir}", f"{key}={','.join(map(str, values))}"]


def check_jobs_met(meet_dir: Path, jobs: int) -> list[dict[str, Any]]:
    """Every job trained, all of them at once (each met the others at its step, and their
    training intervals overlap), each in its own process, all given the same device."""
    records = [json.loads(p.read_text()) for p in sorted(meet_dir.glob("*.json"))]
    assert len(records) == jobs, records
    assert all(r.get("met") for r in records), records
    assert len({r["pid"] for r in records}) == jobs, records
    assert max(r["start"] for r in records) < min(r["end"] for r in records), "the jobs' training did not overlap"
    devices = {r["cuda_visible_devices"] for r in records}
    assert len(devices) == 1 and None not in devices and "" not in devices, devices
    return records


# ---- every run above, by name: what the CPU suite composes -------------------------------
def all_runs(folder: Path) -> dict[str, tuple[list[str], bool]]:
    """name -> (the run's overrides, with its probes writing under ``folder``; whether the
    test composes them through make_cfg (True) or passes them on the command line)."""
    runs: dict[str, tuple[list[str], bool]] = {}
    for precision in PRECISIONS:
        runs[f"precision-{precision}"] = (precision_run(PRECISION_RUN, precision, folder), True)
    for mode in [*COMPILE_MODES, "false"]:
        runs[f"compile-{mode}"] = (compile_run(COMPILE_RUN, mode, folder), True)
    runs["deterministic"] = (DETERMINISTIC_RUN, False)
    runs["deterministic-killed"] = ([*DETERMINISTIC_RUN, *KILL_MID_EPOCH], False)
    for data in MEMORY_RUNS:
        runs[f"memory-{data}"] = (memory_run(data, folder), True)
    key, values = RAY_SWEEP_PARAMS
    for value in values:  # one job of the sweep each: -m and the sweep's list are the command line's
        job = [o for o in ray_sweep_args(folder / "meet") if o != "-m" and not o.startswith(f"{key}=")]
        runs[f"ray-{key}={value}"] = ([*job, f"{key}={value}"], False)
    return runs


RUN_NAMES = list(all_runs(Path("unused")))
