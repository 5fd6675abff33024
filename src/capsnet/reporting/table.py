"""Aggregate run dirs into the paper's Table 1 (Markdown + CSV), ours beside the paper's.

Reads only ``metrics.json`` files: ``python -m capsnet.reporting.table multirun/table1 --out results``.
Errors are fractions in the files and percentages in the table; each cell is the mean ±
sample standard deviation over seeds, with the number of seeds.

A cell holds one configuration: runs are grouped by their whole recorded signature except
the seed (capsnet.run.signature), so two sweeps with another ``optim.lr`` or precision in one
tree appear as separate rows, labelled with what differs, and are never averaged together.
A seed that appears twice in a cell is counted once and flagged.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import OmegaConf

from capsnet.data.affnist import AffNISTDataModule
from capsnet.data.cifar10 import CIFAR10DataModule
from capsnet.data.mnist import MNISTDataModule
from capsnet.data.multimnist import MultiMNISTDataModule
from capsnet.data.smallnorb import SmallNORBDataModule
from capsnet.data.svhn import SVHNDataModule
from capsnet.reporting.curves import write_curves
from capsnet.run.record import METRICS_FILE, RECORD_WAY_OUT
from capsnet.run.rundir import SUPERSEDED_DIR, DamagedFileError, atomic_write_text, read_json
from capsnet.run.signature import configuration

# The paper's tables and where their columns come from: each dataset class declares its own
# numbers (``paper``, by record field and row) and title; the table only lays them out.
TABLE1_COLUMNS: dict[type, dict[str, str]] = {  # dataset class -> {column: record field}
    MNISTDataModule: {"mnist": "test_error"},
    MultiMNISTDataModule: {"multimnist": "multimnist_error"},
    AffNISTDataModule: {"affnist_expanded": "test_error", "affnist": "affnist_error"},
}
SECTION7 = (CIFAR10DataModule, SmallNORBDataModule, SVHNDataModule)  # §7: one number each
PAPER_MNIST = MNISTDataModule.paper["test_error"]
PAPER_MULTIMNIST = MultiMNISTDataModule.paper["multimnist_error"]
COLUMN_TITLES = {
    column: f"{cls.title} ({field})" if len(fields) > 1 else cls.title
    for cls, fields in TABLE1_COLUMNS.items()
    for column, field in fields.items()
}

ROUTING_GRID = (1, 3, 5, 7, 10)
Row = tuple[str, int | None, bool | None]
# A table row: the paper's row, and which configuration ("" when only one was run).
TableRow = tuple[str, int | None, bool | None, str]


@functools.cache
def _class_at(target: str) -> type | None:
    try:
        return get_class(target)
    except Exception:  # noqa: BLE001  (a dataset class that no longer imports: not in any table)
        return None


CONF_DATA = Path(__file__).resolve().parents[3] / "conf" / "data"  # the checkout's data configs


@functools.cache
def _class_named(data: str) -> type | None:
    """The class ``conf/data/<data>.yaml`` names (records written before signatures)."""
    path = CONF_DATA / f"{data}.yaml"
    target = OmegaConf.load(path).get("_target_") if path.is_file() else None
    return _class_at(str(target)) if target else None


def dataset_class(record: dict[str, Any]) -> type | None:
    """The DataModule class a record was trained on: its signature's ``data._target_``, or
    for a record without a signature the class its dataset's config names."""
    target = (record.get("signature") or {}).get("data._target_")
    if target:
        return _class_at(target)
    return _class_named(str(record.get("data"))) if record.get("data") else None


@dataclass
class Cell:
    """Errors (fractions) of one table cell, one per seed, with the seeds seen twice."""

    values: list[float]
    duplicate_seeds: list[int] = field(default_factory=list)
    run_dirs: list[str] = field(default_factory=list)  # the runs counted, one per seed

    def stats(self) -> tuple[float | None, float | None, int]:
        """Mean and sample std in percent, and n."""
        if not self.values:
            return None, None, 0
        std = 100 * statistics.stdev(self.values) if len(self.values) > 1 else None
        return 100 * statistics.fmean(self.values), std, len(self.values)

    def format(self) -> str:
        mean, std, n = self.stats()
        if mean is None:
            return ""
        text = f"{mean:.2f} (n=1)" if std is None else f"{mean:.2f} ± {std:.2f} (n={n})"
        if self.duplicate_seeds:
            text += " ⚠ seed " + ", ".join(str(s) for s in self.duplicate_seeds) + " twice"
        return text


def load_records(roots: list[Path]) -> list[dict[str, Any]]:
    """Every metrics.json under the given dirs (each tagged with its run dir); a damaged
    one becomes an ``unreadable`` record, listed under the table, never a crash.  Records
    moved aside by ``resume=false`` (``superseded/``) are not part of any table."""
    records = []
    for root in roots:
        for path in sorted(Path(root).rglob(METRICS_FILE)):
            if SUPERSEDED_DIR in path.relative_to(root).parts:
                continue
            try:
                record = read_json(path, RECORD_WAY_OUT) or {}
            except (DamagedFileError, OSError) as error:
                record = {"status": "unreadable", "error": str(error)}
            record["run_dir"] = str(path.parent)
            records.append(record)
    return records


def row_key(record: dict[str, Any]) -> Row:
    if record.get("model") == "baseline":
        return ("baseline", None, None)
    return ("capsnet", record.get("routing_iters"), record.get("recon"))


def row_label(row: Row | TableRow) -> tuple[str, str, str]:
    model, iters, recon = row[:3]
    variant = f" ({row[3]})" if len(row) > 3 and row[3] else ""
    if model == "baseline":
        return (f"Baseline CNN{variant}", "–", "–")
    return (f"CapsNet{variant}", str(iters), "yes" if recon else "no")


def config_key(record: dict[str, Any]) -> str:
    """The record's configuration (its signature without seed and world size)."""
    signature = record.get("signature")
    return json.dumps(configuration(signature), sort_keys=True, default=str) if signature else "not recorded"


def variant_labels(keys: list[str]) -> dict[str, str]:
    """Name each configuration by the settings in which it differs from the others."""
    if len(keys) == 1:
        return {keys[0]: ""}
    configs = {k: json.loads(k) if k != "not recorded" else {} for k in keys}
    differing = sorted(
        {
            name
            for c in configs.values()
            for name in c
            if len({json.dumps(o.get(name), default=str) for o in configs.values()}) > 1
        }
    )
    return {
        k: (", ".join(f"{n}={configs[k].get(n)}" for n in differing) if configs[k] else "config not recorded")
        for k in keys
    }


def _cell(records: list[dict[str, Any]], field_name: str) -> Cell:
    """One value per seed (the first run dir in sorted order); seeds seen again are flagged."""
    cell, seen = Cell([]), set()
    for record in sorted(records, key=lambda r: r["run_dir"]):
        seed = record.get("seed")
        if seed in seen:
            cell.duplicate_seeds.append(seed)
            continue
        seen.add(seed)
        cell.values.append(record[field_name])
        cell.run_dirs.append(record["run_dir"])
    return cell


def build_table(records: list[dict[str, Any]], profile: str | None = None) -> dict[str, Any]:
    """Group completed runs into cells of one configuration each; list failed ones.
    ``profile`` filters the training runs and the ensembles (src/eval.py records the
    profile of an ensemble's members)."""
    ensembles = [r for r in records if r.get("kind") == "ensemble" and r.get("status") == "completed"]
    records = [r for r in records if r.get("kind") != "ensemble"]
    if profile is not None:
        records = [r for r in records if r.get("profile") == profile]
        ensembles = [r for r in ensembles if r.get("profile") == profile]
    completed = [r for r in records if r.get("status") == "completed"]
    # what did not complete: failed, interrupted, unreadable, still running (or killed)
    failed = [r for r in records if r.get("status") not in ("completed", "skipped")]
    groups: dict[tuple[str, Row], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for record in completed:
        if dataset_class(record) in TABLE1_COLUMNS and record.get("routing") in (None, "dynamic"):
            groups[(dataset_class(record), row_key(record))][config_key(record)].append(record)
    cells: dict[str, dict[TableRow, Cell]] = defaultdict(dict)
    duplicates = []
    for (data, row), by_config in groups.items():
        labels = variant_labels(sorted(by_config))
        for key, runs in by_config.items():
            for column, field_name in TABLE1_COLUMNS[data].items():
                cell = _cell(runs, field_name)
                cells[column][(*row, labels[key])] = cell
                if cell.duplicate_seeds and column == next(iter(TABLE1_COLUMNS[data])):
                    duplicates.append(((*row, labels[key]), data.title, sorted(r["run_dir"] for r in runs)))
    base: list[Row] = [("baseline", None, None)]
    base += [("capsnet", r, recon) for r in ROUTING_GRID for recon in (False, True)]
    present = {row for column in cells.values() for row in column}
    base += sorted({row[:3] for row in present} - set(base), key=lambda r: (r[0], r[1] or 0, bool(r[2])))
    rows: list[TableRow] = []
    for row in base:
        rows.append((*row, ""))
        rows += sorted(r for r in present if r[:3] == row and r[3])
    profiles = sorted({str(r.get("profile")) for r in completed}) or ([profile] if profile else [])
    return {
        "rows": rows,
        "cells": cells,
        "failed": failed,
        "profiles": profiles,
        "n_runs": len(completed),
        "duplicates": duplicates,
        "other": other_dataset_rows(completed, ensembles),
        "routing": routing_rows(completed),
    }


def _routing_config(record: dict[str, Any]) -> str:
    """A record's configuration without its router's own settings (one row per router)."""
    signature = record.get("signature") or {}
    kept = {k: v for k, v in configuration(signature).items() if not k.startswith(("routing.", "model.router."))}
    return json.dumps(kept, sort_keys=True, default=str) if signature else "not recorded"


def routing_rows(completed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The routing comparison: one row per (dataset, model, router, configuration) among runs
    that name their router, when more than one router was run or any but the paper's."""
    routed = [r for r in completed if r.get("routing")]
    if len({r["routing"] for r in routed}) < 2 and {r["routing"] for r in routed} <= {"dynamic"}:
        return []
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in routed:
        title = getattr(dataset_class(record), "title", None) or str(record.get("data"))
        groups[(title, record["model"], record["routing"], _routing_config(record))].append(record)
    labels = variant_labels(sorted({key[3] for key in groups}))
    rows = []
    for (title, model, routing, config), runs in sorted(groups.items()):
        rows.append(
            {
                "data": title,
                "model": model,
                "routing": routing,
                "variant": labels[config],
                "iters": sorted({r.get("routing_iters") for r in runs if r.get("routing_iters") is not None}),
                "test": _cell(runs, "test_error"),
                "affine": _cell([r for r in runs if r.get("affnist_error") is not None], "affnist_error"),
                "parameters": runs[0].get("parameters"),
            }
        )
    return rows


def routing_markdown(rows: list[dict[str, Any]], bench: dict[str, Any] | None) -> list[str]:
    """The routing-comparison section, with the speed of each router from ``make bench``
    (bench/routers.py's JSON, measured in one run on one machine) where given."""
    measured = (bench or {}).get("rows", {})
    lines = [
        "",
        "## Routing comparison — test error %",
        "",
        "Every router on the paper's body (conv1 → primary capsules → class capsules), the same data, "
        "schedule, loss and budget; mean ± sample std over seeds.",
    ]
    if bench:
        lines.append(
            f"Speed from `make bench` ({bench.get('device')}; {bench.get('processor')}; batch {bench.get('batch')}, "
            f"{bench.get('size')}×{bench.get('size')} inputs): measured in one run, on that machine only."
        )
    lines += [
        "",
        "| data | model | routing | iters | test error | affine-set error | parameters | MFLOPs/image "
        "| train img/s | inference img/s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        speed = measured.get(f"routing={row['routing']}", {})

        def number(key: str, scale: float = 1.0, digits: int = 1, speed: dict[str, float] = speed) -> str:
            return f"{speed[key] / scale:.{digits}f}" if speed.get(key) is not None else ""

        name = row["routing"] + (f" ({row['variant']})" if row["variant"] else "")
        lines.append(
            f"| {row['data']} | {row['model']} | {name} | {','.join(map(str, row['iters'])) or '–'} "
            f"| {row['test'].format()} | {row['affine'].format()} "
            f"| {row['parameters']:,} | {number('flops_per_image', 1e6)} | {number('train_images_per_s')} "
            f"| {number('inference_images_per_s')} | {number('peak_memory_mb', digits=0)} |"
            if row["parameters"] is not None
            else f"| {row['data']} | {row['model']} | {name} | | {row['test'].format()} | {row['affine'].format()} | | | | | |"
        )
    return lines


def other_dataset_rows(completed: list[dict[str, Any]], ensembles: list[dict[str, Any]]) -> list[list[str]]:
    """§7: per dataset and model, single models (mean ± std over seeds) and any ensemble of
    them, beside the paper's number."""
    rows = []
    for dataset in SECTION7:
        paper = "; ".join(dataset.paper.get("test_error", {}).values())
        paper_kind = dataset.paper_source.split(": ", 1)[1] if ": " in dataset.paper_source else ""
        runs = [r for r in completed if dataset_class(r) is dataset]
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in runs:
            groups[f"{record['model']} r={record.get('routing_iters')}"].append(record)
        for label, group in sorted(groups.items()):
            by_config: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for record in group:
                by_config[config_key(record)].append(record)
            for key, members in sorted(by_config.items()):
                variant = variant_labels(sorted(by_config))[key]
                name = f"{label} ({variant})" if variant else label
                rows.append([dataset.title, name, _cell(members, "test_error").format(), "", ""])
        mine = [r for r in ensembles if dataset_class({"signature": r.get("configuration"), **r}) is dataset]
        for record in sorted(mine, key=lambda r: r["run_dir"]):
            members = record.get("member_test_errors") or []
            text = f"{100 * record['test_error']:.2f} (ensemble of {record.get('ensemble_size')})"
            if members:
                text += f"; members {100 * min(members):.2f}–{100 * max(members):.2f}"
            rows.append([dataset.title, f"{record['model']} ensemble", "", text, ""])
        rows.append([dataset.title, "paper", "", "", f"{paper}" + (f" ({paper_kind})" if paper_kind else "")])
    # the paper's line only under a dataset we have numbers for
    return [row for row in rows if row[1] != "paper" or any(r[0] == row[0] and r[1] != "paper" for r in rows)]


def _paper(row: TableRow, paper: dict[Row, str]) -> str:
    """The paper's value, for the paper's own configuration row only."""
    return paper.get(row[:3], "") if not row[3] else ""


def table_rows(table: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    columns = [
        "model",
        "routing",
        "reconstruction",
        "MNIST (ours)",
        "MNIST (paper)",
        "MultiMNIST (ours)",
        "MultiMNIST (paper)",
    ]
    out = []
    for row in table["rows"]:
        mnist = table["cells"]["mnist"].get(row, Cell([]))
        multi = table["cells"]["multimnist"].get(row, Cell([]))
        out.append(
            [*row_label(row), mnist.format(), _paper(row, PAPER_MNIST), multi.format(), _paper(row, PAPER_MULTIMNIST)]
        )
    return columns, out


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def numeric_rows(table: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per row and dataset: mean %, sample std %, n and the paper's mean %, as plain numbers."""
    columns = []
    for name in ("mnist", "multimnist"):
        columns += [f"{name}_mean_pct", f"{name}_std_pct", f"{name}_n", f"{name}_paper_pct"]
    out = []
    for row in table["rows"]:
        values = []
        for name in ("mnist", "multimnist"):
            mean, std, n = table["cells"][name].get(row, Cell([])).stats()
            paper = paper_value(name, row)
            values += [_number(mean), _number(std), str(n), "" if paper is None else f"{paper:g}"]
        out.append(values)
    return columns, out


def affnist_rows(table: dict[str, Any]) -> list[list[str]]:
    rows = []
    for row in table["rows"]:
        expanded = table["cells"]["affnist_expanded"].get(row)
        if expanded is None:
            continue
        papers = AffNISTDataModule.paper
        paper = (
            (papers["test_error"].get(row[:3], ""), papers["affnist_error"].get(row[:3], ""))
            if not row[3]
            else ("", "")
        )
        rows.append(
            [
                " ".join(row_label(row)[:2]).replace(" –", ""),
                expanded.format(),
                paper[0],
                table["cells"]["affnist"][row].format(),
                paper[1],
            ]
        )
    return rows


def to_markdown(table: dict[str, Any], bench: dict[str, Any] | None = None) -> str:
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
        lines += [
            "",
            "## affNIST-style robustness — test error %",
            "",
            "The paper reports accuracy: CapsNet 99.23% → 79%, a CNN of similar size 99.22% → 66%;",
            "shown here as error %.",
            "",
            "| model | expanded MNIST (ours) | (paper) | affine set (ours) | (paper) |",
            "|---|---|---|---|---|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in affine]
    if table.get("other"):
        lines += [
            "",
            "## Other datasets (§7) — test error %",
            "",
            "| dataset | model | single models (ours) | ensemble (ours) | paper |",
            "|---|---|---|---|---|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in table["other"]]
    if table.get("routing"):
        lines += routing_markdown(table["routing"], bench)
    if table["duplicates"]:
        lines += ["", "## Seeds run twice (counted once)", ""]
        lines += [
            f"- {' '.join(row_label(row)).strip()} on {data}: " + ", ".join(f"`{d}`" for d in dirs)
            for row, data, dirs in table["duplicates"]
        ]
    if any(row[3] for row in table["rows"]):
        lines += [
            "",
            (
                "Rows with a label in brackets are runs of another configuration than the row above "
                "(the label says the settings that differ); they are never averaged together."
            ),
        ]
    if table["failed"]:
        lines += ["", "## Runs not in the table (not completed)", ""]
        lines += [
            f"- `{r['run_dir']}` ({r.get('status', 'no status')}): "
            + (
                r.get("error")
                or ("running, or killed without a trace" if r.get("status") == "running" else "no reason")
            )
            for r in table["failed"]
        ]
    return "\n".join(lines) + "\n"


def paper_value(column: str, row: TableRow) -> float | None:
    """The paper's mean error (percent) for a column and row, or None where it reports none."""
    fields = {column: (cls, field) for cls, fields in TABLE1_COLUMNS.items() for column, field in fields.items()}
    cls, field_name = fields.get(column, (None, None))
    text = _paper(row, cls.paper.get(field_name, {})) if cls is not None else ""
    return float(text.split("±")[0]) if text else None


def curve_label(row: TableRow) -> str:
    """'CapsNet r=3, reconstruction' / 'Baseline CNN', with the configuration label if any."""
    model, iters, recon, variant = row
    name = (
        "Baseline CNN"
        if model == "baseline"
        else f"CapsNet r={iters}, {'reconstruction' if recon else 'no reconstruction'}"
    )
    return f"{name} ({variant})" if variant else name


def cell_runs(table: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(cell label, the run dirs counted in it), for every filled cell."""
    out = []
    for column, cells in table["cells"].items():
        for row, cell in cells.items():
            if cell.run_dirs:
                label = " ".join(row_label(row)).replace(" – –", "")
                out.append((f"{column} · {label}", cell.run_dirs))
    return sorted(out)


class EmptyTableError(RuntimeError):
    """No completed run was found, and a table already stands where the empty one would go."""


def write_outputs(table: dict[str, Any], out_dir: Path, bench: dict[str, Any] | None = None) -> tuple[Path, Path]:
    md, csv_path = out_dir / "table1.md", out_dir / "table1.csv"
    if table["n_runs"] == 0 and (md.exists() or csv_path.exists()):
        raise EmptyTableError(
            f"no completed run found, and {md} already holds a table: an empty table is not written over it. "
            "Check the dirs given (a sweep's dir, e.g. multirun/table1) and --profile, or choose another --out."
        )
    atomic_write_text(md, to_markdown(table, bench))
    columns, rows = table_rows(table)
    numeric_columns, numbers = numeric_rows(table)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["profile", *columns, "configuration", *numeric_columns])
    profile = "+".join(table["profiles"])
    writer.writerows(
        [profile, *row, key[3], *values] for row, key, values in zip(rows, table["rows"], numbers, strict=True)
    )
    atomic_write_text(csv_path, text.getvalue())
    return md, csv_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build results/table1.{md,csv} from run dirs' metrics.json")
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run dirs to scan (recursively)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--profile", default=None, help="only runs of this profile")
    parser.add_argument("--wandb", action="store_true", help="also log the table to W&B (offline without a key)")
    parser.add_argument("--report", action="store_true", help="also write <out>/REPORT.md with curves and figures")
    parser.add_argument(
        "--bench", type=Path, default=Path("results/bench_routers.json"), help="make bench's router speeds, if present"
    )
    args = parser.parse_args(argv)
    records = load_records([d for d in args.dirs if d.exists()])
    if args.profile is not None:
        records = [r for r in records if r.get("profile") == args.profile]
    table = build_table(records)
    try:
        bench = json.loads(args.bench.read_text()) if args.bench and args.bench.is_file() else None
        md, csv_path = write_outputs(table, args.out, bench)
    except EmptyTableError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    curves = write_curves(table, args.out, curve_label, paper_value, COLUMN_TITLES)
    print(md.read_text())
    print(f"wrote {md}, {csv_path} and {len(curves)} curve PNG(s) from {table['n_runs']} completed runs")
    if args.report:
        from capsnet.reporting.report import write_report

        report = write_report(md.read_text(), curves, records, cell_runs(table), args.out)
        print(f"wrote {report}")
    if args.wandb:
        from capsnet.run.tracking import log_table_to_wandb

        columns, rows = table_rows(table)
        log_table_to_wandb(
            columns,
            rows,
            project="capsnet",
            group="table1",
            title=md.read_text().splitlines()[0],
            save_dir=str(args.out),
        )


if __name__ == "__main__":
    main()
