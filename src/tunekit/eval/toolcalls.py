"""Tool calls written in generated text, in the formats of the chat templates tunekit knows.

- Hermes / Qwen: `<tool_call>{"name": .., "arguments": {..}}</tool_call>`, one block per call;
- Mistral: `[TOOL_CALLS][{...}, ...]`, or v11 `[TOOL_CALLS]name[ARGS]{...}`;
- Llama 3.1 JSON tools (optionally after `<|python_tag|>`) or any bare `{"name": .., "arguments"/"parameters": ..}`.

Used by `tunekit.eval.metrics` (scoring predicted calls) and `tunekit.serve` (returning `tool_calls`). Nothing here
loads a model: plain strings in, plain values out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_FENCE = re.compile(r"^```[a-zA-Z0-9_-]*\s*\n(.*?)\n?```$", re.DOTALL)
_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
_MISTRAL_V11 = re.compile(r"\s*([A-Za-z0-9_.\-]+)\[ARGS\]")
_MISSING = object()

# Text that starts the tool-call part of a reply (the bare-JSON form starts with "{" or "[").
MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Any  # parsed JSON value (usually a dict); the raw string when it does not parse


def strip_fence(text: str) -> str:
    """The text inside a single Markdown code fence around it (```json ... ```), else the text stripped."""
    text = text.strip()
    fenced = _FENCE.match(text)
    return fenced.group(1).strip() if fenced else text


def parse_arguments(arguments: Any) -> Any:
    """OpenAI keeps tool arguments as a JSON string; templates and models often give a dict."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _as_call(obj: Any) -> ToolCall | None:
    """{"name", "arguments"|"parameters"} or OpenAI's {"type": "function", "function": {...}}."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(name, parse_arguments(args))


def _calls_from_value(value: Any) -> list[ToolCall]:
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(item) for item in items]
    return [c for c in calls if c is not None]


def _leading_json(text: str) -> Any:
    """The JSON value at the start of `text` (trailing text ignored), or _MISSING."""
    text = strip_fence(text)
    if not text.startswith(("{", "[")):
        return _MISSING
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except (json.JSONDecodeError, RecursionError):
        return _MISSING
    return value


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Tool calls in a generated text, in the order written; [] when there are none (or none parse)."""
    text = text.replace("<|python_tag|>", "")
    if "<tool_call>" in text:  # Hermes / Qwen: one JSON object per <tool_call> block
        calls = []
        for block in _HERMES.findall(text):
            calls += _calls_from_value(_leading_json(block))
        return calls
    if "[TOOL_CALLS]" in text:  # Mistral: [TOOL_CALLS][{...}, ...]  or v11: [TOOL_CALLS]name[ARGS]{...}
        rest = text.split("[TOOL_CALLS]", 1)[1]
        named = _MISTRAL_V11.match(rest)
        if named:
            calls = []
            for part in rest.split("[TOOL_CALLS]"):
                m = _MISTRAL_V11.match(part)
                if m:
                    args = _leading_json(part[m.end():])
                    calls.append(ToolCall(m.group(1), {} if args is _MISSING else args))
            return calls
        value = _leading_json(rest)
        return [] if value is _MISSING else _calls_from_value(value)
    value = _leading_json(text)  # Llama 3.1 JSON tools or any bare {"name": .., "arguments": ..}
    return [] if value is _MISSING else _calls_from_value(value)


def tool_call_start(text: str) -> int | None:
    """Where the tool-call part of a reply starts: the first marker, or 0 for a reply that is bare JSON.

    None when the text holds no marker and does not start with JSON. The text before it is the reply's content.
    """
    found = [i for i in (text.find(m) for m in MARKERS) if i >= 0]
    if found:
        return min(found)
    return 0 if text.lstrip().startswith(("{", "[", "```")) else None


def split_reply(text: str) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a generated reply: the text before the calls, and the calls; (text, []) without any."""
    start = tool_call_start(text)
    if start is None:
        return text, []
    calls = parse_tool_calls(text[start:])
    if not calls:
        return text, []
    return text[:start].strip(), calls
