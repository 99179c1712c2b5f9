"""No traceback, whatever the input: hostile data files and configs become problems with a place and a hint.

Property tests feed `check_file`, `tunekit data check` and `load_config` arbitrary bytes, arbitrary JSON,
mutated valid examples and arbitrary YAML; a fixed set of hostile files covers what an attacker would
build on purpose (deep nesting, huge numbers, huge lines, YAML tags, alias bombs).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tunekit.cli import app
from tunekit.config import load_config
from tunekit.data.check import check_file
from tunekit.errors import ConfigError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

VALID = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello", "weight": 1}]},
    {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}],
     "messages": [{"role": "user", "content": "Paris?"},
                  {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                      "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "22C"},
                  {"role": "assistant", "content": [{"type": "text", "text": "22C in Paris."}]}]},
    {"prompt": "2+2=", "completion": "4"},
    {"text": "plain text"},
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
replacement = st.sampled_from([None, True, -1, 0, 1.5, 10**30, "", "x", "assistant", "tool", [], {}, [{}],
                               {"type": "text"}, "\ud800", "\x00", "{\"a\":", float("inf")])


def mutate(record, path: list, value):
    """Replace the value at a path (indices into dict keys / list items, taken modulo their sizes)."""
    record = copy.deepcopy(record)
    node = record
    for k, step in enumerate(path):
        if isinstance(node, dict) and node:
            key = sorted(node)[step % len(node)]
            if k == len(path) - 1 or not isinstance(node[key], dict | list):
                node[key] = value
                return record
            node = node[key]
        elif isinstance(node, list) and node:
            i = step % len(node)
            if k == len(path) - 1 or not isinstance(node[i], dict | list):
                node[i] = value
                return record
            node = node[i]
        else:
            return record
    return record


def check_cli(path: Path, *args: str) -> int:
    result = CliRunner().invoke(app, ["data", "check", str(path), *args], env={"COLUMNS": "200"})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 1), result.output
    return result.exit_code


@given(st.binary(max_size=400))
@FAST
def test_check_file_on_arbitrary_bytes_never_raises(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "x.jsonl"
    path.write_bytes(data)
    report = check_file(path)
    assert report.lines == data.count(b"\n") + (not data.endswith(b"\n") and len(data) > 0)
    json.dumps(report.to_dict())  # the report itself is always serialisable
    check_cli(path)


@given(st.lists(json_values, min_size=1, max_size=5))
@FAST
def test_check_file_on_arbitrary_json_values_never_raises(tmp_path_factory, values):
    path = tmp_path_factory.mktemp("json") / "x.jsonl"
    path.write_text("".join(json.dumps(v) + "\n" for v in values), encoding="utf-8")
    report = check_file(path)
    assert report.lines == len(values) and report.examples <= len(values)
    assert report.examples == 0 or report.stats is not None
    check_cli(path, "--json")


@given(st.sampled_from(range(len(VALID))), st.lists(st.integers(0, 50), min_size=1, max_size=6), replacement)
@FAST
def test_mutated_valid_examples_never_raise(tmp_path_factory, chat_tokenizer, which, path, value):
    record = mutate(VALID[which], path, value)
    file = tmp_path_factory.mktemp("mut") / "x.jsonl"
    file.write_text(json.dumps(record) + "\n" + json.dumps(VALID[0]) + "\n", encoding="utf-8")
    report = check_file(file, tokenizer=chat_tokenizer, max_len=64)
    # the untouched second line is still read, whatever the first one holds
    assert report.examples >= 1
    check_cli(file)


@pytest.mark.parametrize("raw, code", [
    (b"[" * 200_000 + b"]" * 200_000, "too_deep"),  # RecursionError in Python's JSON parser
    (b'{"messages": ' + b"[" * 80 + b"]" * 80 + b"}", "too_deep"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": ' + b"9" * 100_000 + b"}", "number_too_large"),
    (b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "invalid_unicode"),
    (b'{"text": "' + b"a" * 3_000_000 + b'"}', "line_too_long"),
    (b'{"text": NaN}', "invalid_json"),
    (b"\xff\xfe{}", "invalid_utf8"),
])
def test_hostile_lines_are_problems_on_their_line(tmp_path, raw, code):
    path = tmp_path / "hostile.jsonl"
    good = json.dumps(VALID[0]).encode()
    path.write_bytes(good + b"\n" + raw + b"\n" + good + b"\n")
    t0 = time.perf_counter()
    report = check_file(path, max_line_bytes=2**20)
    assert time.perf_counter() - t0 < 30  # bounded cost, not a timing goal
    (problem,) = [p for p in report.problems if p.severity == "error" and p.code != "duplicate_example"]
    assert (problem.code, problem.line) == (code, 2) and problem.hint
    assert report.lines == 3
    assert check_cli(path, "--max-line-bytes", str(2**20)) == 1


def test_records_built_to_cost_time_or_memory_are_bounded(tmp_path, chat_tokenizer):
    many_turns = {"messages": [{"role": r, "content": "x"} for _ in range(3000) for r in ("user", "assistant")]}
    many_keys = {"messages": [{"role": "user", "content": "hi", **{f"k{i}": i for i in range(50_000)}},
                              {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "costly.jsonl"
    path.write_text(json.dumps(many_turns) + "\n" + json.dumps(many_keys) + "\n" + json.dumps(VALID[0]) + "\n")
    t0 = time.perf_counter()
    report = check_file(path, tokenizer=chat_tokenizer)
    assert time.perf_counter() - t0 < 30  # bounded cost, not a timing goal
    assert report.counts["too_many_messages"] == 1 and report.counts["more_problems"] == 1
    assert report.counts["message_unrecognized_key"] == 100 and report.examples == 1


def test_line_limit_is_configurable(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "x" * 500}) + "\n" + json.dumps({"text": "short"}) + "\n")
    assert check_file(path).counts.get("line_too_long") is None
    report = check_file(path, max_line_bytes=100)
    assert report.counts["line_too_long"] == 1 and report.examples == 1
    # a line of exactly the limit (newline not counted) is read
    exact = len(json.dumps({"text": "short"}).encode())
    assert check_file(path, max_line_bytes=exact).counts["line_too_long"] == 1
    assert "line_too_long" not in check_file(path, max_line_bytes=exact + 10_000).counts


# -------------------------------------------------------------------------------------------- configs


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@given(st.text(max_size=300))
@FAST
def test_load_config_on_arbitrary_text_raises_only_config_errors(tmp_path_factory, text):
    path = write_config(tmp_path_factory.mktemp("cfg"), text)
    try:
        load_config(path, check_files=False)
    except ConfigError as exc:
        assert exc.problems and all(p.message for p in exc.problems)


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=15)


@given(st.dictionaries(st.sampled_from(["model", "data", "method", "lora", "train", "output", "eval", "x"]),
                       yaml_values, max_size=5))
@FAST
def test_load_config_on_arbitrary_yaml_values_raises_only_config_errors(tmp_path_factory, data):
    path = write_config(tmp_path_factory.mktemp("cfg"), yaml.safe_dump(data))
    try:
        load_config(path, check_files=False)
    except ConfigError as exc:
        assert exc.problems


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


@pytest.mark.parametrize("text, words", [
    ("model: !!python/object/apply:os.system ['touch /tmp/tunekit-pwned']\n", "YAML"),
    ("model:\n  base: !!python/name:os.system\n", "YAML"),
    (ALIAS_BOMB + "model: {base: *i}\n", "aliases"),
    ("train:\n  epochs: " + "9" * 10_000 + "\n", "number"),
    ("model: " + "[" * 50_000 + "]" * 50_000 + "\n", "deep"),
    ("model: {base: x}\ndata: {train: t.jsonl}\nlora: {r: 1e99999}\n", "lora.r"),
    ("\x00\x01", "YAML"),
])
def test_hostile_configs_are_clear_errors(tmp_path, text, words):
    path = write_config(tmp_path, text)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path, check_files=False)
    assert time.perf_counter() - t0 < 30
    message = " ".join(f"{p.where} {p.message} {p.hint}" for p in err.value.problems)
    assert words in message and str(path) in message
    assert not Path("/tmp/tunekit-pwned").exists()
    result = CliRunner().invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_config_file_size_is_bounded(tmp_path):
    path = write_config(tmp_path, "model: {base: x}\n# " + "x" * (2 * 2**20) + "\n")
    with pytest.raises(ConfigError, match="larger"):
        load_config(path, check_files=False)


def test_hostile_override_is_a_clear_error(tmp_path):
    path = write_config(tmp_path, "model: {base: org/m}\ndata: {train: t.jsonl}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.epochs=" + "9" * 10_000], check_files=False)
    assert "train.epochs" in err.value.problems[0].where


@pytest.mark.parametrize("text", ["-: \n", "model: {base: m}\ndata: {train: t}\nlora: {int: 1, my-key: 2}\n"])
def test_keys_that_look_like_pydantic_tags_are_named(tmp_path, text):
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, text), check_files=False)
    assert any("unknown key" in p.message for p in err.value.problems)
