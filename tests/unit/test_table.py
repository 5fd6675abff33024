"""The table builder on hand-written metrics.json files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from capsnet.reporting.table import build_table, load_records, main, to_markdown


def _write(root: Path, name: str, **record) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "metrics.json").write_text(json.dumps(record))


def _sweep(root: Path) -> Path:
    base = {"data": "mnist", "profile": "fast", "status": "completed"}
    for seed, err in enumerate([0.0025, 0.0030, 0.0020]):
        _write(
            root, f"r3_recon_{seed}", model="capsnet", routing_iters=3, recon=True, seed=seed, test_error=err, **base
        )
    _write(root, "r1_norecon_0", model="capsnet", routing_iters=1, recon=False, seed=0, test_error=0.0041, **base)
    _write(root, "baseline_0", model="baseline", routing_iters=None, recon=None, seed=0, test_error=0.004, **base)
    _write(
        root, "baseline_skip", model="baseline", routing_iters=None, recon=None, seed=0, status="skipped", data="mnist"
    )
    _write(
        root,
        "r5_nan",
        model="capsnet",
        routing_iters=5,
        recon=True,
        seed=0,
        data="mnist",
        profile="fast",
        status="failed",
        error="NonFiniteLossError: non-finite loss at step 7",
    )
    _write(
        root,
        "multi_r3",
        model="capsnet",
        routing_iters=3,
        recon=True,
        seed=0,
        data="multimnist",
        profile="fast",
        status="completed",
        test_error=0.06,
        multimnist_error=0.06,
    )
    _write(
        root,
        "smoke_r3",
        model="capsnet",
        routing_iters=3,
        recon=True,
        seed=9,
        data="mnist",
        profile="smoke",
        status="completed",
        test_error=0.9,
    )
    return root


def _rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] in ("CapsNet", "Baseline CNN"):
            rows[f"{cells[0]} {cells[1]} {cells[2]}"] = cells[3:]
    return rows


def test_mean_sample_std_n_and_paper_values(tmp_path: Path) -> None:
    table = build_table(load_records([_sweep(tmp_path)]), profile="fast")
    rows = _rows(to_markdown(table))
    # mean 0.25 %, sample std of (0.25, 0.30, 0.20) % = 0.05 %
    assert rows["CapsNet 3 yes"] == ["0.25 ± 0.05 (n=3)", "0.25 ± 0.005", "6.00 (n=1)", "5.2"]
    assert rows["CapsNet 1 no"] == ["0.41 (n=1)", "0.34 ± 0.032", "", ""]
    assert rows["Baseline CNN – –"] == ["0.40 (n=1)", "0.39", "", "8.1"]
    assert rows["CapsNet 10 yes"] == ["", "", "", ""]  # not run: blank; not in the paper: blank
    assert rows["CapsNet 1 yes"] == ["", "0.29 ± 0.011", "", "7.5"]


def test_failed_runs_listed_and_profile_in_title(tmp_path: Path) -> None:
    markdown = to_markdown(build_table(load_records([_sweep(tmp_path)]), profile="fast"))
    assert markdown.startswith("# Table 1 — test error % (profile: fast)")
    assert "not** a reproduction" in markdown
    assert (
        "## Runs not in the table (not completed)" in markdown
        and "r5_nan` (failed)" in markdown
        and "non-finite loss at step 7" in markdown
    )
    assert "baseline_skip" not in markdown


def test_profile_filter_keeps_smoke_out(tmp_path: Path) -> None:
    table = build_table(load_records([_sweep(tmp_path)]), profile="smoke")
    rows = _rows(to_markdown(table))
    assert rows["CapsNet 3 yes"][0] == "90.00 (n=1)"
    assert table["profiles"] == ["smoke"]


def test_cli_writes_markdown_and_csv(tmp_path: Path, capsys) -> None:
    out = tmp_path / "results"
    main([str(_sweep(tmp_path / "runs")), "--out", str(out), "--profile", "fast"])
    assert (out / "table1.md").read_text().startswith("# Table 1")
    with (out / "table1.csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:4] == ["profile", "model", "routing", "reconstruction"]
    header = rows[0]
    r3 = [dict(zip(header, row, strict=True)) for row in rows[1:] if row[1:4] == ["CapsNet", "3", "yes"]]
    assert len(r3) == 1 and [r3[0][c] for c in header[4:8]] == [
        "0.25 ± 0.05 (n=3)",
        "0.25 ± 0.005",
        "6.00 (n=1)",
        "5.2",
    ]
    # numeric columns: mean and sample std in percent, n, the paper's mean
    assert float(r3[0]["mnist_mean_pct"]) == pytest.approx(0.25) and float(r3[0]["mnist_std_pct"]) == pytest.approx(
        0.05
    )
    assert r3[0]["mnist_n"] == "3" and r3[0]["mnist_paper_pct"] == "0.25" and r3[0]["multimnist_paper_pct"] == "5.2"
    assert len(rows) == 1 + 11


def test_affnist_section(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "aff",
        model="capsnet",
        routing_iters=3,
        recon=True,
        seed=0,
        data="affnist",
        profile="fast",
        status="completed",
        test_error=0.01,
        affnist_error=0.25,
    )
    markdown = to_markdown(build_table(load_records([tmp_path])))
    assert "| CapsNet 3 | 1.00 (n=1) | 0.77 | 25.00 (n=1) | 21 |" in markdown


def _signed(root: Path, name: str, seed: int, err: float, **config) -> None:
    signature = {"optim.lr": 0.001, "trainer.precision": "32-true", "seed": seed, "world_size": 1, **config}
    _write(
        root,
        name,
        model="capsnet",
        routing_iters=3,
        recon=True,
        seed=seed,
        data="mnist",
        profile="fast",
        status="completed",
        test_error=err,
        signature=signature,
    )


def test_two_configurations_in_one_row_are_shown_apart_never_averaged(tmp_path: Path) -> None:
    for seed in (0, 1):
        _signed(tmp_path, f"a{seed}", seed, 0.0030)
        _signed(tmp_path, f"b{seed}", seed, 0.0050, **{"optim.lr": 0.002})
    _signed(tmp_path, "c0", 0, 0.0040, world_size=4)  # another world size: the same configuration
    markdown = to_markdown(build_table(load_records([tmp_path])))
    lines = [line for line in markdown.splitlines() if "| 3 | yes |" in line]
    assert any(
        line.startswith("| CapsNet (optim.lr=0.001) |") and "0.30 ± 0.00 (n=2) ⚠ seed 0 twice" in line for line in lines
    ), lines
    assert any(line.startswith("| CapsNet (optim.lr=0.002) |") and "0.50 ± 0.00 (n=2)" in line for line in lines)
    assert "| CapsNet | 3 | yes |  | 0.25 ± 0.005 |" in markdown  # the paper's row itself stays unfilled
    assert "## Seeds run twice (counted once)" in markdown and "`" + str(tmp_path / "c0") + "`" in markdown


def test_other_datasets_section_shows_single_models_ensembles_and_the_paper() -> None:
    from capsnet.reporting.table import build_table, to_markdown

    signature = {"data.name": "cifar10", "model.name": "capsnet_cifar10", "seed": 0}
    runs = [
        {
            "model": "capsnet_cifar10",
            "data": "cifar10",
            "routing_iters": 3,
            "recon": True,
            "seed": seed,
            "profile": "fast",
            "status": "completed",
            "test_error": error,
            "run_dir": f"multirun/cifar10/seed={seed}",
            "signature": {**signature, "seed": seed},
        }
        for seed, error in ((0, 0.20), (1, 0.22))
    ]
    ensemble = {
        "kind": "ensemble",
        "model": "capsnet_cifar10",
        "data": "cifar10",
        "ensemble_size": 2,
        "status": "completed",
        "test_error": 0.18,
        "member_test_errors": [0.20, 0.22],
        "run_dir": "multirun/cifar10/ensemble_fast",
        "profile": "fast",  # its members' (src/eval.py)
    }
    smoke = {**ensemble, "profile": "smoke", "test_error": 0.5, "run_dir": "multirun/cifar10/ensemble_smoke"}
    table = build_table([*runs, ensemble, smoke], profile="fast")
    assert sum("ensemble" in row[1] for row in table["other"]) == 1  # another profile's ensemble is left out
    rows = {tuple(row[:2]): row for row in table["other"]}
    assert rows[("CIFAR-10", "capsnet_cifar10 r=3")][2] == "21.00 ± 1.41 (n=2)"
    assert rows[("CIFAR-10", "capsnet_cifar10 ensemble")][3] == "18.00 (ensemble of 2); members 20.00–22.00"
    assert rows[("CIFAR-10", "paper")][4] == "10.6 (an ensemble of 7 models)"
    assert not any(row[0] in ("SVHN", "smallNORB") for row in table["other"])  # nothing run: no rows
    assert "## Other datasets (§7)" in to_markdown(table)
    assert table["n_runs"] == 2  # the ensemble record is not a training run
