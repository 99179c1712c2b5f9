"""Convert ShareGPT and Alpaca JSONL files to OpenAI chat JSONL, and preference pairs between OpenAI's and TRL's forms.

ShareGPT  {"conversations": [{"from": "system"|"human"|"gpt"|"function_call"|"observation", "value": str}],
           "system"?: str, "tools"?: JSON string or list of function specs}
          human -> user, gpt -> assistant; a function_call turn (value: JSON {"name", "arguments"} or a list
          of them) becomes an assistant message with tool_calls, and the observation turns after it become
          tool messages answering those calls in order.
Alpaca    {"instruction": str, "input"?: str, "output": str, "system"?: str, "history"?: [[user, assistant]]}
          -> system?, the history turns, user: instruction (+ a blank line + input), assistant: output.

Preference pairs (`tunekit.data.preference`; either form read, detected per line):
  openai-dpo  {"input": {"messages", "tools"?, "parallel_tool_calls"?}, "preferred_output": [reply],
               "non_preferred_output": [reply]}. TRL text pairs become chat: the prompt a user message, each reply
               an assistant message (so they are then rendered with the chat template).
  trl         {"prompt": [messages], "chosen": [reply], "rejected": [reply], "tools"?: [...]} (explicit prompt),
               "parallel_tool_calls" kept only when false; TRL text pairs stay text ({"prompt", "chosen", "rejected"}
               strings), an implicit prompt made explicit.
A reply's `weight` is dropped (preference replies are always trained). openai-dpo -> trl -> openai-dpo gives back
the same pairs.

Files are streamed and written atomically: into a temporary file beside the target, renamed over it
only when every record converted, so a failure leaves no half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tunekit.data.formats import DataIssue, read_jsonl
from tunekit.errors import DataError, Problem

Source = Literal["sharegpt", "alpaca"]
Target = Literal["openai-dpo", "trl"]

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "function_call": "function_call", "observation": "tool",
                  "tool": "tool"}


class ConvertError(ValueError):
    """A record that cannot be converted: `path` inside the record and what is wrong."""

    def __init__(self, path: str, message: str, hint: str):
        super().__init__(message)
        self.path, self.message, self.hint = path, message, hint


def _string(record: dict, key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise ConvertError(key, f"'{key}' must be a string, got {type(value).__name__}",
                           f"give '{key}' as a JSON string")
    return value


def alpaca_to_chat(record: Any) -> dict:
    """One Alpaca record -> {"messages": [...]}."""
    if not isinstance(record, dict):
        raise ConvertError("", "a record must be a JSON object", '{"instruction": ..., "output": ...}')
    instruction = _string(record, "instruction")
    extra = _string(record, "input", required=False)
    output = _string(record, "output")
    messages = []
    system = _string(record, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise ConvertError("history", "'history' must be a list of [user, assistant] pairs", "e.g. [[\"hi\", \"hello\"]]")
    for k, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise ConvertError(f"history[{k}]", "each history item must be [user, assistant] strings",
                               "e.g. [\"hi\", \"hello\"]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages}


def _tools(value: Any) -> list[dict]:
    """ShareGPT `tools` (a JSON string or list of function specs) -> OpenAI `tools`."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except ValueError as exc:
            raise ConvertError("tools", f"'tools' is not valid JSON: {exc}", "give a JSON list of function specs") from None
    if not isinstance(value, list):
        raise ConvertError("tools", "'tools' must be a list of function specs", '[{"name": ..., "parameters": {...}}]')
    tools = []
    for k, spec in enumerate(value):
        if isinstance(spec, dict) and spec.get("type") == "function" and isinstance(spec.get("function"), dict):
            tools.append(spec)  # already OpenAI-shaped
        elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
            tools.append({"type": "function", "function": spec})
        else:
            raise ConvertError(f"tools[{k}]", "a tool spec needs a 'name'", '{"name": ..., "parameters": {...}}')
    return tools


def _calls(value: str, at: str, first_id: int) -> list[dict]:
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise ConvertError(f"{at}.value", f"function_call value is not JSON: {exc}",
                           'write {"name": ..., "arguments": {...}}') from None
    calls = []
    for k, call in enumerate(parsed if isinstance(parsed, list) else [parsed]):
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            raise ConvertError(f"{at}.value", "a function call needs a 'name'", 'write {"name": ..., "arguments": {...}}')
        args = call.get("arguments", {})
        if isinstance(args, str):  # already encoded; must still be JSON
            try:
                json.loads(args)
            except ValueError:
                raise ConvertError(f"{at}.value", "function call arguments are not JSON",
                                   "give arguments as an object") from None
        else:
            args = json.dumps(args, ensure_ascii=False)
        calls.append({"id": f"call_{first_id + k}", "type": "function",
                      "function": {"name": call["name"], "arguments": args}})
    return calls


def sharegpt_to_chat(record: Any) -> dict:
    """One ShareGPT record -> {"messages": [...], "tools"?: [...]}."""
    if not isinstance(record, dict):
        raise ConvertError("", "a record must be a JSON object", '{"conversations": [...]}')
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ConvertError("conversations", "'conversations' must be a non-empty list",
                           '[{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]')
    messages: list[dict] = []
    system = _string(record, "system", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    pending: list[str] = []  # ids of calls not yet answered by an observation, in order
    n_calls = 0
    for i, turn in enumerate(turns):
        at = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise ConvertError(at, "a turn must be an object", '{"from": ..., "value": ...}')
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise ConvertError(f"{at}.from", f"unknown 'from' {turn.get('from')!r}",
                               f"use one of {', '.join(SHAREGPT_ROLES)}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ConvertError(f"{at}.value", "'value' must be a string", "give the turn's text as a string")
        if role == "function_call":
            calls = _calls(value, at, n_calls + 1)
            n_calls += len(calls)
            pending = [c["id"] for c in calls]
            messages.append({"role": "assistant", "content": None, "tool_calls": calls})
        elif role == "tool":
            if not pending:
                raise ConvertError(at, "an observation with no function_call before it",
                                   "put the function_call turn before its observation")
            messages.append({"role": "tool", "tool_call_id": pending.pop(0), "content": value})
        else:
            messages.append({"role": role, "content": value})
    out: dict = {"messages": messages}
    if record.get("tools"):
        out["tools"] = _tools(record["tools"])
    return out


def _reply(message: dict | str, text: bool) -> dict:
    if text:
        return {"role": "assistant", "content": message}
    assert isinstance(message, dict)
    return {k: v for k, v in message.items() if k != "weight"}


def to_openai_dpo(record: Any) -> dict:
    """One preference record (OpenAI's or TRL's form) -> an OpenAI DPO line. DataError for an invalid record."""
    from tunekit.data.preference import read_preference

    pref = read_preference(record)
    prompt = [{"role": "user", "content": pref.prompt}] if isinstance(pref.prompt, str) else list(pref.prompt)
    return {"input": {"messages": prompt, **pref.extras},
            "preferred_output": [_reply(pref.chosen, pref.text)],
            "non_preferred_output": [_reply(pref.rejected, pref.text)]}


def to_trl(record: Any) -> dict:
    """One preference record (OpenAI's or TRL's form) -> a TRL pair with an explicit prompt. DataError for an
    invalid record."""
    from tunekit.data.preference import read_preference

    pref = read_preference(record)
    if pref.text:
        return {"prompt": pref.prompt, "chosen": pref.chosen, "rejected": pref.rejected}
    out: dict = {"prompt": list(pref.prompt), "chosen": [_reply(pref.chosen, False)],
                 "rejected": [_reply(pref.rejected, False)]}
    for key, value in pref.extras.items():
        if key != "parallel_tool_calls" or value is False:  # true is the default: nothing to keep
            out[key] = value
    return out


@dataclass
class ConvertResult:
    written: int
    skipped: list[DataIssue] = field(default_factory=list)  # bad records left out (skip_bad=True)


def convert_file(src: str | Path, dst: str | Path, source: Source | None = None, *, to: Target | None = None,
                 skip_bad: bool = False) -> ConvertResult:
    """Convert a ShareGPT / Alpaca JSONL file (`source`) to chat JSONL, or a preference file (either form) to the
    preference form `to`, at `dst`, atomically.

    Every bad record is reported with its line (a preference record with the codes of `tunekit data check`).
    Without `skip_bad` any bad record raises a DataError and `dst` is left untouched; with it, bad records are
    left out and listed in the result.
    """
    if (source is None) == (to is None):
        raise ValueError("give either source (sharegpt, alpaca) or to (openai-dpo, trl)")
    if to is not None:
        what = "preference pairs"
        convert = to_openai_dpo if to == "openai-dpo" else to_trl
    else:
        what = source
        convert = sharegpt_to_chat if source == "sharegpt" else alpaca_to_chat
    dst = Path(dst)
    if dst.is_dir():
        raise DataError(Problem(str(dst), "is a directory", "give the path of the .jsonl file to write"))
    if not dst.parent.is_dir():
        raise DataError(Problem(str(dst), "its folder does not exist", "create the folder first"))
    bad: list[DataIssue] = []
    written = 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for line in read_jsonl(src):
                bad += [DataIssue(i.code, i.path, i.message, i.hint, i.severity, line.number, str(src), i.column)
                        for i in line.issues if i.severity == "error"]
                if line.record is None:
                    continue
                if to is not None:
                    errors = _preference_errors(line.record)
                    if errors:
                        bad += [DataIssue(i.code, i.path, i.message, i.hint, "error", line.number, str(src))
                                for i in errors]
                        continue
                try:
                    chat = convert(line.record)
                except ConvertError as exc:
                    bad.append(DataIssue(f"invalid_{source}", exc.path, exc.message, exc.hint, "error",
                                         line.number, str(src)))
                    continue
                out.write(json.dumps(chat, ensure_ascii=False) + "\n")
                written += 1
        if bad and not skip_bad:
            raise DataError([i.to_problem() for i in bad[:100]],
                            title=f"{src}: {len({i.line for i in bad})} record(s) cannot be converted from {what}; "
                                  "nothing written")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return ConvertResult(written, bad)


def _preference_errors(record: Any) -> list[DataIssue]:
    """The errors of a record read as a preference pair; a record of another format is one `format_mismatch`."""
    from tunekit.data.formats import detect_format
    from tunekit.data.preference import validate_preference

    found = detect_format(record)
    if found is not None and found != "preference":
        return [DataIssue("format_mismatch", "", f"a {found} record, not a preference pair",
                          "give a file of pairs: OpenAI's DPO lines or TRL's prompt / chosen / rejected")]
    return [i for i in validate_preference(record) if i.severity == "error"]
