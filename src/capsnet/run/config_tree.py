"""The composed config as a rich tree: printed when a run starts, saved beside its results."""

from __future__ import annotations

from pathlib import Path

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

from capsnet.run.record import resolved_config

CONFIG_TREE_FILE = "config_tree.log"
# The groups a reader looks for first; the rest follow in config order.
FIRST = ("model", "data", "routing", "recon", "loss", "optim", "trainer", "callbacks", "logger")


def config_tree(cfg: DictConfig) -> rich.tree.Tree:
    """One branch per top-level key, values resolved (what the run really uses)."""
    resolved = resolved_config(cfg)
    tree = rich.tree.Tree("config", style="dim", guide_style="dim")
    for key in [*(k for k in FIRST if k in resolved), *(k for k in resolved if k not in FIRST)]:
        branch = tree.add(key, style="bold")
        value = resolved[key]
        text = OmegaConf.to_yaml(value) if isinstance(value, (dict, list)) else str(value)
        branch.add(rich.syntax.Syntax(text.rstrip() or "{}", "yaml"))
    return tree


def print_config_tree(cfg: DictConfig, save_dir: Path | None = None) -> None:
    """Print the tree; with ``save_dir``, also write it (plain text) to config_tree.log."""
    tree = config_tree(cfg)
    rich.print(tree)
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        with (save_dir / CONFIG_TREE_FILE).open("w") as handle:
            rich.print(tree, file=handle)
