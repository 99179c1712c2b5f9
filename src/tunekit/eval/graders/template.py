"""`{{ namespace.variable }}` templates of grader fields, and the `sample` namespace they read.

Namespaces: `item` (the data row) and `sample` (the model's output, built by make_sample). Paths: dotted keys
and [integer] indexes, e.g. `{{ item.answer.value }}`, `{{sample.output_tools[0].function.arguments}}`.
Strings render as they are; any other value as compact JSON.
"""

from __future__ import annotations

import json
import re

TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
STEP = re.compile(r"\.([^.\[\]\s]+)|\[\s*(-?\d+)\s*\]")
HEAD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)")
NAMESPACES = ("item", "sample")
SAMPLE_KEYS = ("output_text", "output_json", "output_tools", "choices", "output_audio")


class MissingVariable(Exception):
    """A template names a variable the item or sample does not have."""

    def __init__(self, path: str, *, not_json: bool = False):
        super().__init__(path)
        self.path = path
        self.not_json = not_json  # sample.output_json was needed but the sample is not JSON


def parse_path(expr: str) -> list[str | int]:
    """'item.a[0].b' -> ['item', 'a', 0, 'b']. Raises ValueError when the expression is not a path."""
    expr = expr.strip()
    head = HEAD.match(expr)
    if not head:
        raise ValueError(f"'{{{{{expr}}}}}' is not a variable (expected e.g. {{{{item.answer}}}})")
    steps: list[str | int] = [head.group(1)]
    pos = head.end()
    while pos < len(expr):
        m = STEP.match(expr, pos)
        if not m:
            raise ValueError(f"'{{{{{expr}}}}}' is not a variable path: unexpected {expr[pos:]!r}")
        steps.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    return steps


def template_paths(text: str) -> list[str]:
    """The expressions inside each {{ }} of a template string, as written (stripped)."""
    return [m.group(1).strip() for m in TEMPLATE.finditer(text)]


def lookup(steps: list[str | int], item: dict, sample: dict):
    namespace = steps[0]
    value = {"item": item, "sample": sample}.get(namespace)
    if value is None or namespace not in NAMESPACES:
        raise MissingVariable(str(namespace))
    shown = str(namespace)
    for i, step in enumerate(steps[1:]):
        if namespace == "sample" and i == 1 and steps[1] == "output_json" and value is None:
            raise MissingVariable(shown, not_json=True)
        shown += f"[{step}]" if isinstance(step, int) else f".{step}"
        if isinstance(value, dict) and isinstance(step, str) and step in value:
            value = value[step]
        elif isinstance(value, dict) and isinstance(step, int) and str(step) in value:
            value = value[str(step)]
        elif isinstance(value, list) and isinstance(step, int) and -len(value) <= step < len(value):
            value = value[step]
        elif isinstance(value, list) and isinstance(step, str) and step.lstrip("-").isdigit() \
                and -len(value) <= int(step) < len(value):
            value = value[int(step)]  # {{sample.output_tools.0.function.name}}
        else:
            raise MissingVariable(shown)
    if namespace == "sample" and len(steps) == 2 and steps[1] == "output_json" and value is None:
        raise MissingVariable(shown, not_json=True)
    return value


def to_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def render(text: str, item: dict, sample: dict) -> str:
    """Substitute every {{ }} of `text`. Raises MissingVariable (the first missing one)."""
    return TEMPLATE.sub(lambda m: to_text(lookup(parse_path(m.group(1)), item, sample)), text)


def make_sample(output_text: str, *, tool_calls: list[dict] | None = None, output_json=None,
                json_from_text: bool = True, finish_reason: str | None = None) -> dict:
    """The `sample` namespace of one model output.

    output_json: the text parsed as JSON when json_from_text and it parses (any JSON value), else the given
    value (None when there is none). output_tools: the OpenAI tool_calls list ([] when none).
    """
    parsed = output_json
    if json_from_text:
        try:
            parsed = json.loads(output_text)
        except (ValueError, TypeError):
            parsed = output_json
    calls = list(tool_calls or [])
    reason = finish_reason or ("tool_calls" if calls else "stop")
    message = {"role": "assistant", "content": output_text, "tool_calls": calls or None}
    return {"output_text": output_text, "output_json": parsed, "output_tools": calls,
            "choices": [{"index": 0, "finish_reason": reason, "message": message}]}
