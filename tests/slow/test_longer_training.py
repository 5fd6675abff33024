"""Longer CPU runs (minutes): pytest -m slow."""

from __future__ import annotations

import pytest

from capsnet.run.training import run


@pytest.mark.slow
def test_capsnet_reaches_low_error_on_5k_digits(make_cfg) -> None:
    record = run(
        make_cfg(
            "data.train_subset=5120",
            "data.batch_size=64",
            "data.val_subset=1000",
            "data.test_subset=1000",
            "trainer.limit_train_batches=null",
            "trainer.max_epochs=2",
        )
    )
    assert record["status"] == "completed", record
    assert record["steps"] == 160
    assert record["val_error"] < 0.08, record
