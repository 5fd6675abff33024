"""Learning curves of the results table: validation error per epoch, one PNG per dataset.

For each cell of the table (one configuration), the mean over its seeds' history.csv with
a band from the best to the worst seed, on a log scale, and the paper's final test error
as a dashed line of the same colour where the paper reports that cell.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FormatStrFormatter, MaxNLocator

from capsnet.run.history import read_history


def seed_curves(run_dirs: list[str]) -> dict[int, list[float]]:
    """Validation error (%) per epoch, one value per seed that reached that epoch."""
    by_epoch: dict[int, list[float]] = {}
    for run_dir in run_dirs:
        for row in read_history(Path(run_dir)):
            if not math.isnan(row.get("val_error", math.nan)):
                by_epoch.setdefault(int(row["epoch"]), []).append(100 * row["val_error"])
    return dict(sorted(by_epoch.items()))


def write_curves(table: dict[str, Any], out_dir: Path, label_of, paper_of, titles: dict[str, str]) -> list[Path]:
    """One PNG per dataset column with any history: ``out_dir/curves_<column>.png``.

    ``label_of(row)`` names a table row; ``paper_of(column, row)`` gives the paper's mean
    error in percent, or None; ``titles`` names the columns (the datasets' own titles).
    """
    written = []
    profiles = ", ".join(table["profiles"]) or "unknown"
    for column, title in titles.items():
        cells = {row: cell for row, cell in table["cells"].get(column, {}).items() if cell.run_dirs}
        curves = {row: seed_curves(cell.run_dirs) for row, cell in cells.items()}
        curves = {row: c for row, c in curves.items() if c}
        if not curves:
            continue
        figure, axes = plt.subplots(figsize=(8, 5))
        for index, (row, by_epoch) in enumerate(sorted(curves.items(), key=lambda item: str(item[0]))):
            colour = f"C{index % 10}"
            epochs = [epoch + 1 for epoch in by_epoch]  # row e is written after e + 1 epochs of training
            mean = [sum(v) / len(v) for v in by_epoch.values()]
            seeds = max(len(v) for v in by_epoch.values())
            axes.plot(epochs, mean, marker="o", markersize=3, color=colour, label=f"{label_of(row)} (n={seeds})")
            if seeds > 1:
                axes.fill_between(
                    epochs,
                    [min(v) for v in by_epoch.values()],
                    [max(v) for v in by_epoch.values()],
                    color=colour,
                    alpha=0.2,
                    linewidth=0,
                )
            paper = paper_of(column, row)
            if paper is not None:
                axes.axhline(
                    paper,
                    color=colour,
                    linestyle="--",
                    linewidth=1,
                    label=f"paper, test error after full training: {paper:g}%",
                )
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        axes.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epochs trained")
        axes.set_ylabel("validation error (%, log scale)")
        axes.set_title(
            f"{title}: validation error per epoch (profile {profiles})\nline: mean over seeds; band: best to worst seed"
        )
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = out_dir / f"curves_{column}.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written
