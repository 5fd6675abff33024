"""Aggregate run dirs into the paper's Table 1 (Markdown + CSV), ours beside the paper's.

Reads only ``metrics.json`` files: ``python -m capsnet.table multirun/table1 --out results``.
Errors are fractions in the files and percentages in the table; each cell is the mean ±
sample standard deviation over seeds, with the number of seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Table 1 of Sabour et al. (2017), test error % (mean ± std over 3 trials where given).
PAPER_MNIST: dict[tuple[str, int | None, bool | None], str] = {
    ("baseline", None, None): "0.39",
    ("capsnet", 1, False): "0.34 ± 0.032",
    ("capsnet", 1, True): "0.29 ± 0.011",
    ("capsnet", 3, False): "0.35 ± 0.036",
    ("capsnet", 3, True): "0.25 ± 0.005",
}
PAPER_MULTIMNIST: dict[tuple[str, int | None, bool | None], str] = {
    ("baseline", None, None): "8.1",
    ("capsnet", 1, True): "7.5",
    ("capsnet", 3, True): "5.2",
}
# §5.2: accuracy 99.23% / 79% (CapsNet) and 99.22% / 66% (CNN), as error %.
PAPER_AFFNIST: dict[str, tuple[str, str]] = {"capsnet": ("0.77", "21"), "baseline": ("0.78", "34")}

ROUTING_GRID = (1, 3, 5, 7, 10)
Row = tuple[str, int | None, bool | None]


@dataclass
class Cell:
    """Errors (fractions) of one table cell, one per seed."""

    values: list[float]

    def format(self) -> str:
        if not self.values:
            return ""
        mean = 100 * statistics.fmean(self.values)
        if len(self.values) == 1:
            return f"{mean:.2f} (n=1)"
        std = 100 * statistics.stdev(self.values)
        return f"{mean:.2f} ± {std:.2f} (n={len(self.values)})"


def load_records(roots: list[Path]) -> list[dict[str, Any]]:
    """Every metrics.json under the given dirs (each tagged with its run dir)."""
    records = []
    for root in roots:
        for path in sorted(Path(root).rglob("metrics.json")):
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError:
                record = {"status": "failed", "error": f"unreadable {path}"}
            record["run_dir"] = str(path.parent)
            records.append(record)
    return records


def row_key(record: dict[str, Any]) -> Row:
    if record.get("model") == "baseline":
        return ("baseline", None, None)
    return ("capsnet", record.get("routing_iters"), record.get("recon"))


def row_label(row: Row) -> tuple[str, str, str]:
    model, iters, recon = row
    if model == "baseline":
        return ("Baseline CNN", "–", "–")
    return ("CapsNet", str(iters), "yes" if recon else "no")


def build_table(records: list[dict[str, Any]], profile: str | None = None) -> dict[str, Any]:
    """Group completed runs into cells; list failed ones.  ``profile`` filters the runs."""
    if profile is not None:
        records = [r for r in records if r.get("profile") == profile]
    completed = [r for r in records if r.get("status") == "completed"]
    failed = [r for r in records if r.get("status") == "failed"]
    cells: dict[str, dict[Row, Cell]] = defaultdict(lambda: defaultdict(lambda: Cell([])))
    for record in completed:
        data, row = record.get("data"), row_key(record)
        if data == "mnist":
            cells["mnist"][row].values.append(record["test_error"])
        elif data == "multimnist":
            cells["multimnist"][row].values.append(record["multimnist_error"])
        elif data == "affnist":
            cells["affnist_expanded"][row].values.append(record["test_error"])
            cells["affnist"][row].values.append(record["affnist_error"])
    rows: list[Row] = [("baseline", None, None)]
    rows += [("capsnet", r, recon) for r in ROUTING_GRID for recon in (False, True)]
    extra = {row for column in cells.values() for row in column} - set(rows)
    rows += sorted(extra, key=lambda r: (r[0], r[1] or 0, bool(r[2])))
    profiles = sorted({str(r.get("profile")) for r in completed}) or ([profile] if profile else [])
    return {"rows": rows, "cells": cells, "failed": failed, "profiles": profiles, "n_runs": len(completed)}


def table_rows(table: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    columns = ["model", "routing", "reconstruction", "MNIST (ours)", "MNIST (paper)",
               "MultiMNIST (ours)", "MultiMNIST (paper)"]
    out = []
    for row in table["rows"]:
        mnist = table["cells"]["mnist"].get(row, Cell([]))
        multi = table["cells"]["multimnist"].get(row, Cell([]))
        out.append([*row_label(row), mnist.format(), PAPER_MNIST.get(row, ""), multi.format(),
                    PAPER_MULTIMNIST.get(row, "")])
    return columns, out


def affnist_rows(table: dict[str, Any]) -> list[list[str]]:
    rows = []
    for row in table["rows"]:
        expanded = table["cells"]["affnist_expanded"].get(row)
        if expanded is None:
            continue
        paper = PAPER_AFFNIST.get(row[0], ("", ""))
        rows.append([" ".join(row_label(row)[:2]).replace(" –", ""), expanded.format(), paper[0],
                     table["cells"]["affnist"][row].format(), paper[1]])
    return rows


def to_markdown(table: dict[str, Any]) -> str:
    profiles = ", ".join(table["profiles"]) or "none"
    lines = [f"# Table 1 — test error % (profile: {profiles})", ""]
    if table["profiles"] and set(table["profiles"]) != {"paper"}:
        lines += [f"> Profile `{profiles}`: a shortened schedule, **not** a reproduction of the paper's numbers.", ""]
    columns, rows = table_rows(table)
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "Ours: mean ± sample std over seeds (n = seeds); blank: not run. Paper: Sabour et al. 2017, Table 1."]
    affine = affnist_rows(table)
    if affine:
        lines += ["", "## affNIST-style robustness — test error %", "",
                  "The paper reports accuracy: CapsNet 99.23% → 79%, a CNN of similar size 99.22% → 66%;",
                  "shown here as error %.", "",
                  "| model | expanded MNIST (ours) | (paper) | affine set (ours) | (paper) |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in affine]
    if table["failed"]:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{r['run_dir']}`: {r.get('error', 'no reason recorded')}" for r in table["failed"]]
    return "\n".join(lines) + "\n"


def write_outputs(table: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "table1.md"
    md.write_text(to_markdown(table))
    columns, rows = table_rows(table)
    csv_path = out_dir / "table1.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["profile", *columns])
        profile = "+".join(table["profiles"])
        writer.writerows([profile, *row] for row in rows)
    return md, csv_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build results/table1.{md,csv} from run dirs' metrics.json")
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run dirs to scan (recursively)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--profile", default=None, help="only runs of this profile")
    parser.add_argument("--wandb", action="store_true", help="also log the table to W&B (offline without a key)")
    args = parser.parse_args(argv)
    table = build_table(load_records([d for d in args.dirs if d.exists()]), args.profile)
    md, csv_path = write_outputs(table, args.out)
    print(md.read_text())
    print(f"wrote {md} and {csv_path} from {table['n_runs']} completed runs")
    if args.wandb:
        from capsnet.tracking import log_table_to_wandb

        columns, rows = table_rows(table)
        log_table_to_wandb(columns, rows, project="capsnet", group="table1", title=md.read_text().splitlines()[0],
                           save_dir=str(args.out))


if __name__ == "__main__":
    main()
