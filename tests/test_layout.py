"""Imports run one way: gist never imports kv, train never imports bench, nothing below the CLI imports it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gistctl"


def imported_modules(path: Path) -> set[str]:
    """Every gistctl module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.startswith("gistctl")}


def offenders(package: str, forbidden: str) -> list[str]:
    found = []
    for path in sorted((PACKAGE / package).rglob("*.py")) if package else sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        if not package and (rel.startswith("gistctl/cli/") or rel == "gistctl/__main__.py"):  # the entry points
            continue
        found += [f"{rel} imports {m}" for m in imported_modules(path)
                  if m == forbidden or m.startswith(forbidden + ".")]
    return found


def test_gist_never_imports_kv():
    assert offenders("gist", "gistctl.kv") == []


def test_train_never_imports_bench():
    assert offenders("train", "gistctl.bench") == []


def test_only_the_cli_imports_the_cli():
    assert offenders("", "gistctl.cli") == []


def test_the_checker_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from gistctl.kv.blob import read_blob\n    import gistctl.bench.report\n")
    assert {"gistctl.kv.blob", "gistctl.kv.blob.read_blob", "gistctl.bench.report"} <= imported_modules(module)
