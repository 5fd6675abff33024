"""Every precision the Trainer runs on a CPU counts examples and errors exactly and draws
its figures: metric states stay float32 whatever the module is cast to, figures are drawn
in the network's dtype, and a figure that cannot be drawn never fails a trained run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capsnet.run.training import run

# A small CapsNet (bf16 matmuls are slow on a CPU), more examples than bfloat16's 8
# significant bits count exactly (256), and odd totals that bfloat16 cannot represent.
EXACT = [
    "model.conv1_channels=16",
    "model.primary_types=4",
    "data.batch_size=32",
    "data.train_subset=288",
    "trainer.limit_train_batches=null",
    "data.val_subset=301",
    "data.test_subset=333",
    "data.eval_batch_size=16",
    "figures=true",
    "+callbacks.counts._target_=apps.probes.ErrorCounts",
]


@pytest.mark.parametrize("precision", ["32-true", "64-true", "bf16-true", "bf16-mixed", "16-mixed"])
def test_counts_and_errors_are_exact_and_figures_drawn_under_every_precision(
    make_cfg, tmp_path: Path, precision: str
) -> None:
    counts_file = tmp_path / "counts.json"
    cfg = make_cfg(
        *EXACT, f"+callbacks.counts.path={counts_file}", f"trainer.precision={precision}", output_dir=tmp_path / "run"
    )
    record = run(cfg)
    assert record["status"] == "completed", record.get("error")
    assert "figures_error" not in record, record["figures_error"]
    assert {"reconstructions.png", "dimension_perturbation.png", "routing_convergence.png"} <= set(record["figures"])
    probe = json.loads(counts_file.read_text())
    assert set(probe["state_dtypes"].values()) == {"torch.float32"}, probe["state_dtypes"]
    (train_n, train_wrong), (val_n, val_wrong), (test_n, test_wrong) = (
        probe["counts"][stage] for stage in ("train", "val", "test")
    )
    assert (train_n, val_n, test_n) == (288, 301, 333)
    assert (record["val_examples"], record["test_examples"]) == (301, 333)
    # the errors recounted from a second forward pass on the same batches, to float32's precision
    assert probe["train_error"] == [pytest.approx(train_wrong / train_n, abs=1e-7)]
    assert record["val_error"] == pytest.approx(val_wrong / val_n, abs=1e-7)
    assert record["test_error"] == pytest.approx(test_wrong / test_n, abs=1e-7)
    print(f"{precision}: train {train_wrong}/{train_n}, val {val_wrong}/{val_n}, test {test_wrong}/{test_n}")


def test_a_figure_that_cannot_be_drawn_never_fails_a_trained_run(make_cfg, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no picture today")

    monkeypatch.setattr("capsnet.run.training.write_run_figures", broken)
    cfg = make_cfg(
        "model.conv1_channels=16",
        "model.primary_types=4",
        "trainer.limit_train_batches=2",
        "data.val_subset=32",
        "data.test_subset=32",
        "figures=true",
    )
    record = run(cfg)
    assert record["status"] == "completed", record.get("error")
    assert record["figures_error"] == "RuntimeError: no picture today" and "figures" not in record
    assert 0 <= record["test_error"] <= 1 and (Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt").is_file()
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["figures_error"] == record["figures_error"]
