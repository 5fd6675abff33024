"""A CPU smoke run of each model on affNIST-style and MultiMNIST data."""

from __future__ import annotations

import pytest

from capsnet.run.training import run

TINY = ("trainer.limit_train_batches=2", "data.batch_size=8", "data.val_subset=32", "data.test_subset=32")


@pytest.mark.parametrize("model", ["capsnet", "baseline"])
def test_multimnist_smoke(model: str, make_cfg) -> None:
    record = run(make_cfg("data=multimnist", f"model={model}", *TINY))
    assert record["status"] == "completed", record
    assert record["data"] == "multimnist"
    assert record["multimnist_error"] == record["test_error"]
    assert 0 <= record["multimnist_error"] <= 1


@pytest.mark.parametrize("model", ["capsnet", "baseline_affnist"])
def test_affnist_smoke(model: str, make_cfg) -> None:
    record = run(make_cfg("data=affnist", f"model={model}", *TINY))
    assert record["status"] == "completed", record
    assert record["data"] == "affnist"
    assert 0 <= record["test_error"] <= 1 and 0 <= record["affnist_error"] <= 1


def test_speed_switches_train_through_lightning(make_cfg) -> None:
    record = run(make_cfg("perf.channels_last=true", "trainer.precision=bf16-mixed", *TINY))
    assert record["status"] == "completed", record
