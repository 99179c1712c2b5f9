"""Preference data: a prompt and two replies to it, the preferred one and the other (for DPO and its kin).

Two wire forms, told apart per record (`preference_form`):

  openai  {"input": {"messages": [...], "tools"?: [...], "parallel_tool_calls"?: bool},
           "preferred_output": [{"role": "assistant", ...}], "non_preferred_output": [{"role": "assistant", ...}]}
          OpenAI's DPO fine-tuning lines; the older names preferred_completion / non_preferred_completion are read
          too. A reply may make tool calls.
  trl     {"prompt": ..., "chosen": ..., "rejected": ..., "tools"?: [...]}: TRL's preference datasets, either
          conversational (prompt a list of messages, chosen / rejected a list holding one assistant message) or
          text (three strings of raw text, rendered without a chat template like the prompt/completion format).
          Without "prompt" (TRL's implicit prompt), chosen and rejected are whole conversations, or texts, and the
          prompt is what they share at the start: every message but the last, which must be the reply; for
          texts their longest common beginning (TRL's rule: a space just before the first difference goes to
          the replies).

A side is one assistant message, the final reply (its `weight`, if any, is ignored: a side is always trained,
the prompt never). The prompt is validated by the chat format's rules (`formats.validate_record`), with every
problem named by its path in the preference record (`input.messages[1].content`, `preferred_output[0].
tool_calls[0].function.arguments`, `chosen[3]`).

Rendering (`render_pair`): each side is rendered as SFT renders a conversation whose last message, the reply,
is the only one trained (`render.render_example`: the model's own chat template, marker-free masking). The
prompt's tokens are what comes before the reply, the side's tokens exactly what the template writes for it,
end-of-turn token included; the whitespace some templates write after the end of turn (ChatML's newline) is
left out, as it is untrained in SFT and follows the reply. So prompt + side is the template's rendering of the
conversation with that reply, and the prompt is `render.render_prompt` of the prompt messages: what the model
is given at inference. Both sides must come after the same prompt tokens (else a TemplateError). Text pairs
render as prompt/completion examples: bos + the prompt's tokens, then the reply's tokens and eos.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from tunekit.data import formats
from tunekit.data.formats import DataIssue
from tunekit.data.types import IGNORE, Sequence
from tunekit.errors import DataError, Problem, TemplateError, TunekitError

Form = Literal["openai", "trl"]
Fit = Literal["fits", "dropped", "prompt_cut", "completion_cut"]

OPENAI_SIDES = ("preferred_output", "non_preferred_output")
OPENAI_ALIASES = {"preferred_output": "preferred_completion", "non_preferred_output": "non_preferred_completion"}
OPENAI_KEYS = ("input", *OPENAI_SIDES, *OPENAI_ALIASES.values())
INPUT_KEYS = ("messages", "tools", "parallel_tool_calls", "functions")
TRL_SIDES = ("chosen", "rejected")
# parallel_tool_calls: not TRL's, kept when converting an OpenAI line that sets it to false (nothing is lost)
TRL_KEYS = ("prompt", "chosen", "rejected", "tools", "parallel_tool_calls")

_HINT_REPLY = 'a reply is [{"role": "assistant", "content": "..."}] (with "tool_calls" for a call)'
_HINT_SIDE_RENDER = ("use a model whose chat template renders this reply after the prompt (a reply with tool calls "
                     "needs a template that writes them), or leave the pair out")


@dataclass(frozen=True)
class Places:
    """Where the parts of a preference record are, as JSON paths for problems."""

    prompt: str = "prompt"  # the prompt's messages (or text): "input.messages", "prompt", "chosen" (implicit)
    sides: tuple[str, str] = ("chosen", "rejected")  # each reply: "preferred_output[0]", "chosen[0]", "chosen[3]"
    extras: str = ""  # prefix of tools / parallel_tool_calls / functions: "input." or ""

    def of_chat_path(self, path: str, n: int, side: int) -> str:
        """A path of the chat record `prompt + [side]` (n prompt messages) as a path of the preference record."""
        found = re.match(r"messages\[(\d+)\](.*)$", path, re.S)
        if found:
            i = int(found.group(1))
            return (self.sides[side] if i == n else f"{self.prompt}[{i}]") + found.group(2)
        if path == "messages":
            return self.prompt
        if path.split(".")[0].split("[")[0] in ("tools", "functions", "parallel_tool_calls"):
            return self.extras + path
        return path


@dataclass
class Preference:
    """A preference record read into one shape (`read_preference`), whatever its wire form."""

    form: Form
    prompt: list[dict] | str  # the conversation before the replies, or raw text (TRL text pairs)
    chosen: dict | str  # the preferred reply: one assistant message, or text
    rejected: dict | str  # the non-preferred reply
    extras: dict = field(default_factory=dict)  # tools / parallel_tool_calls / functions, as the chat format has them
    implicit: bool = False  # TRL's implicit prompt: split off the two whole conversations (or texts)
    places: Places = field(default_factory=Places, repr=False, compare=False)

    @property
    def text(self) -> bool:
        """A text pair (TRL strings): rendered without the chat template."""
        return isinstance(self.prompt, str)


@dataclass
class PreferencePair:
    """A preference pair in token ids.

    prompt + chosen is the chat template's rendering of the conversation ending with the preferred reply (the
    whitespace a template writes after its end-of-turn token aside), prompt + rejected the same with the other
    reply. `chosen` and `rejected` are the tokens a DPO loss reads (`pair_sequences`).
    """

    prompt: list[int]  # bos, the template's prompt and its generation prompt: not trained
    chosen: list[int]  # the preferred reply's tokens, end-of-turn included
    rejected: list[int]  # the non-preferred reply's tokens
    source: dict = field(default_factory=dict)  # e.g. {"line": 12} for reports

    @property
    def longest(self) -> int:
        """Tokens of the longer side: prompt + the longer reply (what must fit max_len)."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


# --------------------------------------------------------------------------------------------------
# Reading and validation


def preference_form(record: Any) -> Form | None:
    """"openai" or "trl" from a record's keys; None when it has no key of either."""
    if not isinstance(record, dict):
        return None
    if any(key in record for key in OPENAI_SIDES + tuple(OPENAI_ALIASES.values())):
        return "openai"
    if any(key in record for key in TRL_SIDES):
        return "trl"
    return None


def validate_preference(record: Any) -> list[DataIssue]:
    """Every problem of one preference record (issues carry no line; the caller adds it)."""
    return _examine(record)[1]


def read_preference(record: Any) -> Preference:
    """A valid preference record in one shape; a DataError listing its errors (path, code, hint) otherwise."""
    pref, issues = _examine(record)
    errors = [i for i in issues if i.severity == "error"]
    if errors or pref is None:
        raise DataError([Problem(i.path, f"[{i.code}] {i.message}", i.hint) for i in errors]
                        or Problem("", "not a preference record", _HINT_REPLY))
    return pref


def _examine(record: Any) -> tuple[Preference | None, list[DataIssue]]:
    if not isinstance(record, dict):
        return None, [DataIssue("data_type", "", f"each line must be a JSON object, got {type(record).__name__}",
                                '{"input": ..., "preferred_output": [...], "non_preferred_output": [...]} or '
                                '{"prompt": ..., "chosen": ..., "rejected": ...}')]
    openai = preference_form(record) == "openai" or (preference_form(record) is None and "input" in record)
    parsed, issues = _parse_openai(record) if openai else _parse_trl(record)
    if isinstance(parsed.prompt, list):  # the prompt's problems, even when a side is unusable
        issues += _chat_issues(parsed)
        last = parsed.prompt[-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            issues.append(DataIssue(
                "preference_prompt_ends_with_assistant", f"{parsed.places.prompt}[{len(parsed.prompt) - 1}]",
                "the prompt ends with an assistant message: the replies must answer a user (or tool) turn",
                "end the prompt with the user's turn; the assistant's answer goes in the replies"))
    chosen, rejected = parsed.replies
    if parsed.prompt is None or chosen is None or rejected is None:
        return None, issues
    pref = Preference(parsed.form, parsed.prompt, chosen, rejected, parsed.extras, parsed.implicit, parsed.places)
    if any(i.severity == "error" for i in issues):
        return pref, issues
    chosen, rejected = _reply_key(pref.chosen), _reply_key(pref.rejected)
    if chosen == rejected:
        issues.append(_identical(pref.places.sides[1]))
    elif _squeezed(chosen) == _squeezed(rejected):
        issues.append(DataIssue("preference_whitespace_only", pref.places.sides[1],
                                "the two replies differ only in whitespace", "make the non-preferred reply the "
                                "answer you do not want; a whitespace difference teaches spacing", "warning"))
    return pref, issues


@dataclass
class _Parsed:
    """What the shape of a record gives: the prompt and each reply, None where unusable."""

    form: Form
    places: Places
    prompt: list | str | None = None
    replies: tuple[dict | str | None, dict | str | None] = (None, None)
    extras: dict = field(default_factory=dict)
    implicit: bool = False


def _identical(path: str) -> DataIssue:
    return DataIssue("preference_identical_sides", path, "the preferred and non-preferred replies are the same",
                     "give two different replies (the pair teaches nothing), or leave the pair out")


def _unknown(key: str, known: tuple[str, ...], what: str, prefix: str = "") -> DataIssue:
    return DataIssue("unrecognized_key", f"{prefix}{key}", f"unknown key '{prefix}{key}' (ignored)",
                     f"known keys for {what}: {', '.join(known)}", "warning")


def _missing_side(key: str, example: str) -> DataIssue:
    return DataIssue("preference_missing_side", key, f"missing '{key}': a pair needs both replies",
                     f'give it, e.g. "{key}": {example}')


def _reply(value: Any, at: str, first: int = 0) -> tuple[dict | None, list[DataIssue]]:
    """The one assistant message of a side's list (`at`: the list's path; `first`: the index the reply has in it)."""
    if isinstance(value, dict):
        return None, [DataIssue("data_type", at, "a side must be a list holding the reply, not a message on its "
                                "own", f"wrap it in a list: {_HINT_REPLY}")]
    if not isinstance(value, list):
        return None, [DataIssue("data_type", at, f"a side must be a list holding one assistant message, got "
                                f"{type(value).__name__}", _HINT_REPLY)]
    reply = value[first:]
    if not reply:
        return None, [DataIssue("preference_empty_output", at, "no reply: the list holds no message", _HINT_REPLY)]
    if len(reply) > 1:
        return None, [DataIssue("preference_side_length", at, f"{len(reply)} messages: a side is one assistant "
                                "message, the final reply", "keep the final reply; earlier turns belong in the "
                                "prompt")]
    message, here = reply[0], f"{at}[{first}]"
    if not isinstance(message, dict):
        return None, [DataIssue("data_type", here, f"a message must be an object, got {type(message).__name__}",
                                _HINT_REPLY)]
    role = message.get("role")
    if role != "assistant":
        return None, [DataIssue("preference_side_not_assistant", f"{here}.role",
                                f"the reply's role is {role!r}, not 'assistant'", _HINT_REPLY)]
    if _empty(message):
        return None, [DataIssue("preference_empty_output", f"{here}.content", "the reply has no text and no tool "
                                "calls", "give the reply's text (or its tool calls)")]
    return message, []


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _empty(message: dict) -> bool:
    content = message.get("content")
    if content is not None and not isinstance(content, str | list):
        return False  # a wrong type: the chat rules name it
    reasoning = message.get("reasoning_content")
    return (not _text_of(content).strip() and not message.get("tool_calls") and not message.get("function_call")
            and not (isinstance(reasoning, str) and reasoning.strip()))


def _parse_openai(record: dict) -> tuple[_Parsed, list[DataIssue]]:
    issues = [_unknown(key, OPENAI_KEYS, "an OpenAI preference line") for key in record if key not in OPENAI_KEYS]
    replies: list[dict | None] = []
    paths = []
    for name in OPENAI_SIDES:
        alias = OPENAI_ALIASES[name]
        key = alias if record.get(name) is None and record.get(alias) is not None else name
        if key == name and alias in record:
            issues.append(DataIssue("unrecognized_key", alias, f"'{alias}' (the older name of '{name}') is ignored",
                                    f"keep only '{name}'", "warning"))
        paths.append(f"{key}[0]")
        if record.get(key) is None:
            issues.append(_missing_side(name, '[{"role": "assistant", "content": "..."}]'))
            replies.append(None)
            continue
        reply, found = _reply(record[key], key)
        issues += found
        replies.append(reply)
    parsed = _Parsed("openai", Places("input.messages", (paths[0], paths[1]), "input."),
                     replies=(replies[0], replies[1]))
    inp = record.get("input")
    if inp is None:
        issues.append(DataIssue("missing_key", "input", "missing key 'input': the conversation before the replies",
                                '"input": {"messages": [{"role": "user", "content": "..."}]}'))
    elif not isinstance(inp, dict):
        issues.append(DataIssue("data_type", "input", f"'input' must be an object, got {type(inp).__name__}",
                                '"input": {"messages": [...], "tools"?: [...]}'))
    else:
        issues += [_unknown(key, INPUT_KEYS, "input", "input.") for key in inp if key not in INPUT_KEYS]
        parsed.extras = {k: inp[k] for k in INPUT_KEYS[1:] if k in inp}
        messages = inp.get("messages")
        if isinstance(messages, list) and messages:
            parsed.prompt = messages
        else:
            issues.append(DataIssue("missing_messages_list", "input.messages", "'input.messages' must be a non-empty "
                                    "list", '"input": {"messages": [{"role": "user", "content": "..."}]}'))
    return parsed, issues


def _parse_trl(record: dict) -> tuple[_Parsed, list[DataIssue]]:
    issues = [_unknown(key, TRL_KEYS, "a TRL preference line") for key in record if key not in TRL_KEYS]
    missing = [side for side in TRL_SIDES if record.get(side) is None]
    for side in missing:
        example = '"..."' if isinstance(record.get("prompt"), str) else '[{"role": "assistant", "content": "..."}]'
        issues.append(_missing_side(side, example))
    extras = {k: record[k] for k in ("tools", "parallel_tool_calls") if k in record}
    if "prompt" in record:
        prompt = record["prompt"]
        parsed = _Parsed("trl", Places("prompt", ("chosen[0]", "rejected[0]")), extras=extras)
        if isinstance(prompt, str):
            parsed.places = Places("prompt")
            if not missing:
                _text_replies(parsed, prompt, record["chosen"], record["rejected"], issues)
            return parsed, issues
        if not isinstance(prompt, list):
            issues.append(DataIssue("data_type", "prompt", f"'prompt' must be a string or a list of messages, got "
                                    f"{type(prompt).__name__}", 'e.g. "prompt": [{"role": "user", "content": "..."}]'))
        elif not prompt:
            issues.append(DataIssue("missing_messages_list", "prompt", "'prompt' must be a non-empty list",
                                    '"prompt": [{"role": "user", "content": "..."}]'))
        else:
            parsed.prompt = prompt
        if not missing:
            chosen, found = _reply(record["chosen"], "chosen")
            rejected, more = _reply(record["rejected"], "rejected")
            issues += found + more
            parsed.replies = (chosen, rejected)
        return parsed, issues
    parsed = _Parsed("trl", Places("chosen"), extras=extras, implicit=True)
    if missing:
        return parsed, issues
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        k = _shared_text(chosen, rejected)
        if chosen == rejected:
            issues.append(_identical("rejected"))
        elif k == 0:
            issues.append(DataIssue(
                "preference_no_shared_prompt", "rejected", "without a 'prompt', chosen and rejected must start with "
                "the same prompt, but their first characters differ", 'give the prompt as "prompt" (TRL\'s explicit '
                'form), or start both texts with it'))
        else:
            _text_replies(parsed, chosen[:k], chosen[k:], rejected[k:], issues)
        return parsed, issues
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        issues.append(DataIssue("data_type", "rejected", "chosen and rejected must both be strings (text) or both "
                                "lists of messages", "write both sides the same way"))
        return parsed, issues
    if chosen == rejected:
        issues.append(_identical("rejected"))
        return parsed, issues
    k = next((j for j, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b),
             min(len(chosen), len(rejected)))
    if k == 0:
        issues.append(DataIssue(
            "preference_no_shared_prompt", "rejected[0]", "without a 'prompt', chosen and rejected must be the same "
            "conversation up to their last message, but their first messages differ",
            'give the conversation as "prompt" and each reply as [assistant message], or start both with it'))
        return parsed, issues
    parsed.prompt = chosen[:k]
    parsed.places = Places("chosen", (f"chosen[{k}]", f"rejected[{k}]"))
    if max(len(chosen), len(rejected)) > k + 1 and min(len(chosen), len(rejected)) > k:
        issues.append(DataIssue(
            "preference_no_shared_prompt", f"chosen[{k}]", f"the conversations differ at message {k}, before their "
            "last message: the shared prompt must be every message but the reply",
            'make both conversations the same up to the final reply, or give the prompt as "prompt"'))
        return parsed, issues
    replies = []
    for side, value in (("chosen", chosen), ("rejected", rejected)):
        if len(value) == k:
            issues.append(DataIssue("preference_empty_output", side, f"'{side}' holds no reply after the {k} "
                                    "message(s) it shares with the other side",
                                    "end each conversation with its own assistant reply"))
            replies.append(None)
            continue
        reply, found = _reply(value, side, k)
        issues += found
        replies.append(reply)
    parsed.replies = (replies[0], replies[1])
    return parsed, issues


def _text_replies(parsed: _Parsed, prompt: str, chosen: Any, rejected: Any, issues: list[DataIssue]) -> None:
    parsed.prompt = prompt
    replies: list[str | None] = []
    for side, value in (("chosen", chosen), ("rejected", rejected)):
        replies.append(None)
        if not isinstance(value, str):
            issues.append(DataIssue("data_type", side, f"'{side}' must be a string like the prompt, got "
                                    f"{type(value).__name__}", "write the prompt and both replies as strings, or "
                                    "all three as messages"))
        elif not value.strip():
            issues.append(DataIssue("preference_empty_output", side, f"'{side}' has no text",
                                    "give the reply's text"))
        else:
            replies[-1] = value
    parsed.replies = (replies[0], replies[1])


def _shared_text(a: str, b: str) -> int:
    """Length of the prompt two texts share: their common beginning, less a space just before the first difference
    (TRL's `extract_prompt` rule, so a reply keeps the space that starts its first word)."""
    k = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return k - 1 if k > 0 and a[k - 1] == " " else k


def _chat_issues(parsed: _Parsed) -> list[DataIssue]:
    """The chat format's problems of the prompt followed by each reply, named in the preference record. A reply
    that is unusable (its own problem is already reported) is stood in for by a plain one."""
    assert isinstance(parsed.prompt, list)
    n = len(parsed.prompt)
    out: list[DataIssue] = []
    seen: set[tuple[str, str, str]] = set()
    for s, reply in enumerate(parsed.replies):
        usable = isinstance(reply, dict)
        message = {k: v for k, v in reply.items() if k != "weight"} if isinstance(reply, dict) else \
            {"role": "assistant", "content": "-"}
        for issue in formats.validate_record({**parsed.extras, "messages": [*parsed.prompt, message]}, "chat"):
            at_reply = issue.path.startswith(f"messages[{n}]")
            if at_reply and (not usable or issue.code in ("tool_call_unanswered", "missing_content")):
                continue  # a reply's calls end the pair by design; an empty reply is preference_empty_output
            path = parsed.places.of_chat_path(issue.path, n, s)
            if (issue.code, path, issue.message) in seen:
                continue  # a problem of the prompt, found with each reply
            seen.add((issue.code, path, issue.message))
            out.append(DataIssue(issue.code, path, issue.message, issue.hint, issue.severity))
    return out


def _canonical_arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.dumps(json.loads(arguments), sort_keys=True, ensure_ascii=False)
        except ValueError:
            return arguments
    return json.dumps(arguments, sort_keys=True, ensure_ascii=False)


def _reply_key(reply: dict | str) -> tuple:
    """What a template renders of a reply: its text, reasoning and calls (arguments as JSON, whatever their spacing)."""
    if isinstance(reply, str):
        return (reply,)
    calls = [c.get("function") for c in reply.get("tool_calls") or [] if isinstance(c, dict)]
    if isinstance(reply.get("function_call"), dict):
        calls.append(reply["function_call"])
    reasoning = reply.get("reasoning_content")
    return (_text_of(reply.get("content")), reasoning if isinstance(reasoning, str) else "",
            tuple((str(fn.get("name")), _canonical_arguments(fn.get("arguments"))) for fn in calls
                  if isinstance(fn, dict)))


def _squeezed(value: Any) -> Any:
    if isinstance(value, str):
        return "".join(value.split())
    if isinstance(value, tuple):
        return tuple(_squeezed(v) for v in value)
    return value


def differ_only_in_whitespace(pref: Preference) -> bool:
    """Whether the two replies are the same once whitespace is removed (but not the same as written)."""
    chosen, rejected = _reply_key(pref.chosen), _reply_key(pref.rejected)
    return chosen != rejected and _squeezed(chosen) == _squeezed(rejected)


# --------------------------------------------------------------------------------------------------
# Rendering


def render_pair(record: dict | Preference, tokenizer) -> PreferencePair:
    """A preference record (either wire form, or a `Preference`) in token ids, with the model's chat template.

    DataError for an invalid record; TemplateError (field and hint) when the template cannot render a side with
    correct masks, or renders the prompt differently before the two replies.
    """
    from tunekit.data.render import render_example  # imported here: only rendering needs the templates

    pref = record if isinstance(record, Preference) else read_preference(record)
    places = pref.places
    halves = []
    for s, reply in enumerate((pref.chosen, pref.rejected)):
        if pref.text:
            example: dict = {"prompt": pref.prompt, "completion": reply}
        else:
            assert isinstance(reply, dict)
            prompt = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in pref.prompt]
            example = {**pref.extras, "messages": [*prompt, {k: v for k, v in reply.items() if k != "weight"}]}
        try:
            sequences = render_example(example, tokenizer)
        except TunekitError as exc:
            raise type(exc)([_moved(p, pref, s) for p in exc.problems], title=exc.title) from None
        trained = [k for k, label in enumerate(sequences[0].labels) if label != IGNORE] if len(sequences) == 1 else []
        if not trained:
            raise TemplateError(Problem(places.sides[s], "the chat template renders no tokens for this reply",
                                        _HINT_SIDE_RENDER))
        ids = sequences[0].input_ids
        halves.append((ids[: trained[0]], ids[trained[0]: trained[-1] + 1]))
    (prompt_c, chosen), (prompt_r, rejected) = halves
    if prompt_c != prompt_r:
        raise TemplateError(Problem(places.prompt, "the chat template renders the prompt differently before the "
                                    "preferred and the non-preferred reply, so they cannot be compared after the same "
                                    "prompt", "use a chat template whose prompt does not depend on the reply after it"))
    return PreferencePair(prompt_c, chosen, rejected)


def _moved(problem: Problem, pref: Preference, side: int) -> Problem:
    """A rendering problem of `prompt + [reply]` named in the preference record."""
    where = problem.where
    if pref.text:
        where = {"prompt": pref.places.prompt, "completion": pref.places.sides[side]}.get(where, where)
        return Problem(where, problem.message, problem.hint)
    n = len(pref.prompt)
    at_reply = where.startswith(f"messages[{n}]")
    where = pref.places.of_chat_path(where, n, side)
    hint = _HINT_SIDE_RENDER if at_reply and problem.hint and "weight" in problem.hint else problem.hint
    return Problem(where, problem.message, hint)


def pair_sequences(pair: PreferencePair) -> tuple[Sequence, Sequence]:
    """(preferred, non-preferred) as training sequences: prompt + reply, the prompt's labels IGNORE and the reply's
    tokens trained. A DPO loss sums the log-probs of each sequence's trained tokens."""
    head = [IGNORE] * len(pair.prompt)
    return (Sequence(pair.prompt + pair.chosen, head + pair.chosen, source={**pair.source, "side": "chosen"}),
            Sequence(pair.prompt + pair.rejected, head + pair.rejected, source={**pair.source, "side": "rejected"}))


def fit_pair(pair: PreferencePair, max_len: int, truncation: Literal["drop", "truncate"]
             ) -> tuple[PreferencePair | None, Fit]:
    """A pair fitted to max_len tokens per side (prompt + reply), and what that did. A reply is never cut:

    fits            both sides fit as they are
    dropped         "drop": a side is longer than max_len; the pair is left out
    prompt_cut      "truncate": the prompt's first tokens are cut so that both sides fit, the replies whole
    completion_cut  "truncate": a reply does not fit even after one prompt token; the pair must be refused
                    (None), never trained on a cut answer
    """
    if pair.longest <= max_len:
        return pair, "fits"
    if truncation == "drop":
        return None, "dropped"
    keep = max_len - max(len(pair.chosen), len(pair.rejected))
    if keep < 1:
        return None, "completion_cut"
    return PreferencePair(pair.prompt[-keep:], pair.chosen, pair.rejected, dict(pair.source)), "prompt_cut"


def preference_lengths(pref: Preference) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) in characters: the text, reasoning and tool-call names and arguments."""
    def chars(message: Any) -> int:
        if isinstance(message, str):
            return len(message)
        n = len(_text_of(message.get("content")))
        reasoning = message.get("reasoning_content")
        n += len(reasoning) if isinstance(reasoning, str) else 0
        calls = [c.get("function") for c in message.get("tool_calls") or [] if isinstance(c, dict)]
        calls += [message["function_call"]] if isinstance(message.get("function_call"), dict) else []
        for fn in calls:
            if isinstance(fn, dict):
                n += len(str(fn.get("name", ""))) + len(fn["arguments"] if isinstance(fn.get("arguments"), str) else "")
        return n

    prompt = chars(pref.prompt) if isinstance(pref.prompt, str) else sum(chars(m) for m in pref.prompt)
    return prompt, chars(pref.chosen), chars(pref.rejected)
