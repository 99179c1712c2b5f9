"""The quickstart: its data generator, the shipped tiny model, and the run end to end.

The default suite runs a short LoRA (a few steps) and checks that the validation loss falls from the
base's; the `slow` test runs the quickstart as shipped and checks the exact-match numbers the README
quotes (base near 0, tuned >= 80%).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart"
TINY = REPO / "models" / "tiny-chat"


def load_make_data():
    spec = importlib.util.spec_from_file_location("make_data", QUICKSTART / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# Data


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    make_data = load_make_data()
    train, valid = make_data.make_split(800, 100, seed=0)
    make_data.write_jsonl(tmp_path / "train.jsonl", train)
    make_data.write_jsonl(tmp_path / "valid.jsonl", valid)
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / name).read_bytes() == (QUICKSTART / name).read_bytes(), name


def test_answers_are_the_generic_names_in_order():
    make_data = load_make_data()
    rows = read_jsonl(QUICKSTART / "train.jsonl") + read_jsonl(QUICKSTART / "valid.jsonl")
    assert len(rows) == 900
    for row in rows:
        system, user, assistant = row["messages"]
        assert [system["role"], user["role"], assistant["role"]] == ["system", "user", "assistant"]
        names = json.loads(assistant["content"])
        lines = [line[2:] for line in user["content"].splitlines() if line.startswith("- ")]
        assert len(names) == len(lines) >= 2
        for name, line in zip(names, lines, strict=True):
            surfaces, _ = make_data.INGREDIENTS[name]
            assert any(surface in line for surface in surfaces), (name, line)


def test_validation_never_repeats_a_training_recipe():
    def key(row):
        return row["messages"][2]["content"]

    train = {key(r) for r in read_jsonl(QUICKSTART / "train.jsonl")}
    valid = [key(r) for r in read_jsonl(QUICKSTART / "valid.jsonl")]
    assert not train & set(valid)
    assert len(set(valid)) == len(valid)


def test_generator_seed_changes_the_data():
    make_data = load_make_data()
    a, _ = make_data.make_split(50, 5, seed=0)
    b, _ = make_data.make_split(50, 5, seed=1)
    assert a != b
