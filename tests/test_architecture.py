"""The direction of imports between the rooms of src/tunekit (docs/architecture.md), read from the source:
every `import tunekit...` and `from tunekit... import`, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tunekit"

# room -> rooms it must never import (cli imports everything; nothing imports cli; migrate sits above serve)
NEVER = {
    "config": {"data", "model", "train", "eval", "export", "generate", "serve", "migrate", "cli"},
    "data": {"model", "train", "eval", "export", "generate", "serve", "migrate", "cli"},
    "model": {"train", "eval", "export", "generate", "serve", "migrate", "cli"},
    "generate": {"train", "eval", "export", "serve", "migrate", "cli"},
    "train": {"export", "serve", "migrate", "cli"},
    "eval": {"export", "serve", "migrate", "cli"},
    "export": {"train.loop", "eval", "serve", "migrate", "cli"},
    "serve": {"train.loop", "migrate", "cli"},
    "migrate": {"train.loop", "cli"},
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunekit") and node.level == 0:
            found += [(node.lineno, node.module)] if node.module != "tunekit" else \
                [(node.lineno, f"tunekit.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("tunekit.")]
    return found


def violations() -> list[str]:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        here = parts[0] if parts[0] != "__init__" else ""
        for line, target in imports_of(path):
            name = target.removeprefix("tunekit.")
            for banned in NEVER.get(here, ()):
                if name == banned or name.startswith(banned + "."):
                    bad.append(f"{path.relative_to(SRC)}:{line} imports {target}")
    return bad


def test_imports_flow_one_way():
    assert violations() == []


@pytest.mark.parametrize("source, expected", [("from tunekit.serve.app import x", "tunekit.serve.app"),
                                              ("import tunekit.train.loop", "tunekit.train.loop"),
                                              ("def f():\n    from tunekit import locate", "tunekit.locate")])
def test_the_scan_sees_every_import_form(tmp_path, source, expected):
    (tmp_path / "m.py").write_text(source)
    assert [name for _, name in imports_of(tmp_path / "m.py")] == [expected]
