"""Turning generated tokens into reply text: incremental decoding, stop strings, tool calls (no server)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="tunekit serve needs the serve extra: pip install -e '.[serve]'")

from tunekit.generate.engine import Token  # noqa: E402
from tunekit.serve.chat import Reply  # noqa: E402


def feed(reply: Reply, ids: list[int], end: str = "stop") -> list[str]:
    pieces = [reply.add(Token(0, t)) for t in ids]
    return pieces + [reply.end(end)]


def test_multibyte_characters_are_never_split(chat_tokenizer):
    text = "café 日本語 😀🚀 naïve → ok"
    ids = chat_tokenizer.encode(text, add_special_tokens=False)
    single = [chat_tokenizer.decode([t]) for t in ids]
    assert any("\ufffd" in piece for piece in single)  # the tokenizer does split characters over tokens
    pieces = feed(Reply(chat_tokenizer, [], tools=False, allowed=None, parallel=True), ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_stop_strings_cut_and_hold_back(chat_tokenizer):
    text = "the water is hot and the salt is ready"
    ids = chat_tokenizer.encode(text, add_special_tokens=False)
    reply = Reply(chat_tokenizer, ["salt is"], tools=False, allowed=None, parallel=True)
    pieces = feed(reply, ids)
    assert "".join(pieces) == "the water is hot and the " and reply.finish == "stop" and reply.stopped
    assert all("sal" not in piece for piece in pieces)  # the start of the stop string was never released


def test_tool_call_text_is_held_and_parsed(chat_tokenizer):
    text = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    ids = chat_tokenizer.encode(text, add_special_tokens=False)
    reply = Reply(chat_tokenizer, [], tools=True, allowed=None, parallel=True)
    pieces = feed(reply, ids)
    assert "".join(pieces) == "Let me check." and all("<tool" not in piece for piece in pieces)
    assert reply.finish == "tool_calls"
    assert [(c.name, c.arguments) for c in reply.calls] == [("get_weather", {"city": "Paris"})]


def test_text_that_only_looks_like_a_call_is_content(chat_tokenizer):
    text = "{not a call} and more"
    reply = Reply(chat_tokenizer, [], tools=True, allowed=None, parallel=True)
    assert "".join(feed(reply, chat_tokenizer.encode(text, add_special_tokens=False), "length")) == text
    assert reply.calls == [] and reply.finish == "length"
