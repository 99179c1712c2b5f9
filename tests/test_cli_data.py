"""`tunekit data check` / `data convert`: exit codes, no tracebacks, --json equal to the library report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunekit.cli import app
from tunekit.data.check import check_file

SRC = Path(__file__).resolve().parents[1] / "src"

NEEDS_RENDER = pytest.mark.skipif(importlib.util.find_spec("tunekit.data.render") is None,
                                  reason="tunekit.data.render is not in this tree yet")


def good(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def write(tmp_path, records, name="train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def run(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    # Every outcome is a clean exit: no exception escapes, so no traceback is printed.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def test_clean_file_exits_0_with_stats(tmp_path):
    result = run("data", "check", write(tmp_path, [good(i) for i in range(12)]))
    assert result.exit_code == 0, result.output
    assert "12 examples (chat)" in result.output and "recommended epochs: 9" in result.output
    assert "no errors" in result.output and "--model" in result.output


def test_errors_exit_1_and_name_line_path_and_code(tmp_path):
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}
    path = write(tmp_path, [good(i) for i in range(11)] + [bad])
    result = run("data", "check", path)
    assert result.exit_code == 1
    assert result.output.startswith(f"{path}: 12 lines")  # the file is named once, then each line
    assert "line 12" in result.output and "messages[1].weight" in result.output
    assert "invalid_weight" in result.output
    assert "1 error" in result.output


def test_warnings_alone_exit_0(tmp_path):
    result = run("data", "check", write(tmp_path, [good(0), "", good(0)]))
    assert result.exit_code == 0
    assert "too_few_examples" in result.output and "duplicate_example" in result.output


def test_json_output_parses_and_matches_the_library(tmp_path):
    train = write(tmp_path, [good(i) for i in range(11)] + ["{", good(3)])
    valid = write(tmp_path, [good(5), good(50)], "valid.jsonl")
    result = run("data", "check", train, "--validation", valid, "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    report = check_file(train, validation=valid)
    assert data["counts"] == report.counts == {"invalid_json": 1, "duplicate_example": 1, "train_valid_overlap": 1}
    assert data["errors"] == 1 and data["warnings"] == 2 and data["examples"] == 12
    assert [(p["line"], p["code"]) for p in data["problems"]] == [(12, "invalid_json"), (13, "duplicate_example"),
                                                                 (1, "train_valid_overlap")]
    assert data["stats"]["trained"]["total"] == report.stats.trained.total


@pytest.mark.parametrize("case", ["missing", "directory", "empty"])
def test_unusable_inputs_exit_1_with_a_message(tmp_path, case):
    path = {"missing": tmp_path / "nope.jsonl", "directory": tmp_path, "empty": tmp_path / "empty.jsonl"}[case]
    if case == "empty":
        path.write_text("")
    result = run("data", "check", path)
    assert result.exit_code == 1
    expected = {"missing": "file not found", "directory": "is a directory", "empty": "no valid examples"}[case]
    assert expected in result.output


def test_missing_model_dir_is_a_clear_error(tmp_path):
    result = run("data", "check", write(tmp_path, [good(0)]), "--model", tmp_path / "no-model")
    assert result.exit_code == 1 and "no such model folder" in result.output


def test_model_dir_without_tokenizer_files_is_a_clear_error(tmp_path):
    (tmp_path / "model").mkdir()
    result = run("data", "check", write(tmp_path, [good(0)]), "--model", tmp_path / "model")
    assert result.exit_code == 1 and "cannot load a tokenizer" in result.output


def test_unknown_format_option(tmp_path):
    result = run("data", "check", write(tmp_path, [good(0)]), "--format", "xml")
    assert result.exit_code == 1 and "unknown format" in result.output


def test_entry_point_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-m", "tunekit.cli", "data", "check", str(tmp_path / "nope.jsonl")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "file not found" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


@NEEDS_RENDER
def test_check_with_a_local_model_gives_token_stats(tmp_path, tiny_llama_dir):
    path = write(tmp_path, [good(i) for i in range(12)])
    result = run("data", "check", path, "--model", tiny_llama_dir, "--max-len", "4", "--json")
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["stats"]
    assert stats["unit"] == "tokens" and stats["over_max_len"] == 12 and stats["trained"]["min"] > 0


def test_convert_writes_chat_that_passes_check(tmp_path):
    src = write(tmp_path, [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
                           for i in range(10)], "sharegpt.jsonl")
    dst = tmp_path / "chat.jsonl"
    result = run("data", "convert", src, dst, "--from", "sharegpt")
    assert result.exit_code == 0 and "wrote 10 examples" in result.output
    assert run("data", "check", dst).exit_code == 0


def test_convert_bad_record_exits_1_and_writes_nothing(tmp_path):
    src = write(tmp_path, [{"instruction": "a", "output": "b"}, {"instruction": "c"}], "alpaca.jsonl")
    dst = tmp_path / "chat.jsonl"
    result = run("data", "convert", src, dst, "--from", "alpaca")
    assert result.exit_code == 1 and f"{src}:2 output" in result.output and "nothing written" in result.output
    assert not dst.exists()
    result = run("data", "convert", src, dst, "--from", "alpaca", "--skip-bad")
    assert result.exit_code == 0 and "1 bad records left out" in result.output
    assert len(dst.read_text().splitlines()) == 1


def test_convert_unknown_source_format(tmp_path):
    src = write(tmp_path, [{"instruction": "a", "output": "b"}])
    result = run("data", "convert", src, tmp_path / "out.jsonl", "--from", "dolly")
    assert result.exit_code == 1 and "unknown input format" in result.output
