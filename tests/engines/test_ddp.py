"""What happens only at scale, simulated on the CPU: GPU syncs per step, data on the device,
DDP at several world sizes against one process, and DDP refused where it cannot work."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from capsnet.data.loader import TrainBatches
from capsnet.data.mnist import MNISTDataModule
from capsnet.data.multimnist import MultiMNISTDataModule
from capsnet.data.transforms import random_shift
from capsnet.run.training import run
from conftest import run_cli
from dataset_files import write_cifar10
from sync_audit import AUDIT, SyncAudit

pytestmark = pytest.mark.engines

STEADY = range(4, 24)  # ~20 steps after warm-up


def _audited_run(make_cfg, tmp_path: Path, data: str, nan_check_every: int) -> SyncAudit:
    extra = []
    if data == "cifar10":  # crops, flips, jitter and standardisation on the device
        write_cifar10(tmp_path / "files", per_class=6)
        extra = ["data.verify_checksums=false", "data.val_size=20"]
    cfg = make_cfg(
        f"data={data}",
        *extra,
        "trainer.limit_train_batches=24",
        "data.batch_size=8",
        "data.train_subset=256",
        "data.val_subset=16",
        "data.test_subset=16",
        "figures=false",
        "logger=csv",
        f"nan_check_every={nan_check_every}",
        "trainer.log_every_n_steps=1000",
        "checkpoint.every_n_steps=1000",
        "+callbacks.syncs._target_=sync_audit.PerStepSyncs",
        output_dir=tmp_path / f"{data}_{nan_check_every}",
    )
    cfg.trainer.enable_progress_bar = True  # the progress bar used to read the loss at every refresh
    if data == "cifar10":
        cfg.paths.data_dir = str(tmp_path / "files")
    AUDIT.__init__()
    with AUDIT.patched():
        record = run(cfg)
    assert record["status"] == "completed", record
    assert record["steps"] == 24  # every audited step ran (an absent step would count 0 syncs)
    return AUDIT


@pytest.mark.parametrize("data", ["mnist", "multimnist", "cifar10"])
def test_no_host_device_sync_in_a_steady_state_training_step(make_cfg, tmp_path: Path, data: str) -> None:
    audit = _audited_run(make_cfg, tmp_path, data, nan_check_every=1000)
    per_step = {step: audit.counts[step] for step in STEADY}
    assert per_step == dict.fromkeys(STEADY, 0), {s: audit.sites.get(s) for s in STEADY if audit.counts[s]}


def test_the_audit_sees_the_nan_checks_and_nothing_else(make_cfg, tmp_path: Path) -> None:
    """The counter can fail: a NaN check every 5 steps is one sync on exactly those steps."""
    audit = _audited_run(make_cfg, tmp_path, "mnist", nan_check_every=5)
    # step k's count covers the end of step k-1 to the end of step k; the check runs inside step k
    assert {step: audit.counts[step] for step in STEADY} == {step: int(step % 5 == 0) for step in STEADY}


@pytest.mark.parametrize("module_class", [MNISTDataModule, MultiMNISTDataModule])
def test_batches_are_sliced_on_the_training_device(module_class, mnist_dir: Path) -> None:
    """With the trainer on another device (here 'meta'), every batch is already there: the
    data moved once, and no batch is copied from the host."""
    datamodule = module_class(data_dir=str(mnist_dir), batch_size=32, train_subset=256, val_subset=64, test_subset=64)
    datamodule.setup("fit")
    strategy = SimpleNamespace(root_device=torch.device("meta"))
    datamodule.trainer = SimpleNamespace(
        strategy=strategy, global_rank=0, world_size=1, current_epoch=0, global_step=0, num_training_batches=8
    )
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader()):
        batches = list(loader)
        assert batches and all(t.device.type == "meta" for batch in batches for t in batch)
    first = datamodule.train_dataloader().tensors[0]
    assert datamodule.train_dataloader().tensors[0] is first  # moved once, then reused


DDP_ARGS = [
    "profile=smoke",
    "logger=none",
    "figures=false",
    "data.batch_size=12",
    "data.train_subset=48",
    "trainer.limit_train_batches=null",
    "data.val_subset=50",
    "data.test_subset=100",
    "data.eval_batch_size=16",
    "checkpoint.every_n_steps=100",
]


def _ddp_run(tmp_path: Path, mnist_dir: Path, name: str, *trainer: str) -> tuple[dict, dict[int, float]]:
    run_dir, losses = tmp_path / name, tmp_path / f"{name}_losses"
    result = run_cli(
        "train.py",
        *DDP_ARGS,
        *trainer,
        f"paths.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
        "+callbacks.losses._target_=apps.probes.StepLosses",
        f"+callbacks.losses.path={losses}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for path in losses.glob("rank*.jsonl") for line in path.read_text().splitlines()]
    by_step: dict[int, list[dict]] = {}
    for row in rows:
        by_step.setdefault(row["step"], []).append(row)
    # the global batch's loss: the mean over ranks, weighted by each rank's examples
    global_loss = {step: sum(r["loss"] * r["n"] for r in rs) / sum(r["n"] for r in rs) for step, rs in by_step.items()}
    return json.loads((run_dir / "metrics.json").read_text()), global_loss


def test_ddp_on_2_and_3_processes_trains_like_one_process(tmp_path: Path, mnist_dir: Path) -> None:
    single, single_losses = _ddp_run(tmp_path, mnist_dir, "single", "trainer=cpu")
    assert single["steps"] == 4 and sorted(single_losses) == [0, 1, 2, 3]
    largest = {}
    for world in (2, 3):
        record, losses = _ddp_run(
            tmp_path, mnist_dir, f"ddp{world}", "trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={world}"
        )
        assert record["status"] == "completed" and record["world_size"] == world
        assert record["steps"] == single["steps"] == 4  # the one-process number of steps
        assert record["global_batch"] == 12
        assert losses.keys() == single_losses.keys()
        for step, loss in single_losses.items():
            assert losses[step] == pytest.approx(loss, rel=1e-4), (world, step)
        largest[world] = max(abs(losses[s] - loss) / loss for s, loss in single_losses.items())
        assert record["test_examples"] == 100 and record["val_examples"] == 50  # each example once
        assert abs(record["test_error"] - single["test_error"]) <= 0.01 + 1e-9
        assert (tmp_path / f"ddp{world}" / f"train_ddp_process_{world - 1}.log").is_file()  # the last rank ran
    print(f"largest relative difference of the per-step global loss vs one process: {largest}")


def test_ddp_ranks_draw_their_own_dropout_masks_on_the_one_process_data(tmp_path: Path, mnist_dir: Path) -> None:
    """Lightning seeds every DDP rank alike, so every rank used to draw the same dropout
    masks: a global batch of 12 over 2 ranks had 6 distinct masks.  Each rank now has its
    own stream, while each still trains on exactly its slice of the one-process global
    batch (order and shifts come from seeded hashes, not the global RNG)."""
    masks = tmp_path / "masks"
    result = run_cli(
        "train.py",
        *DDP_ARGS,
        "model=baseline",
        "model.conv_channels=[8,8,8]",
        "model.hidden=[128,128]",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"paths.data_dir={mnist_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "+callbacks.masks._target_=apps.probes.DropoutMasks",
        f"+callbacks.masks.path={masks}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "completed"
    rows = {
        rank: [json.loads(line) for line in (masks / f"rank{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)
    }
    assert [row["step"] for row in rows[0]] == [row["step"] for row in rows[1]] == [0, 1, 2, 3]

    data = MNISTDataModule(data_dir=str(mnist_dir), batch_size=12, train_subset=48, val_subset=50, test_subset=100)
    data.setup()
    images, labels = data.train_set
    order = TrainBatches(data.train_set, batch_size=12).order(0)
    for step in range(4):
        for rank in (0, 1):
            idx = order[step * 12 + rank * 6 : step * 12 + (rank + 1) * 6]
            shifted = random_shift(data.place(images[idx]), data.max_shift, 0, 0, idx)
            assert rows[rank][step]["labels"] == labels[idx].tolist(), (step, rank)
            assert rows[rank][step]["pixel_sums"] == pytest.approx(shifted.double().flatten(1).sum(dim=1).tolist())
        (first,), (second,) = (torch.tensor(rows[rank][step]["masks"]) for rank in (0, 1))
        known = (first >= 0) & (second >= 0)  # both inputs non-zero: both masks visible
        assert known.sum() > 100
        agreement = float((first[known] == second[known]).float().mean())
        assert agreement < 0.75, f"step {step}: the two ranks' dropout masks agree on {agreement:.0%}"
        print(f"step {step}: rank masks agree on {agreement:.0%} of {int(known.sum())} visible entries")


def test_a_global_batch_the_world_does_not_divide_is_refused(tmp_path: Path, mnist_dir: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "train.py",
        *DDP_ARGS,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=3",
        "data.batch_size=16",
        f"paths.data_dir={mnist_dir}",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 2
    assert "invalid config value data.batch_size=16" in result.stderr and "multiple of 3, e.g. 15" in result.stderr
    assert not run_dir.exists()


def test_ddp_inside_a_local_sweep_is_refused_with_what_to_do(tmp_path: Path, mnist_dir: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "train.py",
        "-m",
        *DDP_ARGS,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "routing.iters=1,3",
        f"paths.data_dir={mnist_dir}",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 2
    assert "cannot run inside a local sweep" in result.stderr and "hydra/launcher=ray_gpus" in result.stderr
    assert not list(sweep_dir.glob("*/metrics.json"))


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed", "16-mixed", "64-true"])
def test_every_trainer_precision_trains(make_cfg, tmp_path: Path, precision: str) -> None:
    record = run(
        make_cfg(
            f"trainer.precision={precision}",
            "trainer.limit_train_batches=2",
            "data.batch_size=8",
            "data.val_subset=16",
            "data.test_subset=16",
            "figures=false",
            output_dir=tmp_path / precision,
        )
    )
    assert record["status"] == "completed", record
    assert record["precision"] == precision and record["signature"]["trainer.precision"] == precision


def test_matmul_precision_and_compile_mode_settings(make_cfg, tmp_path: Path) -> None:
    from capsnet.run.training import apply_matmul_precision
    from capsnet.run.validation import ConfigError

    try:
        apply_matmul_precision("high")
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        apply_matmul_precision("highest")
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    finally:
        apply_matmul_precision("highest")
    assert make_cfg("profile=fast").perf.matmul_precision == "high"
    assert make_cfg("profile=paper").perf.matmul_precision == "highest"
    with pytest.raises(ConfigError, match=r"perf\.compile"):
        run(make_cfg("perf.compile=fastest", output_dir=tmp_path / "bad"))
    assert make_cfg("perf.compile=reduce-overhead").perf.compile == "reduce-overhead"


@pytest.mark.parametrize(
    ("gpu", "capability", "expected"),
    [
        ("V100", (7, 0), "32-true"),
        ("T4", (7, 5), "32-true"),
        ("A100", (8, 0), "bf16-mixed"),
        ("H100", (9, 0), "bf16-mixed"),
    ],
)
def test_fast_profile_takes_bf16_only_on_a_gpu_with_native_bf16(
    make_cfg, monkeypatch, gpu: str, capability: tuple[int, int], expected: str
) -> None:
    """``torch.cuda.is_bf16_supported()`` is true on every one of these (V100 and T4 emulate
    bf16); only compute capability >= 8.0 has it natively."""
    assert make_cfg("profile=fast").trainer.precision == "32-true"  # this machine: no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args, **kwargs: capability)
    assert make_cfg("profile=fast", "trainer=gpu").trainer.precision == expected, gpu
    assert make_cfg("profile=fast", "trainer=cpu").trainer.precision == "32-true"
    assert make_cfg("profile=paper", "trainer=gpu").trainer.precision == "32-true"
