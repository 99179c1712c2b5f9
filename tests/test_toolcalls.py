"""Where a reply's tool calls start and how it splits into content and calls (parsing itself: test_metrics)."""

from tunekit.eval.toolcalls import ToolCall, split_reply, tool_call_start


def test_tool_call_start():
    assert tool_call_start("Sure. <tool_call>{}") == 6
    assert tool_call_start("  {\"name\": \"f\"}") == 0  # bare JSON reply (Llama 3.1 style)
    assert tool_call_start("ok [TOOL_CALLS][{}]") == 3
    assert tool_call_start("plain words") is None


def test_split_reply():
    hermes = 'Checking.\n<tool_call>\n{"name": "w", "arguments": {"c": "P"}}\n</tool_call>'
    assert split_reply(hermes) == ("Checking.", [ToolCall("w", {"c": "P"})])
    mistral = '[TOOL_CALLS][{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]'
    assert split_reply(mistral) == ("", [ToolCall("a", {}), ToolCall("b", {"x": 1})])
    assert split_reply('{"not": "a call"}') == ('{"not": "a call"}', [])  # JSON that is no call stays content
    assert split_reply("no calls here") == ("no calls here", [])
