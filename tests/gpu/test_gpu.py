"""CUDA checks: make test-gpu (pytest -m gpu -rP).  Each test is skipped, with its reason, without a GPU.

The overrides of these runs live in tests/gpu/tier.py, where the default CPU suite composes and
validates every one of them (tests/integration/test_gpu_tier_configs.py) and runs on the CPU
the checks a CPU can take.  Each test prints its numbers (seconds, peak memory) under -rP.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from capsnet.nn.routing.dynamic import dynamic_routing
from capsnet.run.rundir import load_checkpoint_file
from capsnet.run.training import run
from conftest import run_cli
from gpu import tier

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA GPUs")
pytestmark = [pytest.mark.gpu, needs_cuda]


def _gpu() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


def test_routing_on_cuda_matches_cpu() -> None:
    u_hat = torch.randn(8, 1152, 10, 16, dtype=torch.float64)
    v_cpu, c_cpu = dynamic_routing(u_hat, 3)
    v_gpu, c_gpu = dynamic_routing(u_hat.cuda(), 3)
    torch.testing.assert_close(v_gpu.cpu(), v_cpu)
    torch.testing.assert_close(c_gpu.cpu(), c_cpu)


# ---- 1. every precision, figures on, exact counts -----------------------------------------
@pytest.mark.parametrize("precision", tier.PRECISIONS)
def test_precision_on_gpu_with_figures_counts_exactly(precision: str, make_cfg, tmp_path: Path) -> None:
    """bf16-true draws its figures in bfloat16 on the GPU; 16-mixed trains under float16
    autocast with a loss scaler; under each the run completes, counts 301 validation and 333
    test examples exactly, and learns (2,048 digits, one epoch)."""
    started = time.time()
    seen = tier.check_precision_run(make_cfg, tmp_path, precision, tier.PRECISION_RUN, device="cuda")
    record = seen["record"]
    assert record["val_error"] < 0.9, record["val_error"]
    print(
        f"\n{_gpu()}: {precision}: {time.time() - started:.1f} s; train output {seen['dtypes']['outputs']['train']}, "
        f"figures {seen['dtypes']['outputs']['figures']}, loss scale {seen['dtypes']['loss_scale']}; "
        f"val {record['val_examples']} examples, error {record['val_error']:.4f}; "
        f"test {record['test_examples']}, error {record['test_error']:.4f}"
    )


@pytest.mark.parametrize("data", ["mnist", "multimnist"])
def test_steady_training_steps_never_sync(make_cfg, data: str) -> None:
    """Under torch.cuda.set_sync_debug_mode("error"), any sync in steps 3..39 raises."""
    cfg = make_cfg(
        "trainer=gpu",
        f"data={data}",
        "data.batch_size=128",
        "data.train_subset=5120",
        "trainer.limit_train_batches=40",
        "data.val_subset=256",
        "data.test_subset=256",
        "nan_check_every=1000",
        "trainer.log_every_n_steps=1000",
        "checkpoint.every_n_steps=1000",
        "figures=false",
        "+callbacks.sync._target_=apps.probes.SyncDebugAfter",
        "+callbacks.sync.step=3",
    )
    record = run(cfg)
    assert record["status"] == "completed", record
    assert record["steps"] == 40


# ---- 2. torch.compile in its modes --------------------------------------------------------
_EAGER: dict[str, list] = {}  # the uncompiled run's step losses, computed once per session


@pytest.mark.parametrize("mode", tier.COMPILE_MODES)
def test_compile_mode_trains_and_matches_the_eager_first_loss(mode: str, make_cfg, tmp_path: Path) -> None:
    """perf.compile=<mode>: six training steps, validation, test and figures complete, every
    loss is finite, every training batch has one shape (CUDA graphs replay), and the first
    step's loss equals the uncompiled model's from the same seed (float32, no TF32)."""
    if "eager" not in _EAGER:
        started = time.time()
        _, _EAGER["eager"] = tier.check_compile_run(make_cfg, tmp_path / "eager", "false", tier.COMPILE_RUN)
        _EAGER["seconds"] = [time.time() - started]
    started = time.time()
    record, losses = tier.check_compile_run(make_cfg, tmp_path, mode, tier.COMPILE_RUN)
    seconds = time.time() - started
    tier.assert_same_first_loss(losses, _EAGER["eager"], mode)
    print(
        f"\n{_gpu()}: perf.compile={mode}: {seconds:.1f} s (compilation included; uncompiled "
        f"{_EAGER['seconds'][0]:.1f} s), training {record['training_wall_time_s']:.1f} s; first loss "
        f"{losses[0]['loss']:.7f} vs uncompiled {_EAGER['eager'][0]['loss']:.7f}; last loss {losses[-1]['loss']:.6f}"
    )


# ---- 3, 4. deterministic=true: identical reruns, exact resume -----------------------------
def _train(run_dir: Path, mnist_dir: Path, *extra: str):
    return run_cli(
        "train.py", *tier.DETERMINISTIC_RUN, f"paths.data_dir={mnist_dir}", f"hydra.run.dir={run_dir}", *extra
    )


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["state_dict"]


def _assert_bit_identical(run_dir: Path, reference: dict) -> dict:
    record = json.loads((run_dir / "metrics.json").read_text())
    ref = reference["record"]
    assert record["status"] == "completed", record
    assert record["steps"] == ref["steps"] == tier.DETERMINISTIC_STEPS
    assert (record["val_error"], record["test_error"]) == (ref["val_error"], ref["test_error"])
    weights = _weights(run_dir)
    assert weights.keys() == reference["weights"].keys()
    for name, tensor in reference["weights"].items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0, msg=name)
    return record


@pytest.fixture(scope="module")
def deterministic_reference(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> dict:
    """An uninterrupted deterministic=true run on the GPU."""
    run_dir = tmp_path_factory.mktemp("deterministic") / "run"
    started = time.time()
    result = _train(run_dir, mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        "record": json.loads((run_dir / "metrics.json").read_text()),
        "weights": _weights(run_dir),
        "seconds": time.time() - started,
    }


def test_deterministic_runs_on_cuda_give_bit_identical_weights(
    deterministic_reference: dict, tmp_path: Path, mnist_dir: Path
) -> None:
    """The same command twice with deterministic=true: bit-identical final weights, the same
    scores.  (Lightning's Trainer(deterministic=True) sets CUBLAS_WORKSPACE_CONFIG=:4096:8 before
    any CUDA work of the run; torch refuses a cuBLAS call under deterministic algorithms without it.)"""
    started = time.time()
    result = _train(tmp_path / "run", mnist_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    record = _assert_bit_identical(tmp_path / "run", deterministic_reference)
    print(
        f"\n{_gpu()}: deterministic=true, {record['steps']} steps: two runs bit-identical "
        f"({deterministic_reference['seconds']:.1f} s and {time.time() - started:.1f} s a run, start-up included)"
    )


def test_a_run_killed_mid_epoch_on_cuda_resumes_to_the_same_weights(
    deterministic_reference: dict, tmp_path: Path, mnist_dir: Path
) -> None:
    """SIGKILL as training step 9 starts (mid-epoch 1, last.ckpt at step 8), then the same
    command again: it resumes and ends bit-identical to the uninterrupted run."""
    run_dir = tmp_path / "run"
    killed = _train(run_dir, mnist_dir, *tier.KILL_MID_EPOCH)
    assert killed.returncode == -9, f"the probe did not kill the run: {killed.stderr[-2000:]}"
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "running"
    at_kill = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert at_kill == 8, at_kill
    started = time.time()
    rerun = _train(run_dir, mnist_dir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    record = _assert_bit_identical(run_dir, deterministic_reference)
    assert record["resumed_from"].endswith("last.ckpt"), record
    print(
        f"\n{_gpu()}: killed at step 9 with last.ckpt at step {at_kill}; the rerun ({time.time() - started:.1f} s) "
        f"resumed and ended bit-identical to the uninterrupted run"
    )


# ---- 5. the 36×36 and 40×40 CapsNets at batch 128 ----------------------------------------
@pytest.mark.parametrize("data", list(tier.MEMORY_RUNS))
def test_peak_memory_of_the_larger_capsnets_at_batch_128(data: str, make_cfg, tmp_path: Path) -> None:
    """Five training steps of the paper's CapsNet (r3 + reconstruction) on 36×36 MultiMNIST
    and 40×40 affNIST-protocol digits at batch 128: the run completes and its training
    fits a 16 GB GPU.  Prints the peak memory and the time per step."""
    cfg = make_cfg(*tier.memory_run(data, tmp_path), output_dir=tmp_path / "run")
    record = run(cfg)
    assert record["status"] == "completed", record.get("error")
    assert record["steps"] == tier.MEMORY_STEPS
    assert record["parameters"] == tier.MEMORY_PARAMETERS[data]
    memory = json.loads((tmp_path / f"memory-{data}.json").read_text())
    assert 0 < memory["peak_bytes"] < tier.MEMORY_LIMIT_BYTES, memory
    print(
        f"\n{memory['device']}: {data} CapsNet ({record['parameters']:,} parameters), batch 128, precision "
        f"{record['precision']}: peak {memory['peak_bytes'] / 2**20:.0f} MB in training, "
        f"{memory['seconds'] / memory['steps']:.3f} s a step over {memory['steps']} steps (first step included)"
    )


# ---- 6. two sweep jobs on one GPU ---------------------------------------------------------
def test_two_jobs_share_one_gpu_under_ray(tmp_path: Path, mnist_dir: Path) -> None:
    """hydra/launcher=ray_gpus with jobs_per_gpu=2 and one GPU: both jobs complete, and they
    trained at the same time (each met the other at step 1, holding GPU memory; their training
    intervals overlap), each in its own process given the same CUDA_VISIBLE_DEVICES."""
    sweep_dir, meet_dir = tmp_path / "sweep", tmp_path / "meet"
    started = time.time()
    result = run_cli(
        "train.py",
        *tier.ray_sweep_args(meet_dir),
        f"paths.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")]
    assert sorted(r["routing_iters"] for r in records) == [1, 3]
    assert all(r["status"] == "completed" for r in records)
    jobs = tier.check_jobs_met(meet_dir, 2)
    assert all(j["device"].startswith("cuda") and j["memory_bytes"] > 0 for j in jobs), jobs
    overlap = min(j["end"] for j in jobs) - max(j["start"] for j in jobs)
    print(
        f"\n{_gpu()}: two jobs on CUDA_VISIBLE_DEVICES={jobs[0]['cuda_visible_devices']}, trained together for "
        f"{overlap:.1f} s (memory at the meeting: {[round(j['memory_bytes'] / 2**20) for j in jobs]} MB); "
        f"sweep {time.time() - started:.1f} s"
    )


@needs_two
def test_ddp_on_two_gpus_counts_every_test_example_once(tmp_path: Path, mnist_dir: Path) -> None:
    run_dir = tmp_path / "ddp"
    result = run_cli(
        "train.py",
        "trainer=ddp",
        "trainer.devices=2",
        "profile=smoke",
        "logger=none",
        "data.test_subset=999",
        f"paths.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["world_size"] == 2 and record["test_examples"] == 999


def test_seconds_per_epoch_of_profile_fast(tmp_path: Path, mnist_dir: Path) -> None:
    """One epoch of the fast profile, CapsNet r3 + recon; prints seconds per epoch."""
    run_dir = tmp_path / "fast"
    started = time.time()
    result = run_cli(
        "train.py",
        "profile=fast",
        "trainer=gpu",
        "trainer.max_epochs=1",
        "logger=csv",
        "figures=false",
        f"paths.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    print(
        f"\nGPU {torch.cuda.get_device_name()}: profile=fast r3+recon, one epoch of {record['steps']} steps, "
        f"precision {record['precision']}: {record['wall_time_s']:.1f} s in the run ({time.time() - started:.1f} s "
        f"with start-up and test); val error {record['val_error']:.4f}, test error {record['test_error']:.4f}"
    )
