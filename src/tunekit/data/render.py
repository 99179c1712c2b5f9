"""Render one example into token sequences with labels, using the tokenizer's own chat template.

Chat examples are masked by prefix rendering, for each trained assistant message i:

    prompt_i = render(messages[:i], add_generation_prompt=True)    what the model is given at inference
    upto_i   = render(messages[:i + 1])                            the conversation with reply i
    reply_i  = upto_i[len(prompt_i):], trailing whitespace removed  what the model must generate

The trained tokens of turn i are the tokens of reply_i: the content, the tool calls and the end-of-turn
marker the template writes after them (so the model learns to stop). The sequence is the whole conversation
rendered once; the pieces (untrained text, reply, untrained text, ...) are tokenized one by one and must add
up exactly to the tokens of the whole render, and the tokens before each reply must be exactly the tokens of
its prompt. Anything that does not add up is refused with a `TemplateError`, never trained silently.

Templates with `{% generation %}` markers give the trained span themselves (transformers'
`return_assistant_tokens_mask`); the span must start where the prompt ends and lie inside the reply.

Generation prompts written with template whitespace the conversation render does not have (templates indented
for reading, e.g. `<|im_start|>assistant\\n` followed by a stray newline) are aligned to the conversation
ignoring whitespace only: the prompt used is the conversation's own text up to the reply. `render_prompt`
returns that same prompt, so evaluation feeds the model exactly the tokens training put before each reply.

A template that is not prefix-stable (rendering a longer conversation rewrites earlier turns, e.g. moves the
tool list before the last user message, or drops earlier reasoning) cannot train such a turn inside the full
conversation: with `unstable_template="split"` that turn gets its own sequence, `render(messages[:i + 1])`
with only turn i trained (turns that are stable stay trained in the full conversation's sequence); with
`"error"` a `TemplateError` names what changed. A template that leaves out a system or user message, or does
not write an assistant message's content or tool calls, is refused too.

Reasoning: an assistant message may carry its reasoning as `reasoning_content` (the field of vLLM, DeepSeek and
the openai SDK's users) or as a `<think>...</think>` block at the start of its content. It is passed to the
template as written, and trained where the template writes it: inside the reply, so a thinking template's
`<think>`, the reasoning, `</think>` and the content are the trained tokens of the turn. Templates that keep
only the last turn's reasoning (Qwen3) are not prefix-stable, so under `split` each such turn is trained on
its own sequence, with the reasoning the template shows for it as the last turn. A template that does not
write a message's reasoning into its reply (plain ChatML, or DeepSeek-R1's, which strips it) is refused with
a `TemplateError` naming the field: the model would learn the answer without the thinking it was given.
"""

from __future__ import annotations

import bisect
import datetime
import functools
import json
import re
import weakref
from dataclasses import dataclass

from tunekit.data import formats
from tunekit.data.types import IGNORE, Sequence
from tunekit.errors import DataError, Problem, TemplateError

GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE = "x"  # reply content used to see where the template starts an assistant message
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"  # the think block of reasoning models (Qwen3, DeepSeek-R1)

_HINT_TEMPLATE_RAISED = (
    "change the conversation so the template accepts it (e.g. alternate user and assistant turns, one tool call "
    "per message if the template says so), or use a model whose chat template supports these messages"
)
_HINT_LOCATE = (
    "the template does not render this reply where the generation prompt ends; use a chat template that "
    "renders it, or give this message \"weight\": 0"
)
_HINT_BOUNDARY = (
    "the tokenizer joins text across the edge of the reply; remove leading or trailing whitespace from the "
    "message content"
)


@dataclass
class Chat:
    """A chat example normalised for chat templates."""

    messages: list[dict]  # string content, tool-call arguments parsed to dicts, no "weight" key
    tools: list[dict] | None  # OpenAI tool schemas, None when there are none (templates test `tools is none`)
    trained: list[bool]  # per message: an assistant message whose weight is not 0


@dataclass
class _Turn:
    index: int  # position of the assistant message in Chat.messages
    prompt: str  # text before the reply, as it appears in the conversation render
    reply: str  # the trained text: content, tool calls, end-of-turn marker
    upto: str  # render(messages[:index + 1]): the sequence text when this turn is split off


# ----------------------------------------------------------------------------------------------- formats


def detect_format(example: dict) -> str:
    """"chat" ({"messages": ...}), "completion" ({"prompt", "completion"}) or "text" ({"text"}); else DataError."""
    fmt = formats.detect_format(example)
    if fmt == "preference":
        raise DataError(Problem("", "a preference pair (two replies to compare), not an example to train on as is",
                                "render it with tunekit.data.preference.render_pair"))
    if fmt is None or (fmt == "completion" and not ("prompt" in example and "completion" in example)):
        keys = ", ".join(sorted(example)) if isinstance(example, dict) else type(example).__name__
        raise DataError(Problem("", f"unknown example format (keys: {keys or 'none'})",
                                'use {"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}'))
    return fmt


def render_example(example: dict, tokenizer, *, unstable_template: str = "split",
                   method: str = "auto") -> list[Sequence]:
    """Token sequences with labels for one example: one, or one more per split-off turn (see module doc).

    A chat example with no trained assistant message gives one sequence with no trained token.
    `method`: "auto" renders a chat once where the template's layout proves the answer (see "Rendering once")
    and by prefixes otherwise; "prefix" always renders by prefixes. Both give the same sequences.
    """
    if unstable_template not in ("split", "error"):
        raise ValueError(f"unstable_template must be 'split' or 'error', not {unstable_template!r}")
    if method not in ("auto", "prefix"):
        raise ValueError(f"method must be 'auto' or 'prefix', not {method!r}")
    kind = detect_format(example)
    if kind == "text":
        return [_render_text(example, tokenizer)]
    if kind == "completion":
        return [_render_completion(example, tokenizer)]
    return _render_chat(example, tokenizer, unstable_template, method)


def _encode(tokenizer, text: str) -> list[int]:
    # Rendered text already holds its special tokens (templates write bos themselves).
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _encode_piece(tokenizer, text: str) -> list[int]:
    """Tokens of `text` as a piece in the middle of a longer text.

    SentencePiece-style tokenizers (Metaspace, prepend_scheme "first") put a word-start marker at the start of
    a string that they do not put mid-text; encoding after a newline and dropping the newline's tokens avoids
    it (the same trick as transformers' `_encode_chat_piece`). The pieces are verified against the whole text.
    """
    if not text:
        return []
    newline = tokenizer.encode("\n", add_special_tokens=False)
    ids = tokenizer.encode("\n" + text, add_special_tokens=False)
    return ids[len(newline):] if ids[: len(newline)] == newline else _encode(tokenizer, text)


def _bos(tokenizer) -> list[int]:
    """[bos] when the tokenizer defines one and adds it by itself, else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos] else []


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and ids[-1:] != [eos] else ids


def _string_field(example: dict, key: str) -> str:
    value = example[key]
    if not isinstance(value, str):
        raise DataError(Problem(key, f"must be a string, not {type(value).__name__}"))
    return value


def _render_text(example: dict, tokenizer) -> Sequence:
    """Every token is trained; bos as the tokenizer adds it, eos appended."""
    ids = _with_eos(tokenizer, _bos(tokenizer) + _encode(tokenizer, _string_field(example, "text")))
    return Sequence(ids, list(ids), source={"format": "text"})


def _completion_prompt_ids(tokenizer, prompt: str) -> list[int]:
    return _bos(tokenizer) + _encode(tokenizer, prompt)


def _render_completion(example: dict, tokenizer) -> Sequence:
    """Only the completion (and the eos appended to it) is trained."""
    prompt, completion = _string_field(example, "prompt"), _string_field(example, "completion")
    prompt_ids = _encode(tokenizer, prompt)
    joined = _encode(tokenizer, prompt + completion)
    if joined[: len(prompt_ids)] == prompt_ids:
        completion_ids = joined[len(prompt_ids):]
    else:
        # The tokenizer merges across the edge (e.g. a prompt ending in a space): keep the prompt's own tokens,
        # which is what generation starts from, and tokenize the completion on its own.
        completion_ids = _encode_piece(tokenizer, completion)
    completion_ids = _with_eos(tokenizer, completion_ids)
    head = _bos(tokenizer) + prompt_ids
    return Sequence(head + completion_ids, [IGNORE] * len(head) + completion_ids, source={"format": "completion"})


# ------------------------------------------------------------------------------------- normalising chats


def _content_text(content, where: str) -> str:
    if content is None:
        return ""  # an assistant message with only tool calls
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise TemplateError(Problem(f"{where}[{j}]", f"only text parts can be trained, not {kind!r}",
                                            "remove the part or turn it into {\"type\": \"text\", \"text\": ...}"))
            texts.append(part["text"])
        return "".join(texts)
    raise TemplateError(Problem(where, f"content must be a string, null or a list of parts, not "
                                       f"{type(content).__name__}"))


def _tool_call(call, where: str) -> dict:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise TemplateError(Problem(where, 'a tool call must be {"id", "type": "function", "function": {...}}'))
    function = dict(call["function"])
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        # OpenAI stores arguments as a JSON string; templates write them with `arguments|tojson`.
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise TemplateError(Problem(f"{where}.function.arguments", f"is not valid JSON: {exc}",
                                        "arguments must be a JSON object written as a string")) from None
    function["arguments"] = arguments
    return {**call, "type": call.get("type", "function"), "function": function}


def prepare_chat(example: dict) -> Chat:
    """OpenAI chat example -> messages as HF chat templates expect them (see module doc of the formats).

    Legacy `functions` become `tools`, `function_call` one tool call, role "function" role "tool". Tool
    messages without `name` get the name of the call they answer (some templates require it).
    """
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(Problem("messages", "must be a non-empty list of messages"))
    tools = example.get("tools")
    if tools is None and example.get("functions"):
        tools = [{"type": "function", "function": f} for f in example["functions"]]
    if tools is not None and not isinstance(tools, list):
        raise DataError(Problem("tools", "must be a list of tool schemas"))

    out: list[dict] = []
    trained: list[bool] = []
    call_names: dict[str, str] = {}  # tool_call id -> function name, for tool messages without a name
    pending: list[tuple[str, str]] = []  # (id, name) of the last assistant's calls not yet answered, in order
    for i, raw in enumerate(messages):
        if not isinstance(raw, dict) or not isinstance(raw.get("role"), str):
            raise DataError(Problem(f"messages[{i}]", 'must be an object with a "role"'))
        message = {k: v for k, v in raw.items() if v is not None and k not in ("weight", "function_call")}
        role = message["role"]
        if "reasoning_content" in message:
            reasoning = message["reasoning_content"]
            if role != "assistant" or not isinstance(reasoning, str):
                raise DataError(Problem(f"messages[{i}].reasoning_content",
                                        f"must be a string, not {type(reasoning).__name__}" if role == "assistant"
                                        else f"only assistant messages carry reasoning, not a {role} message",
                                        "give the reasoning of an assistant reply as a string, or drop the key"))
            if not reasoning:
                del message["reasoning_content"]  # "" is no reasoning (templates test `reasoning_content or ''`)
        content = raw.get("content")
        message["content"] = content if isinstance(content, str) else _content_text(content, f"messages[{i}].content")
        weight = raw.get("weight", 1)
        if weight not in (0, 1):
            raise TemplateError(Problem(f"messages[{i}].weight", f"must be 0 or 1, not {weight!r}"))
        if role == "assistant":
            calls = list(raw.get("tool_calls") or [])
            if raw.get("function_call"):
                calls.append({"id": f"call_{i}", "type": "function", "function": raw["function_call"]})
            calls = [_tool_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(calls)]
            message.pop("tool_calls", None)
            if calls:  # an empty list would make some templates drop the content
                message["tool_calls"] = calls
            pending = [(c.get("id", ""), c["function"].get("name", "")) for c in calls]
            call_names.update({c["id"]: c["function"].get("name", "") for c in calls if "id" in c})
        elif role in ("tool", "function"):
            if role == "function":  # legacy: answers the previous function_call, by name
                message["role"] = "tool"
                if pending:
                    message.setdefault("tool_call_id", pending[0][0])
            if "name" not in message:
                name = call_names.get(message.get("tool_call_id", "")) or (pending[0][1] if pending else "")
                if name:
                    message["name"] = name
            answered = [c for c in pending if c[0] == message.get("tool_call_id") or c[1] == message.get("name")]
            if answered:
                pending.remove(answered[0])
        out.append(message)
        trained.append(role == "assistant" and weight != 0)
    return Chat(out, tools or None, trained)


# ------------------------------------------------------------------------------------------- rendering


def _require_template(tokenizer) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise TemplateError(Problem("model.base", "the tokenizer has no chat template",
                                    "use a model whose tokenizer has a chat template, or the prompt/completion "
                                    "or text format"))
    return template


_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _missing_special_token(exc: Exception, tokenizer) -> str | None:
    """The special token (bos_token, ...) a template reads but the tokenizer does not define, if that is what
    `exc` (raised by the template) is about."""
    text = str(exc)
    return next((name for name in _SPECIAL_NAMES
                 if f"'{name}' is undefined" in text and getattr(tokenizer, name, None) is None), None)


def _apply(tokenizer, messages: list[dict], tools, *, add_generation_prompt: bool, where: str,
           template_kwargs: dict | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **(template_kwargs or {}))
    except Exception as exc:  # a template is code: it may raise anything (raise_exception, undefined, TypeError)
        missing = _missing_special_token(exc, tokenizer)
        if missing is not None:
            raise TemplateError(Problem(
                "model.base", f"the chat template writes {missing} but the tokenizer defines no {missing}",
                f"set \"{missing}\" in the model's tokenizer_config.json (the token the model was trained with), "
                "or use the tokenizer the model ships with")) from None
        raise TemplateError(Problem(where, f"the chat template raised: {exc}", _HINT_TEMPLATE_RAISED)) from None


# Names a chat template's caller sets itself: apply_chat_template's own parameters and the template's variables.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "raise_exception",
    "strftime_now"})


def check_template_kwargs(template_kwargs, tokenizer, where: str = "chat_template_kwargs") -> dict:
    """`template_kwargs` as extra variables for the chat template (e.g. {"enable_thinking": false}): a dict whose
    keys are not the ones rendering sets itself (the messages, the generation prompt, the special tokens).
    TemplateError naming the key otherwise."""
    if template_kwargs is None:
        return {}
    if not isinstance(template_kwargs, dict):
        raise TemplateError(Problem(where, f"must be an object, not {type(template_kwargs).__name__}",
                                    'e.g. {"enable_thinking": false}'))
    reserved = _RESERVED_TEMPLATE_KWARGS | set(tokenizer.special_tokens_map)
    for key in template_kwargs:
        if not isinstance(key, str) or key in reserved:
            raise TemplateError(Problem(f"{where}.{key}", "is set by tunekit when it renders the prompt",
                                        "pass only the template's own options, such as enable_thinking"))
    return template_kwargs


def template_problems(tokenizer) -> list[Problem]:
    """What makes the tokenizer's chat template unusable for any conversation (not one example's fault): no
    template, or a special token it writes that the tokenizer does not define. Checked once per file, before
    the lines, so that each line is not blamed for it."""
    try:
        _require_template(tokenizer)
        _apply(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}], None,
               add_generation_prompt=False, where="template")
    except TemplateError as exc:
        return [p for p in exc.problems if p.where == "model.base"]
    return []


def _excerpt(text: str, pos: int, width: int = 30) -> str:
    return repr(text[max(0, pos - width): pos + width])


def _first_difference(a, b) -> int:
    """Index of the first difference of two strings or lists (the shorter length if one prefixes the other)."""
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def _align(prompt: str, rendered: str) -> tuple[int | None, int, int]:
    """Where the reply starts in `rendered`, given the template's generation prompt.

    The prompt must equal rendered's beginning up to whitespace. Returns (end, p, r): `end` is the offset in
    `rendered` just after the prompt (its trailing whitespace as far as `rendered` has it too), or None with
    the positions p (prompt) and r (rendered) where the non-whitespace text differs.
    """
    p = r = 0
    while True:
        while p < len(prompt) and prompt[p].isspace():
            p += 1
        while r < len(rendered) and rendered[r].isspace():
            r += 1
        if p == len(prompt):
            break
        if r == len(rendered) or prompt[p] != rendered[r]:
            return None, p, r
        p += 1
        r += 1
    # Back up to just after the last matched character: both continue with whitespace from there.
    p_end = len(prompt.rstrip())
    r_end = r
    while r_end > 0 and rendered[r_end - 1].isspace():
        r_end -= 1
    trailing = prompt[p_end:]
    return r_end + _first_difference(trailing, rendered[r_end:]), p, r


def _prompt_and_probe(tokenizer, chat: Chat, i: int, template_kwargs: dict | None = None, *,
                      generating: bool = False) -> tuple[str, str]:
    """(prompt text for a reply at messages[i], render of messages[:i] + a probe reply).

    `generating`: the prompt is for generation only (not to train a reply after it). Then a generation prompt
    that opens a think block the template's assistant turns do not write (DeepSeek-R1: `<｜Assistant｜><think>\n`,
    while past replies are written without their reasoning) is kept: the reply starts inside the reasoning.
    """
    where = f"messages[{i}]"
    if i == 0:
        raise TemplateError(Problem(where, "the conversation starts with an assistant message: there is no "
                                           "prompt to train it on", 'add the user message before it, or give '
                                                                    'it "weight": 0'))
    history = chat.messages[:i]
    generation = _apply(tokenizer, history, chat.tools, add_generation_prompt=True, where=where,
                        template_kwargs=template_kwargs)
    probe = _apply(tokenizer, history + [{"role": "assistant", "content": _PROBE}], chat.tools,
                   add_generation_prompt=False, where=where, template_kwargs=template_kwargs)
    end, p, r = _align(generation, probe)
    opened = generation.rfind(THINK_OPEN)
    if end is None and generating and opened >= 0 and THINK_CLOSE not in generation[opened:]:
        head, _, _ = _align(generation[:opened], probe)  # the prompt up to the think block it opens
        if head is not None:
            return probe[:head] + generation[opened:], probe
    if end is None:
        raise TemplateError(Problem(
            where,
            "the generation prompt (add_generation_prompt=True) is not how the template starts an assistant "
            f"message: the prompt has {_excerpt(generation, p)} where the conversation has {_excerpt(probe, r)}",
            "use a chat template whose generation prompt matches its assistant turns"))
    return probe[:end], probe


def _prompt_text(tokenizer, chat: Chat, i: int) -> str:
    return _prompt_and_probe(tokenizer, chat, i)[0]


def _reasoning_of(message: dict) -> tuple[str, str, str]:
    """(reasoning, answer, field) of a message: its `reasoning_content`, else a <think>...</think> block that
    starts its content (the answer is what follows the block); ("", content, "") when it has neither."""
    content = message["content"]
    if message.get("reasoning_content"):
        return message["reasoning_content"], content, "reasoning_content"
    if content.lstrip().startswith(THINK_OPEN) and THINK_CLOSE in content:
        reasoning, _, answer = content.lstrip()[len(THINK_OPEN):].partition(THINK_CLOSE)
        return reasoning, answer, "content"
    return "", content, ""


_HINT_REASONING = (
    "this chat template does not write the reasoning of this reply, so it would be trained without it: use a "
    "model whose template writes it (e.g. Qwen3), put the reasoning in the content if it should be trained as "
    "plain text, or drop the reasoning"
)


def _locate(chat: Chat, i: int, reply: str) -> None:
    """Refuse a reply in which the message's reasoning, content or tool calls cannot be found."""
    message = chat.messages[i]
    reasoning, answer, field = _reasoning_of(message)
    if reasoning.strip() and reasoning.strip() not in reply:
        what = "reasoning_content" if field == "reasoning_content" else "reasoning (the <think> block of its content)"
        raise TemplateError(Problem(f"messages[{i}].{field}", f"the chat template drops this message's {what}: "
                                    f"the reply it renders is {reply[:120]!r}", _HINT_REASONING))
    content = message["content"].strip()
    # A think block in the content may be rewritten by the template (Qwen3 puts newlines around the reasoning):
    # then the reasoning and the answer are found on their own.
    if content and content not in reply and not (field == "content" and answer.strip() in reply):
        raise TemplateError(Problem(f"messages[{i}].content",
                                    f"the template does not render this content where the reply starts: the "
                                    f"reply is {reply[:120]!r}", _HINT_LOCATE))
    for j, call in enumerate(message.get("tool_calls", [])):
        name = call["function"].get("name", "")
        if name not in reply:
            raise TemplateError(Problem(f"messages[{i}].tool_calls[{j}]",
                                        f"the template does not render the tool call {name!r} in the reply: "
                                        f"the reply is {reply[:120]!r}", _HINT_LOCATE))


def _turn(tokenizer, chat: Chat, i: int) -> _Turn:
    prompt = _prompt_text(tokenizer, chat, i)
    upto = _apply(tokenizer, chat.messages[: i + 1], chat.tools, add_generation_prompt=False,
                  where=f"messages[{i}]")
    if not upto.startswith(prompt):
        k = _first_difference(prompt, upto)
        raise TemplateError(Problem(
            f"messages[{i}]",
            f"the prompt before this reply is not the start of the conversation rendered with it: "
            f"{_excerpt(prompt, k)} vs {_excerpt(upto, k)}", _HINT_LOCATE))
    # Whitespace the template writes after the end-of-turn marker (e.g. "\n" after <|im_end|>) is not trained.
    reply = upto[len(prompt):].rstrip()
    if not reply:
        raise TemplateError(Problem(f"messages[{i}]", "the template renders nothing for this reply", _HINT_LOCATE))
    _locate(chat, i, reply)
    message = chat.messages[i]
    if message.get("reasoning_content"):  # found as text in the reply: is it there because of the field?
        without = {k: v for k, v in message.items() if k != "reasoning_content"}
        if _apply(tokenizer, chat.messages[:i] + [without], chat.tools, add_generation_prompt=False,
                  where=f"messages[{i}]") == upto:
            raise TemplateError(Problem(f"messages[{i}].reasoning_content", "the chat template drops this message's "
                                        "reasoning_content: it renders the reply the same without it", _HINT_REASONING))
    return _Turn(i, prompt, reply, upto)


def _unstable_problem(turn: _Turn, full: str) -> Problem:
    expected = turn.prompt + turn.reply
    k = _first_difference(expected, full)
    return Problem(
        f"messages[{turn.index}]",
        f"rendering messages[:{turn.index + 1}] is not a prefix of the full render: the text differs at char "
        f"{k}: {_excerpt(expected, k)} vs {_excerpt(full, k)} (the template rewrites earlier turns when a turn "
        "is appended, e.g. moves the tool list or drops earlier reasoning)",
        "set data.unstable_template: split to train such turns on sequences of their own")


def _check_rendered(chat: Chat, full: str) -> None:
    """Refuse a template that leaves out a system or user message (the model would train without it)."""
    for i, message in enumerate(chat.messages):
        content = message["content"].strip()
        if message["role"] in ("system", "user") and content and content not in full:
            raise TemplateError(Problem(
                f"messages[{i}].content", f"the chat template does not write this {message['role']} message",
                "this template ignores such messages: merge the text into the first user message, or remove it"))


def _render_chat(example: dict, tokenizer, unstable_template: str, method: str) -> list[Sequence]:
    chat = prepare_chat(example)
    template = _require_template(tokenizer)
    if method == "auto":
        fast = _render_chat_fast(tokenizer, template, chat)
        if fast is not None:
            return [fast]
    full = _apply(tokenizer, chat.messages, chat.tools, add_generation_prompt=False, where="messages")
    _check_rendered(chat, full)
    turns = [_turn(tokenizer, chat, i) for i, trained in enumerate(chat.trained) if trained]

    stable = [t for t in turns if full.startswith(t.prompt + t.reply)]
    unstable = [t for t in turns if not full.startswith(t.prompt + t.reply)]
    if unstable and unstable_template == "error":
        raise TemplateError([_unstable_problem(t, full) for t in unstable])

    # (text, number of messages it renders, turns trained in it)
    groups = [(t.upto, t.index + 1, [t]) for t in unstable]
    if stable or not unstable:
        groups.append((full, len(chat.messages), stable))
    markers = bool(GENERATION_MARKER.search(template))
    sequences = []
    for text, n_messages, group in groups:
        spans = [(t, len(t.prompt), len(t.prompt) + len(t.reply)) for t in group]
        if markers:
            spans = _marker_spans(tokenizer, template, chat, n_messages, text, spans)
        sequences.append(_build(tokenizer, text, spans))
    return sorted(sequences, key=lambda s: s.source["turns"][:1] or [len(chat.messages)])


def _build(tokenizer, text: str, spans: list[tuple[_Turn, int, int]]) -> Sequence:
    """Tokenize `text` piece by piece (untrained, trained [start, end) chars, untrained, ...) and verify it."""
    ids: list[int] = []
    labels: list[int] = []
    token_starts: list[int] = []  # token index where each turn's trained span starts
    piece_starts: list[tuple[int, int]] = []  # (token index, char offset) where each piece starts
    cursor = 0
    for _, start, end in spans:
        piece_starts.append((len(ids), cursor))
        before = (_encode if cursor == 0 else _encode_piece)(tokenizer, text[cursor:start])
        ids += before
        labels += [IGNORE] * len(before)
        piece_starts.append((len(ids), start))
        token_starts.append(len(ids))
        trained = (_encode if start == 0 else _encode_piece)(tokenizer, text[start:end])
        ids += trained
        labels += trained
        cursor = end
    piece_starts.append((len(ids), cursor))
    rest = (_encode if cursor == 0 else _encode_piece)(tokenizer, text[cursor:])
    ids += rest
    labels += [IGNORE] * len(rest)

    whole = _encode(tokenizer, text)
    if ids != whole:
        k = _first_difference(ids, whole)
        char = max(c for t, c in piece_starts if t <= k)
        turn = min(spans, key=lambda s: min(abs(s[1] - char), abs(s[2] - char)))[0]
        raise TemplateError(Problem(
            f"messages[{turn.index}]",
            f"the reply's tokens do not add up to the tokens of the whole conversation near char {char}: "
            f"{_excerpt(text, char)}", _HINT_BOUNDARY))
    for (turn, _, _), start in zip(spans, token_starts, strict=True):
        if whole[:start] != _encode(tokenizer, turn.prompt):
            raise TemplateError(Problem(
                f"messages[{turn.index}]",
                "the tokens before this reply differ from the tokens of its prompt on its own, so training "
                "would not match generation", _HINT_BOUNDARY))
    return Sequence(ids, labels, source={"turns": [turn.index for turn, _, _ in spans]})


def _marker_spans(tokenizer, template: str, chat: Chat, n_messages: int, text: str,
                  spans: list[tuple[_Turn, int, int]]) -> list[tuple[_Turn, int, int]]:
    """Trained char spans from the template's {% generation %} blocks, checked against prefix rendering.

    transformers 5.23 `apply_chat_template(return_assistant_tokens_mask=True)` maps a block's end with
    `char_to_token(end - 1)`, which leaves out the later tokens of a character split over several byte-level
    tokens (an emoji at the end of a reply). So the blocks are taken as characters from `render_jinja_template`
    (the function apply_chat_template renders with) and tokenized here like every other span.
    """
    messages = chat.messages[:n_messages]
    rendered, blocks = _render_tracked(tokenizer, template, messages, chat.tools)
    if rendered != text:
        raise TemplateError(Problem("messages", "rendering with {% generation %} tracking gives a different text "
                                                "than rendering without it", _HINT_LOCATE))
    return _spans_from_blocks(messages, text, spans, blocks)


def _render_tracked(tokenizer, template: str, messages: list[dict], tools, *,
                    tracked: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered as apply_chat_template renders it, with its non-empty {% generation %} blocks
    as char spans when `tracked` (transformers renders the same text with or without tracking)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, indices = render_jinja_template(
            conversations=[messages], tools=tools, chat_template=template, return_assistant_tokens_mask=tracked,
            add_generation_prompt=False, **tokenizer.special_tokens_map)
    except Exception as exc:  # see _apply
        raise TemplateError(Problem("messages", f"the chat template raised: {exc}", _HINT_TEMPLATE_RAISED)) from None
    return rendered[0], [(s, e) for s, e in indices[0] if e > s] if tracked else []


def _spans_from_blocks(messages: list[dict], text: str, spans: list[tuple[_Turn, int, int]],
                       blocks: list[tuple[int, int]]) -> list[tuple[_Turn, int, int]]:
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    position = {i: k for k, i in enumerate(assistants)}  # message index -> its block
    if len(blocks) != len(assistants):
        raise TemplateError(Problem("messages", f"the template marks {len(blocks)} {{% generation %}} blocks for "
                                                f"{len(assistants)} assistant messages", _HINT_LOCATE))
    out = []
    for turn, start, end in spans:
        s, e = blocks[position[turn.index]]
        e = s + len(text[s:e].rstrip())  # as in prefix rendering: whitespace after the end of turn is not trained
        if s != start or e > end or e == s:
            raise TemplateError(Problem(
                f"messages[{turn.index}]",
                f"the {{% generation %}} block covers chars {s}..{e} but the reply after the prompt covers "
                f"{start}..{end}: {_excerpt(text, s)}", _HINT_LOCATE))
        out.append((turn, s, e))
    return out


# ------------------------------------------------------------------------------------------ rendering once
#
# Prefix rendering renders each trained turn's prompt and the conversation up to it on their own, so its cost
# grows with the square of the turns. Most templates write a plain conversation message by message, each from
# its own role and content (the layout of the template):
#
#     render(messages)                             = head(system) + wrap[role](content) + ... (one per message)
#     render(messages, add_generation_prompt=True) = render(messages) + generation        (after a user message)
#
# (A template that folds the system message into the first user turn gets the render of those two messages,
# made for each example, as its head.) Then the render of messages[:i] is the start of the render of the whole
# conversation, and what prefix
# rendering finds for turn i (prompt, reply, stable) follows from the one render. The layout is learned once per
# template from probe conversations (every probe render, prefixes and generation prompts included, must be the
# layout's text) and checked on each example: its render must be exactly the layout's text for its messages.
# The prompt's end is aligned like `_align` on a window starting at the last non-whitespace character before
# the reply's message (what `_align` does from there does not depend on the text before it), and the tokens
# are checked as `_build` does, re-encoding only the text around each reply (`_build_once`). Anything else goes
# to prefix rendering, which gives the answer or the error: tools, tool calls or other message keys, a system
# message after the first, a turn that does not follow a user message, a template without such a layout, an
# example whose render differs from its layout's text, and every refusal.
#
# What the layout cannot see is a template that branches on content the probes do not have and changes the
# render of a prefix without changing the render of the whole conversation; tests compare both methods on every
# shared template and on random conversations.

RENDER_VERSION = 3  # bump when rendering changes the tokens or labels of any example (keys the on-disk cache)


@dataclass(frozen=True)
class _Wrap:
    pre: str
    post: str
    strip: bool  # the template writes `content | trim`

    def text(self, content: str) -> str:
        return self.pre + (content.strip() if self.strip else content) + self.post


@dataclass
class _Layout:
    head: _Wrap  # around the system message that starts a conversation; pre alone when it starts with a user
    wraps: dict[str, _Wrap]  # "user", "assistant"
    generation: str  # what add_generation_prompt=True appends after a user message
    aligned: dict[str, int | None]  # window -> `_align` end within it (memo)
    # The template folds the system message into the first user turn (Llama 2, Gemma): the first two messages
    # are rendered together, on their own, for each example, and `head` is not used.
    rendered_head: bool = False


_LAYOUTS: dict[tuple, _Layout | None] = {}  # (template, special tokens, starts with system) -> layout or None
_MAX_ALIGNED = 4096


def _probe_contents(padded: bool) -> list[str]:
    """Distinct contents for the probe messages; padded ones show whether the template trims content."""
    return [f" \n tkprobe{k} é😀 {{}}\"' \n " if padded else f"tkprobe{k}" for k in range(8)]


def _split_around(text: str, content: str) -> _Wrap | None:
    at = text.find(content)
    if at < 0 or text.find(content, at + 1) >= 0:
        return None
    return _Wrap(text[:at], text[at + len(content):], False)


def _layout_parts(layout: _Layout, messages: list[dict], head: str | None = None) -> list[str] | None:
    """The layout's text for a plain conversation, one part per message (the first part holds the head, and
    with a rendered head, `head`: the render of the first two messages)."""
    if layout.rendered_head:
        if len(messages) < 2 or messages[1]["role"] != "user" or head is None:
            return None
        rest = [layout.wraps.get(m["role"]) for m in messages[2:]]
        if None in rest:
            return None
        return [head] + [wrap.text(m["content"]) for wrap, m in zip(rest, messages[2:], strict=True)]
    first = messages[0]
    system = first["role"] == "system"
    parts = [layout.head.text(first["content"] if system else "")]
    for m in messages[1:] if system else messages:
        wrap = layout.wraps.get(m["role"])
        if wrap is None:
            return None
        parts.append(wrap.text(m["content"]))
    if not system:  # the head and the first message are one part
        parts[:2] = [parts[0] + parts[1]]
    return parts


def _learn_layout(tokenizer, system: bool) -> _Layout | None:
    """The template's layout (see "rendering once"), or None when its probe renders do not fit one."""
    roles = (["system"] if system else []) + ["user", "assistant"] * 3
    probes = []  # (messages, renders of messages[:k] for k = 1.., generation renders by k)
    try:
        for padded in (False, True):
            messages = [{"role": r, "content": c} for r, c in zip(roles, _probe_contents(padded), strict=False)]
            renders = [_apply(tokenizer, messages[:k], None, add_generation_prompt=False, where="template")
                       for k in range(1, len(messages) + 1)]
            generations = {k: _apply(tokenizer, messages[:k], None, add_generation_prompt=True, where="template")
                           for k in range(1, len(messages) + 1) if roles[k - 1] == "user"}
            probes.append((messages, renders, generations))
    except TemplateError:
        return None
    return _fit_layout(probes, system) or (_fit_rendered_head(probes) if system else None)


def _flag_choices(n: int) -> list[tuple[bool, ...]]:
    return [tuple(bool(bits >> j & 1) for j in range(n)) for bits in range(2 ** n)]


def _learn_wraps(messages: list[dict], renders: list[str], first: int) -> dict[str, _Wrap] | None:
    """Per role, the text around a message's content, learned from what each render from message `first` on
    adds to the one before; None when a render does not extend the one before, or a role is wrapped two ways."""
    wraps: dict[str, _Wrap] = {}
    for k in range(first, len(messages)):
        if not renders[k].startswith(renders[k - 1]):
            return None
        wrap = _split_around(renders[k][len(renders[k - 1]):], messages[k]["content"])
        if wrap is None or wraps.setdefault(messages[k]["role"], wrap) != wrap:
            return None
    return wraps


def _fit_rendered_head(probes: list) -> _Layout | None:
    """A layout whose first two messages (system, user) are rendered together, then one wrap per message."""
    messages, renders, generations = probes[0]
    wraps = _learn_wraps(messages, renders, 2)
    if wraps is None:
        return None
    if not renders[1] or not generations[2].startswith(renders[1]):
        return None
    generation = generations[2][len(renders[1]):]
    for user_strip, assistant_strip in _flag_choices(2):
        layout = _Layout(_Wrap("", "", False),
                         {"user": _Wrap(wraps["user"].pre, wraps["user"].post, user_strip),
                          "assistant": _Wrap(wraps["assistant"].pre, wraps["assistant"].post, assistant_strip)},
                         generation, {}, rendered_head=True)
        if all("".join(_layout_parts(layout, messages[:k], renders[1]) or ["\0"]) == renders[k - 1]
               and all("".join(_layout_parts(layout, messages[:g], renders[1]) or ["\0"]) + generation == text
                       for g, text in generations.items())
               for messages, renders, generations in probes for k in range(2, len(messages) + 1)):
            return layout
    return None


def _fit_layout(probes: list, system: bool) -> _Layout | None:
    """A layout with a head around the first message (system) or before it (user), one wrap per message."""
    messages, renders, generations = probes[0]
    wraps = _learn_wraps(messages, renders, 1)
    if wraps is None:
        return None
    if system:
        head = _split_around(renders[0], messages[0]["content"])
        if head is None:
            return None
    else:
        first = wraps["user"].text(messages[0]["content"])
        if not renders[0].endswith(first):
            return None
        head = _Wrap(renders[0][: len(renders[0]) - len(first)], "", False)
    k = min(generations)
    generation = generations[k][len(renders[k - 1]):]
    # Which roles' content the template trims: the flags under which every probe render is the layout's text.
    for flags in _flag_choices(3):
        layout = _Layout(_Wrap(head.pre, head.post, flags[0] and system),
                         {"user": _Wrap(wraps["user"].pre, wraps["user"].post, flags[1]),
                          "assistant": _Wrap(wraps["assistant"].pre, wraps["assistant"].post, flags[2])},
                         generation, {})
        if all("".join(_layout_parts(layout, messages[:k]) or []) == renders[k - 1]
               and all("".join(_layout_parts(layout, messages[:g]) or []) + generation == text
                       for g, text in generations.items())
               for messages, renders, generations in probes for k in range(1, len(messages) + 1)):
            return layout
    return None


def _layout(tokenizer, template: str, system: bool) -> _Layout | None:
    key = (template, system, tuple(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())),
           datetime.date.today() if "strftime_now" in template else None)  # templates that write the date
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _learn_layout(tokenizer, system)
    return _LAYOUTS[key]


@functools.lru_cache(maxsize=64)
def _has_generation_markers(template: str) -> bool:
    """Whether a chat template has {% generation %} blocks (asked for every example: kept per template)."""
    return bool(GENERATION_MARKER.search(template))


def _render_chat_fast(tokenizer, template: str, chat: Chat) -> Sequence | None:
    """The sequence prefix rendering gives for `chat`, from one render; None where not proven."""
    messages = chat.messages
    if chat.tools is not None or not getattr(tokenizer, "is_fast", False):
        return None
    for k, m in enumerate(messages):
        if len(m) != 2 or not isinstance(m["content"], str) or not (
                m["role"] in ("user", "assistant") or (k == 0 and m["role"] == "system")):
            return None
    layout = _layout(tokenizer, template, messages[0]["role"] == "system")
    if layout is None:
        return None
    markers = _has_generation_markers(template)
    try:
        full, blocks = _render_tracked(tokenizer, template, messages, None, tracked=markers)
        _check_rendered(chat, full)
    except TemplateError:
        return None
    head = None
    if layout.rendered_head:
        if len(messages) < 2 or messages[1]["role"] != "user":
            return None
        try:
            head, _ = _render_tracked(tokenizer, template, messages[:2], None, tracked=False)
        except TemplateError:
            return None
    parts = _layout_parts(layout, messages, head)
    if parts is None or "".join(parts) != full:
        return None
    folded = 1 if layout.rendered_head else 0  # messages before part 1 beyond the first
    reply_probe = layout.wraps["assistant"].text(_PROBE)  # what prefix rendering's probe appends to the prompt
    starts = [0]  # char offset where each part starts, and the end
    for part in parts:
        starts.append(starts[-1] + len(part))
    spans = []
    for i, trained in enumerate(chat.trained):
        if not trained:
            continue
        if i == 0 or messages[i - 1]["role"] != "user":
            return None
        begin, end_of_message = starts[i - folded], starts[i - folded + 1]  # message i's part
        t = begin
        while t > 0 and full[t - 1].isspace():
            t -= 1
        t = max(t - 1, 0)  # the window starts at the last non-whitespace character before the message
        window = full[t:begin]
        if window not in layout.aligned:
            if len(layout.aligned) >= _MAX_ALIGNED:
                layout.aligned.clear()
            layout.aligned[window] = _align(window + layout.generation, window + reply_probe)[0]
        aligned = layout.aligned[window]
        if aligned is None:
            return None
        prompt_end = t + aligned
        if prompt_end > begin and full[begin:prompt_end] != reply_probe[: prompt_end - begin]:
            return None  # the prompt does not end the way this reply's message starts
        reply = full[prompt_end:end_of_message].rstrip()
        if not reply:
            return None
        try:
            _locate(chat, i, reply)
        except TemplateError:
            return None
        spans.append((_Turn(i, "", reply, ""), prompt_end, prompt_end + len(reply)))
    try:
        if markers:
            spans = _spans_from_blocks(messages, full, spans, blocks)
        return _build_once(tokenizer, full, spans)
    except TemplateError:
        return None


_LOOKS_BEHIND = ("(?<", "\\b", "\\B", "^", "\\A", "\\G")  # regex syntax that reads text before a position


def _pre_tokenizer_suffix_determined(spec: dict) -> bool:
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_pre_tokenizer_suffix_determined(p) for p in spec.get("pretokenizers") or [])
    if kind == "ByteLevel":  # the GPT-2 regex (no look-behind) when use_regex, then a byte map per character
        return not spec.get("add_prefix_space", False)
    if kind == "Split":
        regex = (spec.get("pattern") or {}).get("Regex")
        if not isinstance(regex, str) or spec.get("behavior") != "Isolated" or spec.get("invert"):
            return False
        return not any(t in regex.replace("[^", "[") for t in _LOOKS_BEHIND)
    return False


def _suffix_determined(backend) -> bool:
    """Whether the tokens of a segment's text from a position where a pre-token starts are the tokens of that
    text encoded alone (a segment: text between two added tokens, or an added token and an end).

    Holds when nothing looks at text before a position: no normalizer, pre-tokenizers that split by regexes
    matched left to right with no look-behind or anchors (ByteLevel without a prefix space, Split with
    Isolated matches, in sequence), and a model that tokenizes each pre-token on its own without randomness.
    Then the regex matches from that position on are the matches of the text alone, pre-token by pre-token,
    and so are the tokens. Anything else: False (the caller encodes the text instead)."""
    pre = backend.pre_tokenizer
    if backend.normalizer is not None or pre is None or getattr(backend.model, "dropout", None):
        return False
    post = backend.post_processor
    if post is not None and b'"trim_offsets":true' in post.__getstate__():
        return False  # offsets would not say where tokens start
    return _pre_tokenizer_suffix_determined(json.loads(pre.__getstate__()))  # kept per tokenizer: _tokenizer_facts


@dataclass
class _TokenizerFacts:
    """What `_build_once` needs to know of a tokenizer, worked out once and kept while it stays the same."""

    fingerprint: tuple
    determined: bool  # _suffix_determined
    added: dict  # id -> AddedToken
    added_pattern: re.Pattern | None  # every added token's text, longest first
    short: dict[str, list[int]]  # encodings of short texts (callers must not change the lists)


_FACTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> _TokenizerFacts
_SHORT_MAX = 8192


def _tokenizer_facts(tokenizer, backend) -> _TokenizerFacts:
    """The facts of `tokenizer`, worked out again when anything that decides its tokens changed (pre-tokenizer,
    normalizer, post-processor, the vocabulary with its added tokens)."""
    fingerprint = (backend.pre_tokenizer.__getstate__() if backend.pre_tokenizer is not None else None,
                   backend.normalizer.__getstate__() if backend.normalizer is not None else None,
                   backend.post_processor.__getstate__() if backend.post_processor is not None else None,
                   backend.get_vocab_size(with_added_tokens=True), backend.encode_special_tokens)
    facts = _FACTS.get(tokenizer)
    if facts is None or facts.fingerprint != fingerprint:
        added = backend.get_added_tokens_decoder()
        contents = sorted({t.content for t in added.values() if t.content}, key=len, reverse=True)
        facts = _TokenizerFacts(fingerprint, _suffix_determined(backend), added,
                                re.compile("|".join(map(re.escape, contents))) if contents else None, {})
        _FACTS[tokenizer] = facts
    if len(facts.short) > _SHORT_MAX:
        facts.short.clear()
    return facts


def _build_once(tokenizer, text: str, spans: list[tuple[_Turn, int, int]]) -> Sequence | None:
    """What `_build` gives for `text` and `spans`, tokenizing `text` once and the text around each reply again;
    None where it would refuse (prefix rendering then gives the error).

    The tokenizers library cuts a text at its added tokens (the template's markers) before it normalizes,
    pre-tokenizes and runs the model on the stretches between them, so the tokens of a stretch do not depend on
    the text outside it. A piece (untrained or trained text) that holds added tokens therefore tokenizes as: its
    text up to the first one (as `_build` encodes a piece), the whole text's tokens from there to the last one,
    then the last one with the text after it. Only those ends are encoded again, and each prompt's tokens are
    compared from the last added token before its reply.
    """
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None or backend.padding is not None or \
            backend.encode_special_tokens != bool(tokenizer.split_special_tokens):
        return None  # the backend would not encode as tokenizer.encode does

    facts = _tokenizer_facts(tokenizer, backend)
    short = facts.short  # texts that recur in every turn: markers, role headers, indentation

    def encode(piece: str) -> list[int]:
        if len(piece) > 64:
            return backend.encode(piece, add_special_tokens=False).ids
        if piece not in short:
            short[piece] = backend.encode(piece, add_special_tokens=False).ids if piece else []
        return short[piece]

    newline = encode("\n")

    def encode_piece(piece: str) -> list[int]:  # as _encode_piece
        if not piece:
            return []
        ids = encode("\n" + piece)
        return ids[len(newline):] if ids[: len(newline)] == newline else encode(piece)

    encoding = backend.encode(text, add_special_tokens=False)
    whole = encoding.ids  # (offsets and word ids are asked for per token: their whole lists cost more)
    determined = facts.determined

    def word_start(c: int) -> int | None:  # the token where a pre-token starts at char c, else None
        j = encoding.char_to_token(c)
        if j is None or encoding.token_to_chars(j)[0] != c or \
                (j > 0 and encoding.token_to_word(j - 1) == encoding.token_to_word(j)):
            return None
        return j

    def piece_from_whole(a: int, k_end: int, end_char: int) -> int | None:
        """The token i where encode_piece(text[a:end_char]) == whole[i:k_end], an added token (token k_end)
        starting at end_char and ending the segment; None when that cannot be shown (see _suffix_determined)."""
        if not determined or a == 0 or text[a - 1] != "\n":
            return None
        if bisect.bisect_left(found_ends, a - 1 + 1) != bisect.bisect_left(found_starts, end_char):
            return None  # an added token's text in between (its matching can depend on its neighbours)
        j = word_start(a - 1)  # then whole[j:k_end] is encode("\n" + text[a:s])
        if j is None:
            return None
        if whole[j:j + len(newline)] == newline:
            return j + len(newline)
        return word_start(a)  # encode_piece falls back to encode(text[a:end_char])

    # Where added tokens' texts occur (leftmost, longest first, as the tokenizer matches them): every added token
    # the tokenizer found has its text in `text` (no normalizer when `determined`), so a stretch no match
    # touches holds none. Anchors: the matches that are one added token, exactly.
    added = facts.added
    found = [m.span() for m in facts.added_pattern.finditer(text)] if facts.added_pattern is not None else []
    found_starts, found_ends = [a for a, _ in found], [b for _, b in found]
    anchors = []
    for a, b in found:
        k = encoding.char_to_token(a)
        if k is not None and whole[k] in added and encoding.token_to_chars(k) == (a, b) and \
                added[whole[k]].content == text[a:b]:
            anchors.append((k, a, b))

    anchor_ends = [end for _, _, end in anchors]

    def anchor_start_before(c: int) -> int:  # start of the last added token that ends at or before c, else -1
        j = bisect.bisect_right(anchor_ends, c) - 1
        return anchors[j][1] if j >= 0 else -1

    bounds = [0] + [c for _, start, end in spans for c in (start, end)] + [len(text)]
    # Each piece is compared with the whole text's tokens where it must sit: together they are `whole`.
    labels = [IGNORE] * len(whole)
    pos = 0  # tokens of `whole` matched by the pieces so far
    token_starts = []
    first = 0  # index of the first anchor not before the current piece
    for p in range(len(bounds) - 1):
        a, b = bounds[p], bounds[p + 1]
        trained = p % 2 == 1
        while first < len(anchors) and anchors[first][1] < a:
            first += 1
        last = first
        while last < len(anchors) and anchors[last][2] <= b:
            last += 1
        head_encode = encode if a == 0 else encode_piece
        if trained and p > 0 and not (bounds[p - 1] <= anchor_start_before(a) < a):
            # The prompt piece holds no added token: compare the prompt's own tokens below. (When it holds one,
            # its tail was encoded from the last one to the reply, and the pieces matching `whole` checks that.)
            token_starts.append((pos, a))
        if last == first:  # no added token in the piece
            piece = head_encode(text[a:b])
            end = pos + len(piece)
            if whole[pos:end] != piece:
                return None
        else:
            (k1, s1, _), (kl, sl, el) = anchors[first], anchors[last - 1]
            tail = [whole[kl]] if el == b else encode(text[sl:b])  # a piece that ends with the added token
            end = kl + len(tail)
            if tail[:1] != [whole[kl]] or (len(tail) > 1 and whole[kl:end] != tail):
                return None
            head = piece_from_whole(a, k1, s1) if a > 0 else None
            if head is None:
                piece = head_encode(text[a:s1])
                if pos + len(piece) != k1 or whole[pos:k1] != piece:
                    return None
            elif head != pos:
                return None
        if trained:
            labels[pos:end] = whole[pos:end]
        pos = end
    if pos != len(whole):
        return None
    for start, char_start in token_starts:
        j = bisect.bisect_right(anchor_ends, char_start) - 1
        if j < 0:
            if whole[:start] != encode(text[:char_start]):
                return None
        elif whole[anchors[j][0]:start] != encode(text[anchors[j][1]:char_start]):
            return None
    return Sequence(whole, labels, source={"turns": [turn.index for turn, _, _ in spans]})


# ------------------------------------------------------------------------------------- generation helpers


def _as_example(example_or_messages, tools) -> dict:
    if isinstance(example_or_messages, dict):
        return example_or_messages if tools is None else {**example_or_messages, "tools": tools}
    return {"messages": list(example_or_messages), "tools": tools}


def render_prompt_text(example_or_messages, tokenizer, *, tools=None, template_kwargs: dict | None = None) -> str:
    """The prompt text for generation: the messages (without a final assistant message, the reference answer)
    rendered with the generation prompt.

    Exactly the text training puts before that reply (see module doc); a generation prompt that opens a think
    block (DeepSeek-R1) keeps it, so the reply starts in the reasoning. `template_kwargs`: extra variables for
    the template, e.g. {"enable_thinking": False} (`check_template_kwargs`). For a prompt/completion example:
    the prompt (bos not included in the text).
    """
    example = _as_example(example_or_messages, tools)
    kind = detect_format(example)
    if kind == "completion":
        return _string_field(example, "prompt")
    if kind == "text":
        raise TemplateError(Problem("text", "a text example has no prompt to generate from",
                                    "use chat or prompt/completion examples for evaluation"))
    chat = prepare_chat(example)
    _require_template(tokenizer)
    kwargs = check_template_kwargs(template_kwargs, tokenizer)
    # A final assistant message is the reference answer: the prompt is everything before it.
    n = len(chat.messages)
    return _prompt_and_probe(tokenizer, chat, n - 1 if chat.messages[-1]["role"] == "assistant" else n, kwargs,
                             generating=True)[0]


def render_prompt(example_or_messages, tokenizer, *, tools=None, template_kwargs: dict | None = None) -> list[int]:
    """Token ids of `render_prompt_text` (with bos for prompt/completion when the tokenizer adds it)."""
    example = _as_example(example_or_messages, tools)
    text = render_prompt_text(example, tokenizer, template_kwargs=template_kwargs)
    if detect_format(example) == "completion":
        return _completion_prompt_ids(tokenizer, text)
    return _encode(tokenizer, text)


def think_markers(tokenizer) -> tuple[str, str] | None:
    """("<think>", "</think>") when the model writes its reasoning in a think block before its answer: its chat
    template writes `</think>` and the tokenizer holds both markers as single tokens (Qwen3, DeepSeek-R1);
    else None. A reply of such a model is split into reasoning and content where it is served."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str) or THINK_CLOSE not in template:
        return None
    for marker in (THINK_OPEN, THINK_CLOSE):
        if len(_encode(tokenizer, marker)) != 1:
            return None
    return THINK_OPEN, THINK_CLOSE


def starts_in_reasoning(prompt: list[int], tokenizer) -> bool:
    """Whether a prompt (token ids) ends inside a think block it opened, as DeepSeek-R1's generation prompt
    (`<think>\n`) does: the reply then starts in the reasoning. False for models without think markers."""
    markers = think_markers(tokenizer)
    if markers is None:
        return False
    [opening], [closing] = (_encode(tokenizer, m) for m in markers)
    last = {t: k for k, t in enumerate(prompt) if t in (opening, closing)}
    return last.get(opening, -1) > last.get(closing, -1)


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the special tokens the template writes after a reply, then eos.

    Found by rendering a one-turn conversation, so `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`
    or eos come from the template itself.
    """
    found: list[int] = []
    if tokenizer.chat_template:
        chat = Chat([{"role": "user", "content": "Hi"}], None, [False])
        try:
            prompt, probe = _prompt_and_probe(tokenizer, chat, 1, generating=True)
        except TemplateError:
            prompt, probe = "", ""
        # A prompt that opens a think block (DeepSeek-R1) goes past where the probe reply starts: cut there.
        reply = probe[_first_difference(prompt, probe):].rstrip() if prompt else ""
        tail = reply[reply.rfind(_PROBE) + len(_PROBE):] if _PROBE in reply else ""
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        found = [t for t in _encode(tokenizer, tail) if t in special]
    if tokenizer.eos_token_id is not None:
        found.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(found))


def _end_of_turn_warning(tokenizer, generation: str, probe: str) -> list[str]:
    """A warning when the text the template writes after a reply is not ended by a special token: generation
    stops at special tokens (`end_of_turn_ids`), so a marker the tokenizer splits into text never stops it."""
    start = probe.find(_PROBE, len(generation) if probe.startswith(generation) else 0)
    tail = probe[start + len(_PROBE):].strip() if start >= 0 else ""
    if not tail:
        return []
    ids = _encode(tokenizer, tail)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    if any(t in special for t in ids):
        return []
    return [f"the template ends an assistant reply with {tail!r}, which this tokenizer splits into {len(ids)} "
            "ordinary token(s), not one special token: a generation never stops there and runs to max_tokens; "
            "add it to the tokenizer as a special token (tokenizer.add_special_tokens) or use the tokenizer the "
            "model ships with"]


def template_warnings(tokenizer) -> list[str]:
    """Things about the tokenizer's chat template a user should know before training with it.

    - an end-of-turn marker that is not a special token of the tokenizer (generation would not stop on it);
    - a generation prompt that differs from how the template writes assistant turns in whitespace only.
      Training and tunekit's evaluation then use the conversation's own text before each reply; a server that
      applies the raw template with add_generation_prompt=True gives the model a slightly different prompt.
    """
    _require_template(tokenizer)
    history = [{"role": "user", "content": "hi"}]
    generation = _apply(tokenizer, history, None, add_generation_prompt=True, where="template")
    probe = _apply(tokenizer, history + [{"role": "assistant", "content": _PROBE}], None,
                   add_generation_prompt=False, where="template")
    warnings = _end_of_turn_warning(tokenizer, generation, probe)
    if probe.startswith(generation):
        return warnings
    end, _, _ = _align(generation, probe)
    if end is None:
        return warnings  # not a whitespace difference: render_example refuses such examples with its own error
    return warnings + [
        "the template's generation prompt differs from its assistant turns in whitespace: it ends "
        f"{generation[-24:]!r} but turns start {probe[:end][-24:]!r}; tunekit trains and evaluates with the "
        "latter, so serve the model with the same text (or strip the template's indentation)"
    ]
