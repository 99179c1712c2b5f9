"""Data formats: stream a JSONL file line by line and validate each record.

Four record formats are accepted (one per file):
  chat        {"messages": [...], "tools"?: [...], "parallel_tool_calls"?: bool, "functions"?: [...]}
              (the OpenAI fine-tuning format, with tool calls, legacy function calls and `weight`)
  completion  {"prompt": str, "completion": str}
  text        {"text": str}
  preference  a prompt and two replies: OpenAI's DPO lines {"input", "preferred_output", "non_preferred_output"}
              or TRL's {"prompt"?, "chosen", "rejected"} (validated and rendered by `tunekit.data.preference`)

Every problem is a `DataIssue` with a stable `code`, the line, a JSON path inside the record
(`messages[2].tool_calls[0].function.arguments`), a message, a hint and a severity:
  error    the example cannot be trained as written (exit code 1 from `tunekit data check`)
  warning  probably a mistake, training can go on
  info     accepted, reported so it is not a surprise (e.g. a UTF-8 BOM)

Reasoning: an assistant message may carry its reasoning as `reasoning_content` (a string: the field vLLM,
DeepSeek and the openai SDK's users read and write) or as a `<think>...</think>` block that starts its content,
not both. Whether the model's chat template trains it is decided by `render` (a template that drops it is
refused there).

Tool calls left without a tool response (`tool_call_unanswered`): when the assistant message that makes
the call is the last message of the example, the example teaches the call itself and the response is
simply not part of it (a common shape for function-calling data) -> info. When other messages follow and
none answers the call, the conversation is inconsistent (the OpenAI API rejects it, tool-aware chat
templates render it wrongly) -> error.

Nothing here keeps examples in memory: `read_jsonl` yields one parsed line at a time.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunekit.errors import DataError, Problem

Severity = Literal["error", "warning", "info"]
Format = Literal["chat", "completion", "text", "preference"]

CHAT_ROLES = ("system", "user", "assistant", "tool", "function")  # "function": legacy function result
MESSAGE_KEYS = ("role", "content", "name", "function_call", "tool_calls", "tool_call_id", "weight",
                "reasoning_content")
TOP_KEYS: dict[str, tuple[str, ...]] = {
    "chat": ("messages", "tools", "parallel_tool_calls", "functions"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
# Keys that make a record a preference pair (checked before "prompt" / "messages": TRL's pairs have a "prompt").
PREFERENCE_KEYS = ("preferred_output", "non_preferred_output", "preferred_completion", "non_preferred_completion",
                   "chosen", "rejected")
SHAPES_HINT = ('each line needs {"messages": [...]} (chat), {"prompt": ..., "completion": ...} '
               'or {"text": ...}')


@dataclass(frozen=True)
class DataIssue:
    code: str  # stable identifier, e.g. "tool_arguments_not_json"
    path: str  # JSON path inside the record, "" for the whole record / line
    message: str
    hint: str
    severity: Severity = "error"
    line: int | None = None  # 1-based; None for a file-level issue (e.g. too_few_examples)
    file: str | None = None
    column: int | None = None  # 1-based, for invalid_json / invalid_utf8

    @property
    def where(self) -> str:
        place = self.file or ""
        if self.line is not None:
            place = f"{place}:{self.line}"
        if self.column is not None:
            place = f"{place}:{self.column}"
        return f"{place} {self.path}".strip()

    def to_problem(self) -> Problem:
        return Problem(self.where, f"[{self.code}] {self.message}", self.hint)

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "column": self.column, "path": self.path,
                "code": self.code, "severity": self.severity, "message": self.message, "hint": self.hint}


@dataclass
class Line:
    """One line of a JSONL file: the parsed record (None when unreadable or empty) and its issues."""

    number: int
    record: Any | None
    issues: list[DataIssue] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Reading


# Bounds on what one line may cost. A line longer than MAX_LINE_BYTES is reported (`line_too_long`)
# and skipped without being held in memory; JSON nested deeper than MAX_DEPTH is reported (`too_deep`).
# A chat example of a 128k-token context is well under 1 MiB; tool schemas nest a few levels.
MAX_LINE_BYTES = 16 * 2**20
MAX_DEPTH = 64
# Messages per chat example: masking renders each assistant turn's prefix, so cost grows with the square
# of the turns; longer conversations are reported instead of rendered for hours.
MAX_MESSAGES = 1024
# Problems kept per record (a hostile line could otherwise name millions of unknown keys).
MAX_ISSUES_PER_RECORD = 100
_LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape: maybe unpaired


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _shape_issue(record: Any, check_depth: bool, check_surrogates: bool) -> DataIssue | None:
    """Nesting deeper than MAX_DEPTH, or a string holding an unpaired surrogate (not encodable as UTF-8).

    Iterative (no recursion), and only run when a cheap byte count says the line could have either.
    """
    stack = [(record, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            items = list(value.keys()) + list(value.values())
        elif isinstance(value, list):
            items = value
        elif isinstance(value, str) and check_surrogates:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return DataIssue("invalid_unicode", "", f"a string holds an unpaired surrogate "
                                 f"(\\u{ord(value[exc.start]):04x}), which is not text",
                                 "escape characters outside the BMP as a surrogate pair, or write them as UTF-8")
            continue
        else:
            continue
        if check_depth and depth > MAX_DEPTH:
            return DataIssue("too_deep", "", f"JSON nested more than {MAX_DEPTH} levels deep",
                             "chat examples nest a few levels; flatten the record")
        stack.extend((item, depth + 1) for item in items)
    return None


def _parse_line(number: int, raw: bytes) -> Line:
    issues: list[DataIssue] = []
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
        issues.append(DataIssue("bom", "", "the file starts with a UTF-8 byte order mark", "accepted as is",
                                "info", number))
    raw = raw.rstrip(b"\r\n")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        issues.append(DataIssue("invalid_utf8", "", f"invalid UTF-8 at byte {exc.start + 1}: {exc.reason}",
                                "save the file as UTF-8", "error", number, column=exc.start + 1))
        return Line(number, None, issues)
    if not text.strip():
        issues.append(DataIssue("empty_line", "", "empty line", "remove blank lines (they are skipped)",
                                "warning", number))
        return Line(number, None, issues)
    try:
        record = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        issues.append(DataIssue("invalid_json", "", f"not valid JSON: {exc.msg} (column {exc.colno})",
                                "each line must hold one complete JSON object", "error", number,
                                column=exc.colno))
        return Line(number, None, issues)
    except RecursionError:
        issues.append(DataIssue("too_deep", "", "JSON nested too deeply to read",
                                "chat examples nest a few levels; flatten the record", "error", number))
        return Line(number, None, issues)
    except MemoryError:
        issues.append(DataIssue("line_too_long", "", "not enough memory to read this line",
                                "split the example or shorten it", "error", number))
        return Line(number, None, issues)
    except ValueError as exc:  # NaN / Infinity, or an integer of thousands of digits
        if "digits" in str(exc):
            issues.append(DataIssue("number_too_large", "", "a number has too many digits to read",
                                    "write it with fewer digits, or as a string", "error", number))
        else:
            issues.append(DataIssue("invalid_json", "", f"not valid JSON: {exc}",
                                    "use null or a number instead", "error", number))
        return Line(number, None, issues)
    deep = raw.count(b"[") + raw.count(b"{") > MAX_DEPTH
    surrogates = _LONE_SURROGATE.search(raw) is not None
    if deep or surrogates:
        issue = _shape_issue(record, deep, surrogates)
        if issue is not None:
            issues.append(DataIssue(issue.code, "", issue.message, issue.hint, "error", number))
            return Line(number, None, issues)
    return Line(number, record, issues)


def check_readable(path: str | Path) -> Path:
    """Raise a DataError (not a traceback) for a missing file or a directory."""
    path = Path(path)
    if path.is_dir():
        raise DataError(Problem(str(path), "is a directory, not a JSONL file", "give the path of a .jsonl file"))
    if not path.is_file():
        raise DataError(Problem(str(path), "file not found", "check the path"))
    return path


def read_jsonl(path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Line]:
    """Yield every line of a JSONL file, parsed, one at a time (memory does not grow with the file).

    Read in binary and decoded per line, so invalid UTF-8 is reported on its own line and the rest of
    the file is still read. A line of more than `max_line_bytes` is reported as `line_too_long` and
    skipped without being held in memory. Issues carry the line number but not the file name.
    """
    path = check_readable(path)
    with path.open("rb") as f:
        number = 0
        while raw := f.readline(max_line_bytes + 1):
            number += 1
            if len(raw) > max_line_bytes and not (len(raw) == max_line_bytes + 1 and raw.endswith(b"\n")):
                size = len(raw)
                while not raw.endswith(b"\n") and (raw := f.readline(2**20)):  # skip the rest, 1 MiB at a time
                    size += len(raw)
                yield Line(number, None, [DataIssue(
                    "line_too_long", "", f"the line is {size:,} bytes, over the limit of {max_line_bytes:,}",
                    "split or shorten the example, or raise the limit (--max-line-bytes)", "error", number)])
                continue
            yield _parse_line(number, raw)


def record_digest(record: Any) -> int:
    """8-byte blake2b digest of a record's content (key order and whitespace do not matter), as an int."""
    canonical = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest(), "little")


def detect_format(record: Any) -> Format | None:
    """The format a record is written in, from its keys; None when it matches none."""
    if not isinstance(record, dict):
        return None
    if any(key in record for key in PREFERENCE_KEYS):
        return "preference"
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    return None


# The reinforcement format (objective: grpo): OpenAI's, a chat whose messages end with the turn the model
# answers (user or developer); any other top-level key is a field the grader reads as {{item.field}}.
PROMPT_ROLES = ("user", "developer")


def reinforcement_problem(record: Any) -> str | None:
    """Why `record` is not a reinforcement prompt (None when it is). `detect_format` still calls it chat:
    SFT reads such files as it always did; objective: grpo reads them with this rule."""
    if not isinstance(record, dict) or any(key in record for key in PREFERENCE_KEYS):
        return "not a chat record"
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    last = messages[-1]
    role = last.get("role") if isinstance(last, dict) else None
    if role not in PROMPT_ROLES:
        return f"the last message is {role!r}: a prompt ends with the turn the model answers (user or developer)"
    return None



# --------------------------------------------------------------------------------------------------
# Validation


def validate_record(record: Any, fmt: Format = "chat") -> list[DataIssue]:
    """All problems of one record read as `fmt` (issues carry no line; the caller adds it)."""
    if fmt == "preference":
        from tunekit.data.preference import validate_preference  # it builds on this module's chat rules

        return validate_preference(record)
    if not isinstance(record, dict):
        return [DataIssue("data_type", "", f"each line must be a JSON object, got {type(record).__name__}",
                          SHAPES_HINT)]
    issues = [DataIssue("unrecognized_key", key, f"unknown top-level key '{key}' (ignored)",
                        f"known keys for {fmt}: {', '.join(TOP_KEYS[fmt])}", "warning")
              for key in record if key not in TOP_KEYS[fmt]]
    if fmt == "chat":
        issues += _validate_chat(record)
    elif fmt == "completion":
        issues += _validate_strings(record, ("prompt", "completion"))
        if isinstance(record.get("completion"), str) and not record["completion"]:
            issues.append(DataIssue("no_trained_tokens", "completion", "the completion is empty",
                                    "the completion is what is trained; give it text"))
    else:
        issues += _validate_strings(record, ("text",))
        if isinstance(record.get("text"), str) and not record["text"].strip():
            issues.append(DataIssue("missing_content", "text", "the text is empty", "give it text or drop the line"))
    return issues


def _validate_strings(record: dict, keys: tuple[str, ...]) -> list[DataIssue]:
    issues = []
    for key in keys:
        if key not in record:
            issues.append(DataIssue("missing_key", key, f"missing key '{key}'", SHAPES_HINT))
        elif not isinstance(record[key], str):
            issues.append(DataIssue("data_type", key, f"'{key}' must be a string, got {type(record[key]).__name__}",
                                    "write it as a JSON string"))
    return issues


def _json_object_problem(arguments: Any) -> str | None:
    """Why tool-call arguments are not a JSON-object string, or None when they are."""
    if not isinstance(arguments, str):
        return f"arguments must be a JSON string, got {type(arguments).__name__}"
    try:
        value = json.loads(arguments)
    except ValueError as exc:
        return f"arguments are not valid JSON: {exc}"
    if not isinstance(value, dict):
        return f"arguments must encode a JSON object, got {type(value).__name__}"
    return None


def _declared_names(record: dict, issues: list[DataIssue]) -> set[str] | None:
    """Function names declared in `tools` / `functions`; None when neither is given."""
    names: set[str] | None = None
    tools = record.get("tools")
    if tools is not None:
        names = set()
        if not isinstance(tools, list):
            issues.append(DataIssue("data_type", "tools", "'tools' must be a list",
                                    'e.g. [{"type": "function", "function": {"name": ..., "parameters": {...}}}]'))
        else:
            for k, tool in enumerate(tools):
                fn = tool.get("function") if isinstance(tool, dict) else None
                if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(fn, dict)
                        and isinstance(fn.get("name"), str)):
                    issues.append(DataIssue("invalid_tool", f"tools[{k}]", "a tool must look like "
                                            '{"type": "function", "function": {"name": ...}}',
                                            "give the type and the function's name"))
                    continue
                names.add(fn["name"])
    functions = record.get("functions")
    if functions is not None:
        names = names if names is not None else set()
        if not isinstance(functions, list):
            issues.append(DataIssue("data_type", "functions", "'functions' must be a list",
                                    'e.g. [{"name": ..., "parameters": {...}}]'))
        else:
            for k, fn in enumerate(functions):
                if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
                    issues.append(DataIssue("invalid_tool", f"functions[{k}]", "a function needs a 'name'",
                                            'e.g. {"name": "get_weather", "parameters": {...}}'))
                    continue
                names.add(fn["name"])
    if "parallel_tool_calls" in record and not isinstance(record["parallel_tool_calls"], bool):
        issues.append(DataIssue("data_type", "parallel_tool_calls", "'parallel_tool_calls' must be true or false",
                                "write true or false"))
    return names


def _validate_content(msg: dict, at: str, role: str, has_call: bool) -> list[DataIssue]:
    if "content" not in msg:
        if has_call:
            return []
        return [DataIssue("message_missing_key", f"{at}.content", "message has no 'content'",
                          'add "content": "..."')]
    content = msg["content"]
    if isinstance(content, list):
        issues = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                issues.append(DataIssue("invalid_content_part", f"{at}.content[{j}]",
                                        'a content part must be {"type": "text", "text": "..."}',
                                        "only text parts are supported"))
        texts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if not issues and not has_call and not "".join(texts):
            issues.append(DataIssue("missing_content", f"{at}.content", f"{role} message has no text",
                                    "give the message text or drop it"))
        return issues
    if content is None or content == "":
        if has_call:
            return []
        return [DataIssue("missing_content", f"{at}.content", f"{role} message has empty content",
                          "give the message text or drop it")]
    if not isinstance(content, str):
        return [DataIssue("data_type", f"{at}.content",
                          f"content must be a string or a list of text parts, got {type(content).__name__}",
                          "write it as a JSON string")]
    return []


def _validate_reasoning(msg: dict, at: str, role: str) -> list[DataIssue]:
    reasoning = msg["reasoning_content"]
    if role != "assistant":
        return [DataIssue("reasoning_not_on_assistant", f"{at}.reasoning_content", f"'reasoning_content' on a "
                          f"{role} message", "only assistant messages carry reasoning; move it to the reply it led to")]
    if not isinstance(reasoning, str):
        return [DataIssue("data_type", f"{at}.reasoning_content",
                          f"'reasoning_content' must be a string, got {type(reasoning).__name__}",
                          "write the reasoning as one JSON string (or drop the key)")]
    content = msg.get("content")
    if reasoning and isinstance(content, str) and "</think>" in content:
        return [DataIssue("reasoning_given_twice", f"{at}.reasoning_content", "the message has a "
                          "'reasoning_content' and a <think>...</think> block in its content; templates would "
                          "write both", "keep one: the reasoning_content field, or the think block at the start of "
                          "the content")]
    return []


def _validate_chat(record: dict) -> list[DataIssue]:
    issues: list[DataIssue] = []
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return [DataIssue("missing_messages_list", "messages", "'messages' must be a non-empty list",
                          'e.g. {"messages": [{"role": "user", "content": "..."}, '
                          '{"role": "assistant", "content": "..."}]}')]
    if len(messages) > MAX_MESSAGES:
        return [DataIssue("too_many_messages", "messages", f"{len(messages):,} messages in one example "
                          f"(the limit is {MAX_MESSAGES:,})", "split the conversation into several examples")]
    declared = _declared_names(record, issues)
    # Calls made so far: id -> (message index, path of the call); answered ids are removed.
    open_calls: dict[str, tuple[int, str]] = {}
    seen_ids: set[str] = set()
    open_function_call: tuple[int, str] | None = None  # legacy function_call awaiting a function message
    weights: list[Any] = []
    last = len(messages) - 1
    for i, msg in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(msg, dict):
            issues.append(DataIssue("data_type", at, f"a message must be an object, got {type(msg).__name__}",
                                    '{"role": ..., "content": ...}'))
            continue
        for key in msg:
            if key not in MESSAGE_KEYS:
                issues.append(DataIssue("message_unrecognized_key", f"{at}.{key}", f"unknown message key '{key}'",
                                        f"known keys: {', '.join(MESSAGE_KEYS)}"))
        if "role" not in msg:
            issues.append(DataIssue("message_missing_key", f"{at}.role", "message has no 'role'",
                                    f"add a role, one of {', '.join(CHAT_ROLES)}"))
            continue
        role = msg["role"]
        if role not in CHAT_ROLES:
            issues.append(DataIssue("unrecognized_role", f"{at}.role", f"unknown role {role!r}",
                                    f"use one of {', '.join(CHAT_ROLES)}"))
            continue
        has_call = role == "assistant" and (bool(msg.get("tool_calls")) or msg.get("function_call") is not None)
        issues += _validate_content(msg, at, role, has_call)
        if "name" in msg and not isinstance(msg["name"], str):
            issues.append(DataIssue("data_type", f"{at}.name", "'name' must be a string", "write it as a string"))

        if "weight" in msg:
            w = msg["weight"]
            if role != "assistant":
                issues.append(DataIssue("weight_not_on_assistant", f"{at}.weight",
                                        f"'weight' on a {role} message", "only assistant messages take a weight"))
            elif isinstance(w, bool) or not isinstance(w, int | float) or w not in (0, 1):
                issues.append(DataIssue("invalid_weight", f"{at}.weight", f"weight must be 0 or 1, got {w!r}",
                                        "1 trains this message, 0 skips it"))
        if role == "assistant":
            weights.append(msg.get("weight", 1))
        if msg.get("reasoning_content") is not None:
            issues += _validate_reasoning(msg, at, role)

        if "tool_calls" in msg and msg["tool_calls"] is not None:
            calls = msg["tool_calls"]
            if role != "assistant":
                issues.append(DataIssue("invalid_tool_call", f"{at}.tool_calls", f"tool_calls on a {role} message",
                                        "only assistant messages make tool calls"))
            elif not isinstance(calls, list) or not calls:
                issues.append(DataIssue("invalid_tool_call", f"{at}.tool_calls", "'tool_calls' must be a non-empty list",
                                        'e.g. [{"id": "call_1", "type": "function", "function": {...}}]'))
            else:
                for j, call in enumerate(calls):
                    issues += _validate_call(call, f"{at}.tool_calls[{j}]", i, declared, open_calls, seen_ids)
        if "function_call" in msg and msg["function_call"] is not None:
            cp = f"{at}.function_call"
            call = msg["function_call"]
            if role != "assistant":
                issues.append(DataIssue("invalid_tool_call", cp, f"function_call on a {role} message",
                                        "only assistant messages make function calls"))
            elif not (isinstance(call, dict) and isinstance(call.get("name"), str)):
                issues.append(DataIssue("invalid_tool_call", cp, "function_call needs a 'name' and 'arguments'",
                                        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}'))
            else:
                issues += _call_issues(call, cp, declared)
                open_function_call = (i, cp)

        if role == "tool":
            call_id = msg.get("tool_call_id")
            if call_id is None:
                issues.append(DataIssue("message_missing_key", f"{at}.tool_call_id", "tool message has no 'tool_call_id'",
                                        "set it to the id of the assistant tool call it answers"))
            elif not isinstance(call_id, str):
                issues.append(DataIssue("data_type", f"{at}.tool_call_id",
                                        f"'tool_call_id' must be a string, got {type(call_id).__name__}",
                                        "set it to the id of the assistant tool call it answers"))
            elif call_id in open_calls:
                del open_calls[call_id]
            else:
                again = call_id in seen_ids
                issues.append(DataIssue(
                    "tool_call_id_unmatched", f"{at}.tool_call_id",
                    f"tool_call_id {call_id!r} " + ("was already answered" if again else "matches no earlier tool call"),
                    "each tool message answers one earlier assistant tool call, by its id"))
        if role == "function":
            if not isinstance(msg.get("name"), str):
                issues.append(DataIssue("message_missing_key", f"{at}.name", "function message has no 'name'",
                                        "set it to the name of the function that returned this result"))
            open_function_call = None

    for call_id, (i, cp) in open_calls.items():
        at_end = i == last
        issues.append(DataIssue(
            "tool_call_unanswered", f"{cp}.id",
            f"tool call {call_id!r} has no tool response" + (" (it ends the example)" if at_end else ""),
            "fine when the example teaches the call itself" if at_end
            else "add a tool message with this tool_call_id after the call",
            "info" if at_end else "error"))
    if open_function_call is not None and open_function_call[0] != last:
        issues.append(DataIssue("tool_call_unanswered", open_function_call[1],
                                "function call has no function response", "add a function message after the call"))
    roles = {m["role"] for m in messages if isinstance(m, dict) and isinstance(m.get("role"), str)}
    if weights and "user" not in roles:
        issues.append(DataIssue("no_user_message", "messages", "no user message: the model learns to answer "
                                "without being asked", "add the user's turn before the assistant's", "warning"))
    if not weights:
        issues.append(DataIssue("example_missing_assistant_message", "messages", "no assistant message",
                                "add at least one assistant message: it is what the model learns"))
    elif all(isinstance(w, int | float) and not isinstance(w, bool) and w == 0 for w in weights):
        issues.append(DataIssue("no_trained_tokens", "messages", "every assistant message has weight 0",
                                "set weight 1 (or drop the key) on at least one assistant message"))
    return issues


def _not_declared(name: str, path: str, declared: set[str]) -> DataIssue:
    known = ", ".join(sorted(declared)) or "none"
    return DataIssue("tool_not_declared", path, f"calls {name!r}, which is not declared in tools/functions",
                     f"declared: {known}; add it to 'tools' or fix the name")


def _validate_call(call: Any, cp: str, i: int, declared: set[str] | None,
                   open_calls: dict[str, tuple[int, str]], seen_ids: set[str]) -> list[DataIssue]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not (isinstance(call, dict) and isinstance(fn, dict) and isinstance(fn.get("name"), str)):
        return [DataIssue("invalid_tool_call", cp, "a tool call must look like "
                          '{"id": ..., "type": "function", "function": {"name": ..., "arguments": "..."}}',
                          "give the id, the type and the function's name and arguments")]
    issues = []
    call_id = call.get("id")
    if not isinstance(call_id, str) or not call_id:
        issues.append(DataIssue("invalid_tool_call", f"{cp}.id", "a tool call needs a string 'id'",
                                "give each call an id; the tool message answering it repeats it"))
    elif call_id in seen_ids:
        issues.append(DataIssue("invalid_tool_call", f"{cp}.id", f"tool call id {call_id!r} is used twice",
                                "give each call of an example its own id"))
    else:
        seen_ids.add(call_id)
        open_calls[call_id] = (i, cp)
    if call.get("type", "function") != "function":
        issues.append(DataIssue("invalid_tool_call", f"{cp}.type", f"type {call.get('type')!r} is not supported",
                                'use "type": "function"'))
    return issues + _call_issues(fn, f"{cp}.function", declared)


def _call_issues(fn: dict, path: str, declared) -> list[DataIssue]:
    """A function call's {"name", "arguments"}: arguments must be a JSON object, the name a declared tool."""
    issues = []
    why = _json_object_problem(fn.get("arguments"))
    if why:
        issues.append(DataIssue("tool_arguments_not_json", f"{path}.arguments", why,
                                "encode the arguments object with json.dumps"))
    if declared is not None and fn["name"] not in declared:
        issues.append(_not_declared(fn["name"], f"{path}.name", declared))
    return issues


def validate_in_file(record: Any, file_fmt: Format | None) -> tuple[Format, list[DataIssue]]:
    """Validate a record of a file whose format is `file_fmt` (None: not known yet).

    Returns the format the record was read as and its issues. A record of another recognisable format
    gets `format_mismatch`; a record of no recognisable format is read as the file's format (chat when
    unknown), so its missing keys are named.
    """
    detected = detect_format(record)
    if file_fmt is not None and detected is not None and detected != file_fmt:
        return detected, [DataIssue("format_mismatch", "", f"a {detected} record in a {file_fmt} file",
                                    f"write every line as {file_fmt}, or split the file")]
    use = file_fmt or detected or "chat"
    issues = validate_record(record, use)
    if len(issues) > MAX_ISSUES_PER_RECORD:
        more = len(issues) - MAX_ISSUES_PER_RECORD
        issues = issues[:MAX_ISSUES_PER_RECORD] + [DataIssue(
            "more_problems", "", f"{more:,} more problems in this record are not listed",
            "fix the ones listed first", "error" if any(i.severity == "error" for i in issues) else "warning")]
    return use, issues


# --------------------------------------------------------------------------------------------------
# Loading for training


def load_examples(path: str | Path, fmt: Literal["auto", "chat", "completion", "text", "preference"] = "auto"
                  ) -> tuple[Format, list[tuple[int, dict]]]:
    """Read and validate a whole file for training: (format, [(line, record)]).

    Raises a DataError listing every error (warnings do not stop it). Use `check.check_file` to see
    warnings and statistics; this is the strict, in-memory path for files that fit in memory.
    """
    errors: list[Problem] = []
    examples: list[tuple[int, dict]] = []
    file_fmt: Format | None = None if fmt == "auto" else fmt
    for line in read_jsonl(path):
        problems = [i for i in line.issues if i.severity == "error"]
        if line.record is not None:
            use, issues = validate_in_file(line.record, file_fmt)
            problems += [i for i in issues if i.severity == "error"]
            if not problems:
                file_fmt = file_fmt or use
                examples.append((line.number, line.record))
        errors += [Problem(f"{path}:{line.number} {p.path}".strip(), f"[{p.code}] {p.message}", p.hint)
                   for p in problems]
    if not examples and not errors:
        errors.append(Problem(str(path), "no examples in the file", "add one JSON object per line"))
    if errors:
        raise DataError(errors, title=f"{path}: {len(errors)} data error(s); run `tunekit data check {path}`")
    assert file_fmt is not None
    return file_fmt, examples
