"""`tunekit data check` on real-shaped datasets: errors first, notes summarised, the cookbook's counts,
and token estimates that equal what training processes."""

from __future__ import annotations

import json
import random
from pathlib import Path

from typer.testing import CliRunner

from tunekit.cli import app
from tunekit.config import DataConfig
from tunekit.data.check import check_file
from tunekit.data.dataset import load_splits

SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
TOOLS = [{"type": "function", "function": {"name": "set_altitude", "description": "Fly to a height",
                                           "parameters": {"type": "object", "properties": {"m": {"type": "integer"}}}}}]


def function_calling_file(path: Path, n: int, bad_line: int) -> Path:
    """The cookbook's drone shape: every example ends with the assistant's tool call; one line's arguments
    are a JSON-encoded string instead of an object (as in the cookbook's own file)."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as fh:
        for line in range(1, n + 1):
            args = json.dumps({"m": rng.randint(1, 100)})
            fh.write(json.dumps({"tools": TOOLS, "messages": [
                {"role": "system", "content": "You control a drone."},
                {"role": "user", "content": f"climb, please ({line})"},
                {"role": "assistant", "tool_calls": [{"id": f"call_{line}", "type": "function", "function": {
                    "name": "set_altitude", "arguments": json.dumps(args) if line == bad_line else args}}]},
            ]}) + "\n")
    return path


def check_cli(*args: str, columns: int = 80):
    result = CliRunner().invoke(app, ["data", "check", *map(str, args)], env={"COLUMNS": str(columns)})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def test_one_error_deep_in_a_function_calling_file_is_shown(tmp_path):
    path = function_calling_file(tmp_path / "drone.jsonl", 2000, bad_line=1851)
    result = check_cli(path)
    assert result.exit_code == 1
    out = result.output
    errors = out.index("Errors (1)")
    assert "line 1851" in out[errors:] and "tool_arguments_not_json" in out
    assert out.index("line 1851") < out.index("Notes")  # the error comes before the notes
    # 2,000 notes, summarised in one line with the first line numbers, not 2,000 rows
    assert "tool_call_unanswered: 2,000, lines 1, 2, 3, 4, 5, ..." in out
    assert out.count("call_") < 5
    assert all(len(line) <= 80 for line in out.splitlines())
    # the library keeps the error even after a thousand notes
    report = check_file(path)
    assert [p.line for p in report.problems if p.severity == "error"] == [1851]


def test_show_all_lists_every_stored_row(tmp_path):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": ""}]})
             for i in range(45)]
    lines += [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})
              for i in range(10)]
    path = tmp_path / "empty.jsonl"
    path.write_text("\n".join(lines) + "\n")
    summary = check_cli(path).output
    assert "30 of 45 errors shown" in summary and "line 31" not in summary
    full = check_cli(path, "--show", "all").output
    assert "line 45" in full and "errors shown" not in full


def cookbook_toy_file(path: Path) -> Path:
    """The cookbook's toy chat file: 5 examples, one without a user message, one without a system
    message, one very long."""
    sys_msg = {"role": "system", "content": "Marv is a factual chatbot that is also sarcastic."}
    rows = [
        [sys_msg, {"role": "user", "content": "What's the capital of France?"},
         {"role": "assistant", "content": "Paris, as if everyone doesn't know that already."}],
        [sys_msg, {"role": "assistant", "content": "Who wrote 'Romeo and Juliet'? Oh, just William Shakespeare."}],
        [{"role": "user", "content": "How far is the Moon from Earth?"},
         {"role": "assistant", "content": "Around 384,400 kilometers. Give or take a few."}],
        [sys_msg, {"role": "user", "content": "Tell me everything."},
         {"role": "assistant", "content": "Everything, then. " * 400}],
        [sys_msg, {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, genius."}],
    ]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows), encoding="utf-8")
    return path


def test_cookbook_toy_file_gives_the_cookbook_counts(tmp_path, tiny_llama_dir):
    path = cookbook_toy_file(tmp_path / "toy.jsonl")
    result = check_cli(path, "--model", tiny_llama_dir, "--max-len", 256, "--json")
    data = json.loads(result.output)
    assert data["stats"]["without_system_message"] == 1
    assert data["stats"]["without_user_message"] == 1
    (warning,) = [p for p in data["problems"] if p["code"] == "no_user_message"]
    assert warning["line"] == 2 and warning["severity"] == "warning" and warning["hint"]
    assert data["stats"]["over_max_len"] == 1
    human = check_cli(path, "--model", tiny_llama_dir, "--max-len", 256).output
    assert "examples without a system message: 1; without a user message: 1" in human
    assert "tokens per epoch:" in human and "tokens processed" in human


def test_token_estimates_equal_what_training_processes(tmp_path, chat_tokenizer):
    path = cookbook_toy_file(tmp_path / "toy.jsonl")
    for truncation in ("drop", "truncate"):
        report = check_file(path, tokenizer=chat_tokenizer, max_len=128, truncation=truncation)
        splits = load_splits(DataConfig(train=path, max_len=128, truncation=truncation), chat_tokenizer)
        s = report.stats
        assert (s.tokens_per_epoch, s.trained_tokens_per_epoch) == (splits.train_fit.tokens,
                                                                    splits.train_fit.trained_tokens)
        assert s.tokens_per_epoch > s.trained_tokens_per_epoch > 0
        assert (s.estimated_tokens, s.estimated_trained_tokens) == (s.epochs * s.tokens_per_epoch,
                                                                    s.epochs * s.trained_tokens_per_epoch)
    dropped = check_file(path, tokenizer=chat_tokenizer, max_len=128, truncation="drop").stats
    cut = check_file(path, tokenizer=chat_tokenizer, max_len=128, truncation="truncate").stats
    assert cut.tokens_per_epoch == dropped.tokens_per_epoch + 128  # the long example, cut to max_len


def test_80_column_output_snapshot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
             for i in range(11)]
    lines[3] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 2}]}
    lines[6] = {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "unprompted"}]}
    text = "".join(json.dumps(r) + "\n" for r in lines) + "{broken\n"
    Path("train.jsonl").write_text(text, encoding="utf-8")
    result = check_cli("train.jsonl")
    expected = (SNAPSHOTS / "check_80_columns.txt").read_text(encoding="utf-8")
    assert result.output == expected, result.output
