"""Preference pairs: both wire forms read alike, every problem named by line and field, each side rendered exactly
as the model's chat template renders the conversation with that reply, check statistics, convert round trip."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tunekit.cli import app
from tunekit.data.check import check_file
from tunekit.data.convert import convert_file, to_openai_dpo, to_trl
from tunekit.data.formats import detect_format, load_examples
from tunekit.data.preference import (
    PreferencePair,
    fit_pair,
    pair_sequences,
    preference_form,
    read_preference,
    render_pair,
    validate_preference,
)
from tunekit.data.render import end_of_turn_ids, render_example, render_prompt
from tunekit.data.types import IGNORE
from tunekit.errors import DataError, TemplateError

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def reply(text: str | None = None, **extra) -> dict:
    return {"role": "assistant", "content": text, **extra}


def call(args: str = '{"city": "Paris"}', name: str = "get_weather", id_: str = "call_1") -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": args}}


def openai(i: int = 0, chosen: str = "Paris is the capital.", rejected: str = "London, I think.",
           prompt: list | None = None) -> dict:
    return {"input": {"messages": prompt or [user(f"What is the capital of France? ({i})")]},
            "preferred_output": [reply(chosen)], "non_preferred_output": [reply(rejected)]}


def write(tmp_path, records, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def found(record) -> set[tuple[str, str]]:
    return {(i.code, i.path) for i in validate_preference(record)}


# --------------------------------------------------------------------------------------------------
# Forms


def test_both_forms_are_detected_and_read_alike():
    prompt = [{"role": "system", "content": "Be brief."}, user("Capital of France?")]
    forms = {
        "openai": {"input": {"messages": prompt}, "preferred_output": [reply("Paris.")],
                   "non_preferred_output": [reply("Lyon.")]},
        "openai (older names)": {"input": {"messages": prompt}, "preferred_completion": [reply("Paris.")],
                                 "non_preferred_completion": [reply("Lyon.")]},
        "trl": {"prompt": prompt, "chosen": [reply("Paris.")], "rejected": [reply("Lyon.")]},
        "trl implicit": {"chosen": [*prompt, reply("Paris.")], "rejected": [*prompt, reply("Lyon.")]},
    }
    for name, record in forms.items():
        assert detect_format(record) == "preference", name
        assert validate_preference(record) == [], name
        pref = read_preference(record)
        assert (pref.prompt, pref.chosen, pref.rejected) == (prompt, reply("Paris."), reply("Lyon.")), name
    assert preference_form(forms["openai"]) == "openai" and preference_form(forms["trl implicit"]) == "trl"
    # the other formats are unchanged; an Alpaca record's "input" does not make it a pair
    assert detect_format({"messages": []}) == "chat" and detect_format({"prompt": "a", "completion": "b"}) == "completion"
    assert detect_format({"instruction": "a", "input": "b", "output": "c"}) is None


def test_text_pairs_and_the_implicit_text_prompt():
    pref = read_preference({"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"})
    assert pref.text and (pref.prompt, pref.chosen, pref.rejected) == ("Q: 2+2?", " 4", " 5")
    # TRL's rule: the shared beginning, with the space before the first difference given to the replies
    pref = read_preference({"chosen": "Human: hi Assistant: Sure thing", "rejected": "Human: hi Assistant: No"})
    assert (pref.prompt, pref.chosen, pref.rejected) == ("Human: hi Assistant:", " Sure thing", " No")
    assert pref.implicit


# --------------------------------------------------------------------------------------------------
# Problems: each with its line and field


BAD = [  # (record, code, field) -- each line of the file has exactly the named error (and maybe others)
    ({"input": {"messages": [user("q")]}, "preferred_output": [reply("a")]},
     "preference_missing_side", "non_preferred_output"),
    ({"prompt": "q", "chosen": "a"}, "preference_missing_side", "rejected"),
    ({"input": {"messages": [user("q")]}, "preferred_output": [user("a")], "non_preferred_output": [reply("b")]},
     "preference_side_not_assistant", "preferred_output[0].role"),
    ({"prompt": [user("q")], "chosen": [reply("a")], "rejected": [{"role": "tool", "content": "b"}]},
     "preference_side_not_assistant", "rejected[0].role"),
    ({"input": {"messages": [user("q")]}, "preferred_output": [reply("a"), reply("b")],
      "non_preferred_output": [reply("c")]}, "preference_side_length", "preferred_output"),
    (openai(chosen="Paris.", rejected="Paris."), "preference_identical_sides", "non_preferred_output[0]"),
    ({"input": {"messages": [user("q")], "tools": TOOLS},  # the same call: arguments compared as JSON
      "preferred_output": [reply(tool_calls=[call('{"city": "Paris"}')])],
      "non_preferred_output": [reply(tool_calls=[call('{"city":"Paris"}')])]},
     "preference_identical_sides", "non_preferred_output[0]"),
    ({"chosen": [user("q"), reply("a")], "rejected": [user("q"), reply("a")]},
     "preference_identical_sides", "rejected"),
    ({"input": {"messages": [user("q")]}, "preferred_output": [], "non_preferred_output": [reply("b")]},
     "preference_empty_output", "preferred_output"),
    (openai(chosen="", rejected="b"), "preference_empty_output", "preferred_output[0].content"),
    (openai(chosen="a", rejected="  \n"), "preference_empty_output", "non_preferred_output[0].content"),
    ({"prompt": "q", "chosen": "a", "rejected": " "}, "preference_empty_output", "rejected"),
    ({"chosen": [user("q"), reply("a")], "rejected": [user("q"), reply("a"), user("more")]},
     "preference_empty_output", "chosen"),
    (openai(prompt=[user("q"), reply("I think")]), "preference_prompt_ends_with_assistant", "input.messages[1]"),
    ({"chosen": [user("q"), reply("x"), reply("a")], "rejected": [user("q"), reply("x"), reply("b")]},
     "preference_prompt_ends_with_assistant", "chosen[1]"),
    ({"input": {"messages": [user("q")], "tools": TOOLS},
      "preferred_output": [reply(tool_calls=[call('{"city": Paris}')])], "non_preferred_output": [reply("b")]},
     "tool_arguments_not_json", "preferred_output[0].tool_calls[0].function.arguments"),
    ({"input": {"messages": [user("q")], "tools": TOOLS},
      "preferred_output": [reply(tool_calls=[call(name="get_time")])], "non_preferred_output": [reply("b")]},
     "tool_not_declared", "preferred_output[0].tool_calls[0].function.name"),
    ({"chosen": [user("q"), reply("a")], "rejected": [user("other q"), reply("b")]},
     "preference_no_shared_prompt", "rejected[0]"),
    ({"chosen": "The sky is blue.", "rejected": "Grass is green."}, "preference_no_shared_prompt", "rejected"),
    ({"chosen": [user("q"), reply("a"), user("q2"), reply("a2")], "rejected": [user("q"), reply("b")]},
     "preference_no_shared_prompt", "chosen[1]"),
    ({"input": {"messages": [user("q")]}, "preferred_output": reply("a"), "non_preferred_output": [reply("b")]},
     "data_type", "preferred_output"),
    ({"input": [user("q")], "preferred_output": [reply("a")], "non_preferred_output": [reply("b")]},
     "data_type", "input"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "data_type", "prompt"),
    ({"prompt": "q", "chosen": [reply("a")], "rejected": "b"}, "data_type", "chosen"),
    ({"chosen": "q a", "rejected": [user("q"), reply("b")]}, "data_type", "rejected"),
    (openai(chosen=3), "data_type", "preferred_output[0].content"),  # type: ignore[arg-type]
    ({"preferred_output": [reply("a")], "non_preferred_output": [reply("b")]}, "missing_key", "input"),
    ({"input": {"messages": []}, "preferred_output": [reply("a")], "non_preferred_output": [reply("b")]},
     "missing_messages_list", "input.messages"),
    (openai(prompt=[{"role": "robot", "content": "q"}]), "unrecognized_role", "input.messages[0].role"),
    ({"prompt": [user("q"), {"role": "assistant", "content": "x", "weight": 2}, user("q2")],
      "chosen": [reply("a")], "rejected": [reply("b")]}, "invalid_weight", "prompt[1].weight"),
    ({"messages": [user("q"), reply("a")]}, "format_mismatch", ""),
]


def test_every_problem_is_named_by_line_and_field(tmp_path):
    path = write(tmp_path, [openai(0)] + [record for record, _, _ in BAD])
    report = check_file(path, fmt="preference")
    assert report.format == "preference" and report.examples == 1
    for line, (record, code, field) in enumerate(BAD, start=2):
        at_line = {(p.code, p.path) for p in report.problems if p.line == line}
        assert (code, field) in at_line, (line, record, at_line)
        hints = [p.hint for p in report.problems if p.line == line and p.code == code]
        assert all(hints), (line, code)
    assert report.errors >= len(BAD) and not report.ok


def test_problems_are_all_reported_at_once_and_once_each():
    record = {"input": {"messages": [{"role": "robot", "content": "q"}, reply("x")]},
              "preferred_output": [user("a")], "non_preferred_output": {"role": "assistant", "content": "b"}}
    issues = [(i.code, i.path) for i in validate_preference(record)]
    assert sorted(issues) == sorted([
        ("preference_side_not_assistant", "preferred_output[0].role"), ("data_type", "non_preferred_output"),
        ("unrecognized_role", "input.messages[0].role"),  # the prompt's problem, once for both sides
        ("preference_prompt_ends_with_assistant", "input.messages[1]"), ("no_user_message", "input.messages")])
    with pytest.raises(DataError) as info:
        read_preference(record)
    assert {p.where for p in info.value.problems} == {path for code, path in issues if code != "no_user_message"}


def test_warnings_and_notes_of_a_valid_pair():
    ws = {(i.code, i.path, i.severity) for i in validate_preference(openai(chosen="Paris is  big.",
                                                                           rejected="Paris is big."))}
    assert ws == {("preference_whitespace_only", "non_preferred_output[0]", "warning")}
    # a reply that makes a call ends the pair by design: no tool_call_unanswered note
    record = {"input": {"messages": [user("Weather in Paris?")], "tools": TOOLS, "parallel_tool_calls": True},
              "preferred_output": [reply(tool_calls=[call()])], "non_preferred_output": [reply("It is sunny.")],
              "extra": 1}
    assert found(record) == {("unrecognized_key", "extra")}


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3), max_leaves=8)
SLOTS = {  # where a random value replaces what a valid pair has, per form
    "openai": ["record", "input", "input.messages", "input.messages[0]", "input.messages[0].role",
               "input.messages[0].content", "preferred_output", "preferred_output[0]", "preferred_output[0].role",
               "preferred_output[0].content", "non_preferred_output[0].tool_calls", "input.tools"],
    "trl": ["record", "prompt", "prompt[0]", "chosen", "chosen[0]", "chosen[0].content", "rejected"],
    "trl implicit": ["chosen", "chosen[0]", "chosen[1]", "rejected[1].content", "rejected[1].tool_calls"],
}
BASES = {"openai": openai(),
         "trl": {"prompt": [user("q")], "chosen": [reply("a")], "rejected": [reply("b")]},
         "trl implicit": {"chosen": [user("q"), reply("a")], "rejected": [user("q"), reply("b")]}}


def _put(record: dict, slot: str, value):
    """`record` with the value at `slot` (a dotted path with [i] indexes) replaced."""
    if slot == "record":
        return value
    parts = [int(p) if p.isdigit() else p for p in slot.replace("[", ".").replace("]", "").split(".")]
    target = record
    for part in parts[:-1]:
        target = target[part]
    target[parts[-1]] = value
    return record


@given(choice=st.sampled_from([(form, slot) for form, slots in SLOTS.items() for slot in slots]),
       value=json_values)
@settings(max_examples=150, deadline=None)
def test_property_any_value_anywhere_is_reported_never_raised(choice, value):
    form, slot = choice
    base = BASES[form]
    record = _put(json.loads(json.dumps(base)), slot, value)
    issues = validate_preference(record)
    assert all(i.code and i.hint for i in issues)
    if not any(i.severity == "error" for i in issues):  # a valid pair converts both ways to the same pair
        pref = read_preference(record)
        assert read_preference(to_openai_dpo(record)).chosen == read_preference(to_trl(record)).chosen == (
            pref.chosen if isinstance(pref.chosen, dict) else reply(pref.chosen))
    else:
        with pytest.raises(DataError):
            read_preference(record)


# --------------------------------------------------------------------------------------------------
# Rendering


PROMPT = [user("What is the capital of France?"), reply("Paris."), user("And of Italy?")]
TEMPLATES = ["chatml", "llama-3-instruct", "qwen2.5-instruct", "mistral-instruct", "gemma-it", "hermes-tools",
             "llama-2-chat", "llama-3.1-tools-json", "mistral-tools", "phi-3", "vicuna", "zephyr"]


def assert_renders_as_the_template(tok, pair: PreferencePair, prompt: list[dict], replies: list[dict], tools=None):
    """prompt + side is the template's own rendering of the conversation with that reply (whitespace after the
    end of turn aside), the prompt is the generation prompt, and each side ends with an end-of-turn token."""
    assert pair.prompt == render_prompt(prompt, tok, tools=tools)
    for side, message in zip((pair.chosen, pair.rejected), replies, strict=True):
        text = tok.apply_chat_template(prompt + [message], tools=tools, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        n = len(pair.prompt) + len(side)
        assert ids[:n] == pair.prompt + side
        assert tok.decode(ids[n:]).strip() == ""
        assert side[-1] in end_of_turn_ids(tok)


def test_sides_render_exactly_as_the_chatml_fixture(chat_tokenizer):
    pair = render_pair({"prompt": PROMPT, "chosen": [reply("Rome.")], "rejected": [reply("Milan, I believe.")]},
                       chat_tokenizer)
    assert_renders_as_the_template(chat_tokenizer, pair, PROMPT, [reply("Rome."), reply("Milan, I believe.")])
    assert chat_tokenizer.decode(pair.chosen) == "Rome.<|im_end|>"


@pytest.mark.parametrize("name", TEMPLATES)
def test_sides_render_exactly_as_the_shared_templates(tokenizer_with_template, name):
    tok = tokenizer_with_template(name)
    replies = [reply("Rome."), reply("Milan, I believe.")]
    record = {"input": {"messages": PROMPT}, "preferred_output": [replies[0]], "non_preferred_output": [replies[1]]}
    pair = render_pair(record, tok)
    assert_renders_as_the_template(tok, pair, PROMPT, replies)
    # every form of the same pair gives the same tokens
    assert render_pair(to_trl(record), tok) == pair
    assert render_pair({"chosen": [*PROMPT, replies[0]], "rejected": [*PROMPT, replies[1]]}, tok) == pair


@pytest.mark.parametrize("name", ["qwen2.5-instruct", "hermes-tools", "llama-3.1-tools-json"])
def test_tool_call_sides_render_with_tool_templates(tokenizer_with_template, name):
    tok = tokenizer_with_template(name)
    prompt = [user("What is the weather in Paris?")]
    record = {"input": {"messages": prompt, "tools": TOOLS}, "preferred_output": [reply(tool_calls=[call()])],
              "non_preferred_output": [reply("It is always sunny in Paris.")]}
    pair = render_pair(record, tok)
    parsed_call = {**call(), "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert_renders_as_the_template(tok, pair, prompt, [{"role": "assistant", "content": "",
                                                        "tool_calls": [parsed_call]},
                                                       reply("It is always sunny in Paris.")], tools=TOOLS)
    assert "get_weather" in tok.decode(pair.chosen) and "Paris" in tok.decode(pair.chosen)


def test_a_template_that_cannot_render_a_side_is_refused_by_field(chat_tokenizer):
    record = {"input": {"messages": [user("Weather in Paris?")], "tools": TOOLS},
              "preferred_output": [reply(tool_calls=[call()])], "non_preferred_output": [reply("Sunny.")]}
    with pytest.raises(TemplateError) as info:
        render_pair(record, chat_tokenizer)  # plain ChatML writes no tool calls
    problem = info.value.problems[0]
    assert problem.where == "preferred_output[0].tool_calls[0]" and "get_weather" in problem.message
    assert problem.hint and "weight" not in problem.hint


def test_text_pairs_render_as_prompt_completion(chat_tokenizer):
    pair = render_pair({"prompt": "Q: capital of France? A:", "chosen": " Paris", "rejected": " Lyon"}, chat_tokenizer)
    for side, text in ((pair.chosen, " Paris"), (pair.rejected, " Lyon")):
        [seq] = render_example({"prompt": "Q: capital of France? A:", "completion": text}, chat_tokenizer)
        assert pair.prompt + side == seq.input_ids
        assert side[-1] == chat_tokenizer.eos_token_id


def test_pair_sequences_train_only_the_replies(chat_tokenizer):
    pair = render_pair(openai(), chat_tokenizer)
    chosen, rejected = pair_sequences(pair)
    for seq, side in ((chosen, pair.chosen), (rejected, pair.rejected)):
        assert seq.input_ids == pair.prompt + side
        assert seq.labels == [IGNORE] * len(pair.prompt) + side and seq.num_trained == len(side)
    assert (chosen.source["side"], rejected.source["side"]) == ("chosen", "rejected")


def test_fit_pair_never_cuts_a_reply():
    pair = PreferencePair(prompt=[1] * 10, chosen=[2] * 4, rejected=[3] * 6)
    assert fit_pair(pair, 16, "drop") == (pair, "fits")
    assert fit_pair(pair, 15, "drop") == (None, "dropped")
    cut, fate = fit_pair(pair, 12, "truncate")
    assert fate == "prompt_cut" and cut is not None and cut.prompt == [1] * 6 and cut.longest == 12
    assert (cut.chosen, cut.rejected) == (pair.chosen, pair.rejected)
    assert fit_pair(pair, 6, "truncate") == (None, "completion_cut")  # a reply needs a prompt token before it


def test_render_example_refuses_a_pair_clearly(chat_tokenizer):
    with pytest.raises(DataError) as info:
        render_example(openai(), chat_tokenizer)
    assert "preference pair" in str(info.value) and "render_pair" in str(info.value)


# --------------------------------------------------------------------------------------------------
# Check statistics


def test_check_statistics_on_a_small_file(tmp_path, chat_tokenizer):
    records = [openai(i, chosen="Paris " * (i + 1), rejected="Lyon.") for i in range(3)]
    records.append(openai(3, chosen="Paris.", rejected="Paris .\n"))  # whitespace only: a warning
    path = write(tmp_path, records)
    pairs = [render_pair(r, chat_tokenizer) for r in records]
    longest = sorted(p.longest for p in pairs)
    max_len = longest[1]  # two pairs fit, two are longer

    report = check_file(path, tokenizer=chat_tokenizer, max_len=max_len)
    assert report.ok and report.format == "preference" and report.stats is None
    s = report.preference
    assert s.pairs == 4 and s.unit == "tokens" and s.forms == {"openai": 4} and s.epochs == 25
    assert s.prompt.total == sum(len(p.prompt) for p in pairs)
    assert (s.chosen.min, s.chosen.max) == (min(len(p.chosen) for p in pairs), max(len(p.chosen) for p in pairs))
    assert s.rejected.total == sum(len(p.rejected) for p in pairs)
    assert (s.whitespace_only, s.whitespace_only_share) == (1, 0.25)
    assert (s.over_max_len, s.dropped, s.prompt_cut, s.completion_cut) == (2, 2, 0, 0)
    assert {(p.line, p.code) for p in report.problems} == {(4, "preference_whitespace_only"),
                                                           (None, "too_few_examples")}

    # truncate: the prompt's start is cut where the replies fit; a reply that cannot fit is refused, by line
    shortest_reply = min(max(len(p.chosen), len(p.rejected)) for p in pairs)
    report = check_file(path, tokenizer=chat_tokenizer, max_len=shortest_reply + 1, truncation="truncate")
    s = report.preference
    refused = [n for n, p in enumerate(pairs, start=1) if max(len(p.chosen), len(p.rejected)) + 1 > shortest_reply + 1]
    assert s.over_max_len == 4 and s.completion_cut == len(refused) > 0 and s.prompt_cut == 4 - len(refused)
    assert sorted(p.line for p in report.problems if p.code == "preference_completion_cut") == refused
    assert not report.ok and s.pairs == 4 - len(refused)

    data = report.to_dict()
    assert data["preference"]["completion_cut"] == len(refused) and data["stats"] is None
    assert "preference" not in check_file(write(tmp_path, [{"text": "a"}], "sft.jsonl")).to_dict()

    # without a tokenizer: characters
    s = check_file(path).preference
    assert s.unit == "characters" and s.chosen.min == len("Paris ") and s.rejected.max == len("Paris .\n")


def test_check_renders_with_the_template_and_names_the_side(tmp_path, chat_tokenizer):
    bad = {"input": {"messages": [user("Weather?")], "tools": TOOLS}, "preferred_output": [reply(tool_calls=[call()])],
           "non_preferred_output": [reply("Sunny.")]}
    report = check_file(write(tmp_path, [openai(0), bad, openai(1)]), tokenizer=chat_tokenizer)
    [failed] = [p for p in report.problems if p.code == "render_failed"]
    assert (failed.line, failed.path) == (2, "preferred_output[0].tool_calls[0]")
    assert report.examples == 2


def test_check_validation_file_duplicates_and_overlap(tmp_path):
    train = write(tmp_path, [openai(i) for i in range(10)] + [openai(3)], "train.jsonl")
    valid = write(tmp_path, [openai(3), openai(20)], "valid.jsonl")
    report = check_file(train, validation=valid)
    assert report.ok and report.validation_examples == 2
    assert [(p.line, p.code) for p in report.problems] == [(11, "duplicate_example"), (1, "train_valid_overlap")]


def test_check_cli_on_a_preference_file(tmp_path, chat_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short paths: the 80-column output is not wrapped by them
    chat_tokenizer.save_pretrained(tmp_path / "tok")
    path = write(tmp_path, [openai(i) for i in range(10)] + [openai(10, chosen="Paris.", rejected="Paris. ")])
    result = CliRunner().invoke(app, ["data", "check", path.name, "--model", "tok", "--max-len", "20"],
                                env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "11 lines, 11 valid pairs" in out and "11 pairs (openai 11), lengths in tokens" in out
    assert "pairs whose replies differ only in whitespace: 1 (9.1%)" in out
    assert "pairs longer than 20 tokens: 11 (dropped: a reply is never cut)" in out
    assert all(len(line) <= 80 for line in out.splitlines())
    as_json = CliRunner().invoke(app, ["data", "check", str(path), "--json", "--format", "preference"])
    assert json.loads(as_json.stdout)["preference"]["pairs"] == 11


def test_load_examples_reads_a_preference_file(tmp_path):
    fmt, examples = load_examples(write(tmp_path, [openai(0), {"prompt": "q", "chosen": "a", "rejected": "b"}]))
    assert fmt == "preference" and [n for n, _ in examples] == [1, 2]


# --------------------------------------------------------------------------------------------------
# Convert


def test_convert_round_trip(tmp_path, chat_tokenizer):
    records = [openai(i) for i in range(3)]
    records.append({"input": {"messages": [user("Weather in Paris?")], "tools": TOOLS, "parallel_tool_calls": False},
                    "preferred_output": [reply(tool_calls=[call()])], "non_preferred_output": [reply("Sunny.")]})
    src = write(tmp_path, records)
    trl, back = tmp_path / "trl.jsonl", tmp_path / "back.jsonl"
    assert convert_file(src, trl, to="trl").written == 4
    converted = [json.loads(line) for line in trl.read_text().splitlines()]
    assert converted[0] == {"prompt": records[0]["input"]["messages"], "chosen": records[0]["preferred_output"],
                            "rejected": records[0]["non_preferred_output"]}
    assert converted[3]["tools"] == TOOLS and converted[3]["parallel_tool_calls"] is False
    assert convert_file(trl, back, to="openai-dpo").written == 4
    assert [json.loads(line) for line in back.read_text().splitlines()] == records
    assert check_file(trl, fmt="preference").errors == check_file(back).errors == 0
    # TRL's implicit and text forms made explicit; text pairs become chat for OpenAI
    implicit = {"chosen": [user("q"), reply("a")], "rejected": [user("q"), reply("b")]}
    assert to_trl(implicit) == {"prompt": [user("q")], "chosen": [reply("a")], "rejected": [reply("b")]}
    assert to_openai_dpo({"prompt": "q", "chosen": "a", "rejected": "b"}) == {
        "input": {"messages": [user("q")]}, "preferred_output": [reply("a")], "non_preferred_output": [reply("b")]}
    assert render_pair(to_openai_dpo(implicit), chat_tokenizer) == render_pair(implicit, chat_tokenizer)


def test_convert_cli_names_bad_pairs_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write(tmp_path, [openai(0), openai(1, chosen="same", rejected="same"), {"messages": [user("q")]}]).name
    dst = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["data", "convert", src, str(dst), "--to", "trl"], env={"COLUMNS": "200"})
    assert result.exit_code == 1 and not dst.exists()
    assert f"{src}:2 non_preferred_output[0]" in result.output and "replies are the same" in result.output
    assert f"{src}:3" in result.output and "2 record(s) cannot be converted" in result.output
    result = CliRunner().invoke(app, ["data", "convert", src, dst.name, "--to", "openai-dpo", "--skip-bad"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "wrote 1 pairs" in result.output and "2 bad records left out" in result.output
    for args, message in ((["--to", "kto"], "unknown preference format"), ([], "say what to convert"),
                          (["--from", "alpaca", "--to", "trl"], "cannot be combined")):
        result = CliRunner().invoke(app, ["data", "convert", src, str(dst), *args], env={"COLUMNS": "200"})
        assert result.exit_code == 1 and message in result.output, args
