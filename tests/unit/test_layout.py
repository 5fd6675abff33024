"""The subpackages keep to their layers (each package docstring says what it may import):
the paper's maths imports nothing else of capsnet; the data imports only itself; reporting
reads records through capsnet.run's record formats, never the CLI or the training code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "capsnet"
ALLOWED = {
    "nn": ("capsnet.nn",),
    "data": ("capsnet.data",),
    "reporting": (
        "capsnet.reporting",
        "capsnet.nn",
        "capsnet.data",
        "capsnet.run.record",
        "capsnet.run.signature",
        "capsnet.run.history",
        "capsnet.run.rundir",
        "capsnet.run.tracking",  # the table logged to W&B decides online/offline as every run does
    ),
}


def capsnet_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name == "capsnet" or name.startswith("capsnet.")}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_layer_imports_only_what_it_may(package: str) -> None:
    bad = {
        f"{path.relative_to(SRC)}: {name}"
        for path in (SRC / package).rglob("*.py")
        for name in capsnet_imports(path)
        if not name.startswith(ALLOWED[package])
    }
    assert not bad, sorted(bad)


def test_every_subpackage_says_what_it_may_import() -> None:
    for package in ("nn", "data", "run", "reporting"):
        doc = ast.get_docstring(ast.parse((SRC / package / "__init__.py").read_text())) or ""
        assert "may import" in doc.lower() or "May import" in doc, package
