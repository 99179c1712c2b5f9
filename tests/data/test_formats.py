"""Each problem code, triggered by one hand-made line among clean ones, with its line number and JSON path."""

from __future__ import annotations

import json

import pytest

from tunekit.data.check import check_file
from tunekit.data.formats import detect_format, load_examples, read_jsonl, record_digest, validate_record
from tunekit.errors import DataError


def good(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def call(cid: str = "c1", name: str = "get_weather", arguments: object = '{"city": "Paris"}') -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


WEATHER_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
U = {"role": "user", "content": "weather?"}


def chat(*messages: dict, **top: object) -> dict:
    return {"messages": list(messages), **top}


def write_lines(tmp_path, lines: list, name: str = "train.jsonl"):
    """Lines are dicts (dumped as JSON), str (written as is) or bytes (written raw)."""
    path = tmp_path / name
    with path.open("wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            elif isinstance(line, str):
                f.write(line.encode("utf-8") + b"\n")
            else:
                f.write(json.dumps(line).encode("utf-8") + b"\n")
    return path


# (code, line 3 of the file, JSON path, severity)
CASES = [
    ("data_type", [1, 2], "", "error"),
    ("data_type", chat(U, {"role": "assistant", "content": 5}), "messages[1].content", "error"),
    ("missing_messages_list", {"messages": []}, "messages", "error"),
    ("missing_messages_list", {"messages": "hi"}, "messages", "error"),
    ("message_missing_key", chat({"content": "x"}, {"role": "assistant", "content": "y"}), "messages[0].role", "error"),
    ("message_missing_key", chat({"role": "user"}, {"role": "assistant", "content": "y"}), "messages[0].content", "error"),
    ("message_unrecognized_key", chat(U, {"role": "assistant", "content": "y", "thinking": "z"}),
     "messages[1].thinking", "error"),
    ("unrecognized_role", chat({"role": "human", "content": "x"}, {"role": "assistant", "content": "y"}),
     "messages[0].role", "error"),
    ("missing_content", chat(U, {"role": "assistant", "content": ""}), "messages[1].content", "error"),
    ("missing_content", chat(U, {"role": "assistant", "content": None}), "messages[1].content", "error"),
    ("invalid_content_part", chat({"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                                  {"role": "assistant", "content": "y"}), "messages[0].content[0]", "error"),
    ("example_missing_assistant_message", chat(U), "messages", "error"),
    ("tool_arguments_not_json",
     chat(U, {"role": "assistant", "tool_calls": [call(arguments="{city: Paris}")]},
          {"role": "tool", "tool_call_id": "c1", "content": "20C"}, {"role": "assistant", "content": "20C"}),
     "messages[1].tool_calls[0].function.arguments", "error"),
    ("tool_arguments_not_json",  # an object instead of its JSON encoding
     chat(U, {"role": "assistant", "tool_calls": [call(arguments={"city": "Paris"})]},
          {"role": "tool", "tool_call_id": "c1", "content": "20C"}, {"role": "assistant", "content": "20C"}),
     "messages[1].tool_calls[0].function.arguments", "error"),
    ("tool_arguments_not_json",
     chat(U, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "[1"}},
          {"role": "function", "name": "f", "content": "r"}, {"role": "assistant", "content": "ok"}),
     "messages[1].function_call.arguments", "error"),
    ("tool_call_id_unmatched",
     chat(U, {"role": "assistant", "tool_calls": [call("c1")]}, {"role": "tool", "tool_call_id": "c9", "content": "x"},
          {"role": "tool", "tool_call_id": "c1", "content": "x"}, {"role": "assistant", "content": "done"}),
     "messages[2].tool_call_id", "error"),
    ("tool_call_unanswered",  # other messages follow the call, none answers it
     chat(U, {"role": "assistant", "tool_calls": [call("c1"), call("c2")]},
          {"role": "tool", "tool_call_id": "c1", "content": "x"}, {"role": "assistant", "content": "done"}),
     "messages[1].tool_calls[1].id", "error"),
    ("tool_call_unanswered",  # the call ends the example: it teaches the call itself
     chat(U, {"role": "assistant", "tool_calls": [call("c1")]}), "messages[1].tool_calls[0].id", "info"),
    ("tool_not_declared",
     chat(U, {"role": "assistant", "tool_calls": [call(name="get_time")]}, tools=WEATHER_TOOLS),
     "messages[1].tool_calls[0].function.name", "error"),
    ("tool_not_declared",
     chat(U, {"role": "assistant", "function_call": {"name": "g", "arguments": "{}"}}, functions=[{"name": "f"}]),
     "messages[1].function_call.name", "error"),
    ("invalid_tool_call", chat(U, {"role": "assistant", "tool_calls": [{"type": "function"}]}),
     "messages[1].tool_calls[0]", "error"),
    ("invalid_tool", chat(U, {"role": "assistant", "content": "y"}, tools=[{"name": "f"}]), "tools[0]", "error"),
    ("invalid_weight", chat(U, {"role": "assistant", "content": "y", "weight": 0.5}), "messages[1].weight", "error"),
    ("invalid_weight", chat(U, {"role": "assistant", "content": "y", "weight": True}), "messages[1].weight", "error"),
    ("weight_not_on_assistant", chat({"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}),
     "messages[0].weight", "error"),
    ("no_trained_tokens", chat(U, {"role": "assistant", "content": "y", "weight": 0}), "messages", "error"),
    ("unrecognized_key", {**good(99), "id": 7}, "id", "warning"),
    ("format_mismatch", {"prompt": "a", "completion": "b"}, "", "error"),
    ("invalid_json", '{"messages": [}', "", "error"),
    ("invalid_utf8", b'{"messages": "\xff\xfe"}', "", "error"),
    ("empty_line", "   ", "", "warning"),
]


@pytest.mark.parametrize("code,line3,path,severity", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_code_is_reported_at_its_line_and_path(tmp_path, code, line3, path, severity):
    lines = [good(i) for i in range(12)]
    lines.insert(2, line3)
    report = check_file(write_lines(tmp_path, lines))
    hits = [p for p in report.problems if p.code == code]
    assert hits, [(p.code, p.line, p.path) for p in report.problems]
    assert (hits[0].line, hits[0].path, hits[0].severity) == (3, path, severity)
    assert hits[0].hint
    # Only line 3 has problems: the clean lines around it give none.
    assert {p.line for p in report.problems} == {3}
    assert report.ok == (severity != "error")


def test_invalid_json_names_the_column(tmp_path):
    report = check_file(write_lines(tmp_path, [good(0), '{"messages": [}']))
    (issue,) = [p for p in report.problems if p.code == "invalid_json"]
    assert (issue.line, issue.column) == (2, 15)
    assert issue.where.endswith("train.jsonl:2:15")


def test_invalid_utf8_is_reported_per_line_and_the_rest_is_read(tmp_path):
    lines = [good(0), b'{"messages": "caf\xe9"}'] + [good(i) for i in range(1, 11)]
    report = check_file(write_lines(tmp_path, lines))
    (issue,) = [p for p in report.problems if p.code == "invalid_utf8"]
    assert (issue.line, issue.column) == (2, 18)  # the byte 0xe9, 1-based
    assert report.examples == 11


def test_bom_on_line_one_is_accepted_as_info(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(json.dumps(good(i)).encode() for i in range(10)) + b"\n")
    report = check_file(path)
    assert report.counts == {"bom": 1} and report.severities["bom"] == "info"
    assert report.ok and report.examples == 10


def test_crlf_and_clean_chat_with_tools_give_no_problems(tmp_path):
    tool_example = chat({"role": "system", "content": "be brief"}, U,
                        {"role": "assistant", "content": None, "tool_calls": [call("a"), call("b")]},
                        {"role": "tool", "tool_call_id": "b", "content": "21C"},
                        {"role": "tool", "tool_call_id": "a", "content": "20C"},
                        {"role": "assistant", "content": [{"type": "text", "text": "20C"}], "weight": 1},
                        tools=WEATHER_TOOLS, parallel_tool_calls=True)
    legacy = chat(U, {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
                  {"role": "function", "name": "get_weather", "content": "20C"},
                  {"role": "assistant", "content": "20C", "weight": 0}, {"role": "assistant", "content": "ok"},
                  functions=[{"name": "get_weather"}])
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\r\n" for r in [tool_example, legacy] + [good(i) for i in range(9)]))
    report = check_file(path)
    assert report.problems == [] and report.counts == {}
    assert report.ok and report.examples == 11 and report.format == "chat"


def test_completion_and_text_formats(tmp_path):
    comp = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]
    comp += [{"prompt": "p", "completion": ""}, {"prompt": 3, "completion": "c"}, {"completion": "c"}, good(0)]
    report = check_file(write_lines(tmp_path, comp))
    assert report.format == "completion" and report.examples == 10
    found = {(p.code, p.line, p.path) for p in report.problems}
    assert found == {("no_trained_tokens", 11, "completion"), ("data_type", 12, "prompt"),
                     ("missing_key", 13, "prompt"), ("format_mismatch", 14, "")}
    text = [{"text": f"doc {i}"} for i in range(10)] + [{"text": " "}]
    report = check_file(write_lines(tmp_path, text, "text.jsonl"))
    assert report.format == "text"
    assert [(p.code, p.line, p.path) for p in report.problems] == [("missing_content", 11, "text")]


def test_a_given_format_overrides_detection(tmp_path):
    path = write_lines(tmp_path, [{"prompt": "a", "completion": "b"}] * 1 + [good(i) for i in range(10)])
    report = check_file(path, fmt="chat")
    assert [(p.code, p.line) for p in report.problems] == [("format_mismatch", 1)]
    assert report.format == "chat" and report.examples == 10


def test_detect_format_and_digest():
    assert detect_format(good(0)) == "chat"
    assert detect_format({"prompt": "a", "completion": "b"}) == "completion"
    assert detect_format({"text": "a"}) == "text"
    assert detect_format({"foo": 1}) is None and detect_format([1]) is None
    # Same content, other key order -> same digest; other content -> another.
    a = {"messages": [{"role": "user", "content": "x"}], "tools": []}
    b = {"tools": [], "messages": [{"content": "x", "role": "user"}]}
    assert record_digest(a) == record_digest(b) != record_digest(good(0))


def test_validate_record_lists_every_problem_at_once():
    record = chat({"role": "user", "content": "x", "weight": 1},
                  {"role": "assistant", "tool_calls": [call(arguments="nope")], "extra": 1})
    codes = sorted(i.code for i in validate_record(record, "chat"))
    assert codes == ["message_unrecognized_key", "tool_arguments_not_json", "tool_call_unanswered",
                     "weight_not_on_assistant"]


def test_read_jsonl_streams_lines_with_numbers(tmp_path):
    path = write_lines(tmp_path, [good(0), "", good(1)])
    lines = list(read_jsonl(path))
    assert [line.number for line in lines] == [1, 2, 3]
    assert lines[1].record is None and lines[1].issues[0].code == "empty_line"
    assert lines[2].record == good(1)


def test_load_examples_returns_records_or_raises_with_every_error(tmp_path):
    fmt, examples = load_examples(write_lines(tmp_path, [good(0), "", good(1)]))
    assert fmt == "chat" and [n for n, _ in examples] == [1, 3]
    bad = write_lines(tmp_path, [good(0), "{", chat(U)], "bad.jsonl")
    with pytest.raises(DataError) as info:
        load_examples(bad)
    wheres = [p.where for p in info.value.problems]
    assert wheres == [f"{bad}:2", f"{bad}:3 messages"]


def test_every_emitted_code_is_documented():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    source = "".join(p.read_text() for p in (root / "src/tunekit/data").glob("*.py"))
    emitted = set(re.findall(r'DataIssue\(\s*"([a-z_0-9]+)"', source))
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", (root / "docs/data_check.md").read_text(), re.M))
    assert "tool_call_id_unmatched" in emitted and len(emitted) > 25
    assert emitted == documented
