"""Learning curves and the one-page report, from hand-written run dirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.utils import save_image

from capsnet.reporting.curves import seed_curves
from capsnet.reporting.table import main
from capsnet.run.history import read_history, summarize


def _run(root: Path, name: str, seed: int, val_errors: list[float], test_error: float, figures: bool = False) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    rows = ["epoch,step,val_error,lr,train_images_per_s,epoch_time_s,wall_time_s"]
    rows += [f"{e},{(e + 1) * 10},{v},0.001,100,5,{5 * (e + 1)}" for e, v in enumerate(val_errors)]
    (run_dir / "history.csv").write_text("\n".join(rows) + "\n")
    record = {
        "model": "capsnet",
        "data": "mnist",
        "routing_iters": 3,
        "recon": True,
        "seed": seed,
        "profile": "fast",
        "status": "completed",
        "val_error": min(val_errors),
        "test_error": test_error,
        "steps": 10 * len(val_errors),
        "wall_time_s": 5.0 * len(val_errors),
        "history": summarize(read_history(run_dir)),
    }
    (run_dir / "metrics.json").write_text(json.dumps(record))
    if figures:
        (run_dir / "figures").mkdir()
        save_image(torch.rand(3, 20, 20), run_dir / "figures" / "reconstructions.png")
    return run_dir


def test_seed_curves_and_history_summary(tmp_path: Path) -> None:
    a = _run(tmp_path, "a", 0, [0.04, 0.02, 0.01], 0.012)
    b = _run(tmp_path, "b", 1, [0.06, 0.03], 0.02)
    curves = seed_curves([str(a), str(b)])
    assert curves == {0: [4.0, 6.0], 1: [2.0, 3.0], 2: [1.0]}  # percent, one value per seed reaching the epoch
    assert summarize(read_history(a)) == {
        "epochs": 3,
        "best_epoch": 2,
        "best_val_error": 0.01,
        "mean_train_images_per_s": 100.0,
        "mean_epoch_time_s": 5.0,
    }


def test_table_writes_curves_and_the_report_names_every_source(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    first = _run(runs, "seed0", 0, [0.04, 0.02, 0.01], 0.012, figures=True)
    second = _run(runs, "seed1", 1, [0.05, 0.03, 0.02], 0.018)
    out = tmp_path / "results"
    main([str(runs), "--out", str(out), "--report"])
    curve = out / "curves_mnist.png"
    assert curve.is_file() and curve.stat().st_size > 10_000
    report = (out / "REPORT.md").read_text()
    assert "## Table 1" in report and "| CapsNet | 3 | yes | 1.50 ± 0.42 (n=2) |" in report
    assert "![curves_mnist](curves_mnist.png)" in report
    assert f"`{first}`" in report and f"`{second}`" in report  # the runs behind the cell
    # the best run is chosen on validation error, and its figures are copied beside the report
    assert (
        f"### mnist: `{first}`" in report and "validation error 1.00% (best after 3 epochs), test error 1.20%" in report
    )
    assert "(report/mnist_reconstructions.png)" in report and (out / "report" / "mnist_reconstructions.png").is_file()


@pytest.mark.parametrize("missing", ["history.csv"])
def test_runs_without_history_still_make_a_table(tmp_path: Path, missing: str) -> None:
    run_dir = _run(tmp_path / "runs", "old", 0, [0.03], 0.03)
    (run_dir / missing).unlink()
    main([str(tmp_path / "runs"), "--out", str(tmp_path / "results"), "--report"])
    assert not (tmp_path / "results" / "curves_mnist.png").exists()
    assert "No run has a history.csv yet." in (tmp_path / "results" / "REPORT.md").read_text()
