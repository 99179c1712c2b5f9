import pytest

from tunekit.eval.metrics import (
    Reference,
    ToolCall,
    exact_match,
    json_equal,
    json_valid,
    normalize_text,
    normalized_match,
    parse_tool_calls,
    reference_display,
    reference_of,
    score_example,
    tool_call_match,
    tool_call_name_match,
)


def test_exact_match_ignores_only_surrounding_whitespace():
    assert exact_match("  Paris\n", "Paris") == 1.0
    assert exact_match("paris", "Paris") == 0.0
    assert exact_match("Paris.", "Paris") == 0.0


@pytest.mark.parametrize("pred, ref, expected", [
    ("paris.", "Paris", 1.0),
    ("  The   capital\nis Paris!  ", "the capital is paris", 1.0),
    ("«Paris»", "Paris", 1.0),
    ("Par is", "Paris", 0.0),
    ("Paris, France", "Paris", 0.0),
    ("it's", "its", 0.0),  # punctuation inside the text counts
])
def test_normalized_match(pred, ref, expected):
    assert normalized_match(pred, ref) == expected


def test_normalize_text_keeps_inner_punctuation():
    assert normalize_text(" Hello,  World!! ") == "hello, world"


def test_json_valid_and_equal_ignore_key_order_and_fences():
    ref = '{"a": 1, "b": [1, 2, {"c": null}]}'
    assert json_valid('{"b": [1, 2, {"c": null}], "a": 1}') == 1.0
    assert json_equal('{"b": [1, 2, {"c": null}], "a": 1}', ref) == 1.0
    assert json_equal('```json\n{"a": 1, "b": [1, 2, {"c": null}]}\n```', ref) == 1.0
    assert json_equal('{"a": 1, "b": [2, 1, {"c": null}]}', ref) == 0.0  # list order matters
    assert json_equal('{"a": 1.0, "b": [1, 2, {"c": null}]}', ref) == 1.0  # same number
    assert json_equal('{"a": true, "b": [1, 2, {"c": null}]}', ref) == 0.0  # true is not 1
    assert json_valid('{"a": 1,}') == 0.0
    assert json_equal('{"a": 1', ref) == 0.0
    assert json_valid("Sure! {\"a\": 1}") == 0.0


def test_reference_of_text_parts_and_tool_calls():
    ex = {"messages": [{"role": "user", "content": "hi"},
                       {"role": "assistant", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]},
                       {"role": "user", "content": "weather?"},
                       {"role": "assistant", "content": None, "tool_calls": [
                           {"id": "1", "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "n": 2}'}}]}]}
    ref = reference_of(ex)
    assert ref.is_tool_call and ref.text == ""
    assert ref.tool_calls == (ToolCall("get_weather", {"city": "Paris", "n": 2}),)
    ex["messages"] = ex["messages"][:2]
    assert reference_of(ex) == Reference("hello")
    legacy = {"messages": [{"role": "user", "content": "x"},
                           {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}]}
    assert reference_of(legacy).tool_calls == (ToolCall("f", {}),)
    with pytest.raises(ValueError):
        reference_of({"messages": [{"role": "user", "content": "x"}]})


@pytest.mark.parametrize("text, expected", [
    # Hermes / Qwen, keys in either order, several blocks, missing closing tag at the end
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     [ToolCall("get_weather", {"city": "Paris"})]),
    ('<tool_call>\n{ "arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call> '
     '<tool_call>{"name": "time", "arguments": {}}',
     [ToolCall("get_weather", {"city": "Paris"}), ToolCall("time", {})]),
    # Mistral, list form and v11 name[ARGS] form
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
     [ToolCall("get_weather", {"city": "Paris"})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]time[ARGS]{}',
     [ToolCall("get_weather", {"city": "Paris"}), ToolCall("time", {})]),
    # Llama 3.1 JSON ("parameters"), with the python tag; OpenAI shape with string arguments
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
     [ToolCall("get_weather", {"city": "Paris"})]),
    ('{"type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}',
     [ToolCall("get_weather", {"city": "Paris"})]),
    # Not calls
    ("The weather in Paris is nice.", []),
    ('{"city": "Paris"}', []),
    ("<tool_call>not json</tool_call>", []),
])
def test_parse_tool_calls_formats(text, expected):
    assert parse_tool_calls(text) == expected


def test_tool_call_match_reordered_argument_keys_and_calls():
    ref = [ToolCall("get_weather", {"city": "Paris", "unit": "C", "days": 3}), ToolCall("time", {"tz": "CET"})]
    pred = ('<tool_call>{"name": "time", "arguments": {"tz": "CET"}}</tool_call>'
            '<tool_call>{"arguments": {"days": 3, "unit": "C", "city": "Paris"}, "name": "get_weather"}</tool_call>')
    assert tool_call_match(pred, ref) == 1.0
    wrong_arg = pred.replace('"days": 3', '"days": 4')
    assert tool_call_match(wrong_arg, ref) == 0.0 and tool_call_name_match(wrong_arg, ref) == 1.0
    one_missing = '<tool_call>{"name": "time", "arguments": {"tz": "CET"}}</tool_call>'
    assert tool_call_match(one_missing, ref) == 0.0 and tool_call_name_match(one_missing, ref) == 0.0
    twice = one_missing * 2
    assert tool_call_name_match(twice, [ToolCall("time", {"tz": "CET"})]) == 0.0  # an extra call is wrong


def test_score_example_picks_the_metrics_that_apply():
    assert score_example("Paris", Reference("paris")) == {"exact_match": 0.0, "normalized_match": 1.0}
    scores = score_example('{"b": 2, "a": 1}', Reference('{"a": 1, "b": 2}'))
    assert scores == {"exact_match": 0.0, "normalized_match": 0.0, "json_valid": 1.0, "json_equal": 1.0}
    call = Reference("", (ToolCall("f", {"x": 1}),))
    assert score_example('{"name": "f", "arguments": {"x": 1}}', call) == {"tool_call_name": 1.0,
                                                                          "tool_call_accuracy": 1.0}
    assert reference_display(call) == '{"name": "f", "arguments": {"x": 1}}'
