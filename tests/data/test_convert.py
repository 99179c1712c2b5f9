"""ShareGPT / Alpaca -> chat: content kept in order, the output passes check_file, writes are atomic."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunekit.data.check import check_file
from tunekit.data.convert import ConvertError, alpaca_to_chat, convert_file, sharegpt_to_chat
from tunekit.data.formats import validate_record
from tunekit.errors import DataError


def write(tmp_path, records, name="in.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_alpaca_maps_instruction_input_output_and_history():
    rec = {"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "be exact",
           "history": [["hi", "hey"]]}
    assert alpaca_to_chat(rec) == {"messages": [
        {"role": "system", "content": "be exact"},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"},
        {"role": "user", "content": "Translate\n\nbonjour"}, {"role": "assistant", "content": "hello"}]}
    assert alpaca_to_chat({"instruction": "Say hi", "input": "", "output": "hi"})["messages"] == [
        {"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]


def test_sharegpt_maps_roles_and_tool_calls():
    rec = {"conversations": [
        {"from": "system", "value": "sys"},
        {"from": "human", "value": "weather in Paris and Rome?"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                       {"name": "get_weather", "arguments": {"city": "Rome"}}])},
        {"from": "observation", "value": "20C"},
        {"from": "observation", "value": "25C"},
        {"from": "gpt", "value": "Paris 20C, Rome 25C"}],
        "tools": json.dumps([{"name": "get_weather", "parameters": {"type": "object"}}])}
    out = sharegpt_to_chat(rec)
    roles = [m["role"] for m in out["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "assistant"]
    calls = out["messages"][2]["tool_calls"]
    assert [c["id"] for c in calls] == ["call_1", "call_2"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Rome"}
    assert [m.get("tool_call_id") for m in out["messages"][3:5]] == ["call_1", "call_2"]
    assert out["tools"] == [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert validate_record(out, "chat") == []


@pytest.mark.parametrize("record,path", [
    ({"conversations": []}, "conversations"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from"),
    ({"conversations": [{"from": "human", "value": 3}]}, "conversations[0].value"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "observation", "value": "r"}]}, "conversations[1]"),
    ({"conversations": [{"from": "function_call", "value": "not json"}]}, "conversations[0].value"),
])
def test_bad_sharegpt_records_name_the_place(record, path):
    with pytest.raises(ConvertError) as info:
        sharegpt_to_chat(record)
    assert info.value.path == path and info.value.hint


text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(str.strip)


@settings(max_examples=60, deadline=None)
@given(turns=st.lists(st.tuples(text, text), min_size=1, max_size=4), system=st.one_of(st.just(""), text))
def test_sharegpt_round_trip_keeps_every_turn(turns, system):
    conv = ([{"from": "system", "value": system}] if system else [])
    for user, assistant in turns:
        conv += [{"from": "human", "value": user}, {"from": "gpt", "value": assistant}]
    out = sharegpt_to_chat({"conversations": conv})
    back = [{"from": {"user": "human", "assistant": "gpt", "system": "system"}[m["role"]], "value": m["content"]}
            for m in out["messages"]]
    assert back == conv
    assert validate_record(out, "chat") == []


@settings(max_examples=60, deadline=None)
@given(instruction=text, extra=st.one_of(st.just(""), text), output=text)
def test_alpaca_round_trip_keeps_the_texts(instruction, extra, output):
    messages = alpaca_to_chat({"instruction": instruction, "input": extra, "output": output})["messages"]
    user, assistant = messages
    assert assistant == {"role": "assistant", "content": output}
    assert user["content"] == (f"{instruction}\n\n{extra}" if extra else instruction)
    assert validate_record({"messages": messages}, "chat") == []


def test_convert_file_output_passes_check(tmp_path):
    src = write(tmp_path, [{"instruction": f"task {i}", "input": "", "output": f"done {i}"} for i in range(12)])
    dst = tmp_path / "out.jsonl"
    result = convert_file(src, dst, "alpaca")
    assert result.written == 12 and result.skipped == []
    report = check_file(dst)
    assert report.ok and report.problems == [] and report.examples == 12


def test_a_bad_record_leaves_nothing_written(tmp_path):
    records = [{"instruction": "a", "output": "b"}, "{broken", {"instruction": "c"}, {"instruction": "d", "output": "e"}]
    src = write(tmp_path, records)
    dst = tmp_path / "out.jsonl"
    dst.write_text("previous content\n")
    with pytest.raises(DataError) as info:
        convert_file(src, dst, "alpaca")
    wheres = [p.where for p in info.value.problems]
    assert wheres == [f"{src}:2:2", f"{src}:3 output"]
    assert dst.read_text() == "previous content\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temp file left


def test_skip_bad_writes_the_good_records_and_lists_the_bad(tmp_path):
    src = write(tmp_path, [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
                           {"conversations": [{"from": "robot", "value": "q"}]}])
    dst = tmp_path / "out.jsonl"
    result = convert_file(src, dst, "sharegpt", skip_bad=True)
    assert result.written == 1
    assert [(i.line, i.code, i.path) for i in result.skipped] == [(2, "invalid_sharegpt", "conversations[0].from")]
    assert len(dst.read_text().splitlines()) == 1


def test_missing_input_and_missing_output_folder(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        convert_file(tmp_path / "nope.jsonl", tmp_path / "out.jsonl", "alpaca")
    assert list(tmp_path.iterdir()) == []
    src = write(tmp_path, [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="folder does not exist"):
        convert_file(src, tmp_path / "no" / "out.jsonl", "alpaca")
