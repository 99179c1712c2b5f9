"""Pure scoring functions: a generated text against the reference assistant message.

Nothing here loads a model. Every function takes plain strings / dicts and returns plain values, so the
rules are testable on hand-made cases:

- exact match: the texts are equal after stripping leading/trailing whitespace.
- normalised match: equal after lower-casing, collapsing runs of whitespace and stripping punctuation at
  both ends ("Paris." == " paris").
- JSON valid / JSON equal: the prediction parses as JSON (a single ```json fence around it is allowed);
  equal = the parsed values are equal, with object key order ignored and `true` != `1`.
- tool calls: parsed from the generated text by `tunekit.eval.toolcalls` (Hermes/Qwen `<tool_call>{...}</tool_call>`,
  Mistral `[TOOL_CALLS][...]`, bare `{"name": .., "arguments"/"parameters": ..}` as Llama 3.1 emits);
  a call matches when the function name is equal and the arguments are equal as parsed JSON.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any

from tunekit.eval.toolcalls import ToolCall, parse_arguments, parse_tool_calls, strip_fence

# --------------------------------------------------------------------------------------------------
# Reference: what the last assistant message of an example says


@dataclass(frozen=True)
class Reference:
    text: str  # the content of the last assistant message ("" when it only calls tools)
    tool_calls: tuple[ToolCall, ...] = ()  # empty when the message calls no tool

    @property
    def is_tool_call(self) -> bool:
        return bool(self.tool_calls)


def message_text(content: Any) -> str:
    """OpenAI content: a string, None, or a list of parts [{"type": "text", "text": ...}]."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


def reference_of(example: dict) -> Reference:
    """The reference answer of a chat example: its last assistant message (content, or its tool calls)."""
    messages = example.get("messages") or []
    last = next((m for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "assistant"), None)
    if last is None:
        raise ValueError("the example has no assistant message")
    calls = []
    for call in last.get("tool_calls") or []:
        fn = call.get("function", call)
        calls.append(ToolCall(str(fn.get("name", "")), parse_arguments(fn.get("arguments", {}))))
    if not calls and isinstance(last.get("function_call"), dict):  # legacy single call
        fn = last["function_call"]
        calls.append(ToolCall(str(fn.get("name", "")), parse_arguments(fn.get("arguments", {}))))
    return Reference(text=message_text(last.get("content")), tool_calls=tuple(calls))


# --------------------------------------------------------------------------------------------------
# Text


_PUNCT = string.punctuation + "“”‘’«»…。，！？"


def normalize_text(text: str) -> str:
    """Lower-case, collapse whitespace, strip punctuation (and whitespace) at both ends."""
    text = " ".join(text.lower().split())
    return text.strip(_PUNCT + " ")


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def normalized_match(prediction: str, reference: str) -> float:
    return float(normalize_text(prediction) == normalize_text(reference))


# --------------------------------------------------------------------------------------------------
# JSON

_MISSING = object()


def parse_json(text: str) -> Any:
    """The JSON value of a text, or `_MISSING` (use `is_json`) when it is not JSON.

    A single Markdown code fence around the value is removed first (```json ... ```).
    """
    try:
        return json.loads(strip_fence(text))
    except (json.JSONDecodeError, RecursionError):
        return _MISSING


def is_json(text: str) -> bool:
    return parse_json(text) is not _MISSING


def json_values_equal(a: Any, b: Any) -> bool:
    """Equality of parsed JSON values: key order ignored; booleans never equal numbers (`true` != `1`)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_values_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_values_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def json_valid(prediction: str) -> float:
    return float(is_json(prediction))


def json_equal(prediction: str, reference: str) -> float:
    pred, ref = parse_json(prediction), parse_json(reference)
    return float(pred is not _MISSING and ref is not _MISSING and json_values_equal(pred, ref))


def reference_is_json(reference: str) -> bool:
    """JSON metrics apply to references that are a JSON object or array (not a bare "3" or "true")."""
    value = parse_json(reference)
    return isinstance(value, dict | list)


# --------------------------------------------------------------------------------------------------
# Tool calls

def _same_calls(pred: list[ToolCall], ref: list[ToolCall], *, with_arguments: bool) -> bool:
    """Multiset equality: every reference call matched by exactly one predicted call (order ignored)."""
    if len(pred) != len(ref):
        return False
    left = list(pred)
    for want in ref:
        for i, got in enumerate(left):
            if got.name == want.name and (not with_arguments or json_values_equal(got.arguments, want.arguments)):
                del left[i]
                break
        else:
            return False
    return True


def tool_call_name_match(prediction: str, reference: list[ToolCall] | tuple[ToolCall, ...]) -> float:
    return float(_same_calls(parse_tool_calls(prediction), list(reference), with_arguments=False))


def tool_call_match(prediction: str, reference: list[ToolCall] | tuple[ToolCall, ...]) -> float:
    return float(_same_calls(parse_tool_calls(prediction), list(reference), with_arguments=True))


# --------------------------------------------------------------------------------------------------
# One example, every metric that applies to it

# Names and labels, in report order. A metric applies to a subset of examples (see `score_example`);
# its value for a candidate is the mean over the examples it applies to.
METRIC_LABELS = {
    "exact_match": "exact match",
    "normalized_match": "normalised match",
    "json_valid": "JSON valid",
    "json_equal": "JSON equal",
    "tool_call_name": "tool-call name",
    "tool_call_accuracy": "tool-call accuracy",
}


def score_example(prediction: str, reference: Reference) -> dict[str, float]:
    """Scores in [0, 1] for the metrics that apply to this reference.

    Text references get exact / normalised match; those that are a JSON object or array also get the
    JSON metrics; tool-call references get the tool-call metrics (their text match would only measure
    how a template prints calls).
    """
    if reference.is_tool_call:
        return {"tool_call_name": tool_call_name_match(prediction, reference.tool_calls),
                "tool_call_accuracy": tool_call_match(prediction, reference.tool_calls)}
    scores = {"exact_match": exact_match(prediction, reference.text),
              "normalized_match": normalized_match(prediction, reference.text)}
    if reference_is_json(reference.text):
        scores["json_valid"] = json_valid(prediction)
        scores["json_equal"] = json_equal(prediction, reference.text)
    return scores


def reference_display(reference: Reference) -> str:
    """The reference as one string for reports: the text, or the calls as JSON."""
    if not reference.is_tool_call:
        return reference.text
    calls = [{"name": c.name, "arguments": c.arguments} for c in reference.tool_calls]
    return json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
