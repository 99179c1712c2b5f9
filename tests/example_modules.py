"""Test support for the examples under examples/: import one of an example's scripts, read its data files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(example: str, name: str):
    """examples/EXAMPLE/NAME.py as a module (its folder on sys.path while it loads, for its own imports)."""
    folder = EXAMPLES / example
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(f"{example.replace('-', '_')}_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(folder))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
