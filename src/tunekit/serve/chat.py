"""`POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/{id}`: OpenAI's shapes.

A request reads top to bottom in `chat_completions`: validate the body (pydantic, below), find the model,
render the prompt with `tunekit.data.render` (the tokens training put before each reply), submit a `Job` to
the engine, then turn the tokens it produces into a reply (`Reply`: incremental text, reasoning, stop strings,
tool calls) and answer with one JSON object or an SSE stream of chunks.

Reasoning models (a template with a `<think>` block, `render.think_markers`): `chat_template_kwargs` (vLLM's
field, e.g. {"enable_thinking": false}) goes to the template; the reply's think block is sent as
`reasoning_content` (message, or `delta.reasoning_content` while streaming) and the rest as `content`, with the
reasoning's tokens counted in `usage.completion_tokens_details.reasoning_tokens`. Stop strings and tool calls
are looked for in the content only. Other models answer without these fields.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunekit.errors import TunekitError
from tunekit.eval.toolcalls import MARKERS, ToolCall, parse_tool_calls, strip_fence, tool_call_start
from tunekit.generate.chat import Reasoning
from tunekit.generate.engine import Failed, Job, Sampling, Token
from tunekit.generate.models import Served
from tunekit.serve.deps import find_model, project_of, visible_models
from tunekit.serve.errors import APIError

router = APIRouter()

# --------------------------------------------------------------------------------------------------
# Request schema (unknown fields are ignored, as OpenAI's optional extras are; unsupported values get a 400)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier reply's reasoning (templates keep it in tool-call loops)


class FunctionSpec(_Lenient):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionSpec


class JsonSchemaSpec(_Lenient):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class ChatRequest(_Lenient):
    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    n: Annotated[int | None, Field(ge=1, le=16)] = 1
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    temperature: Annotated[float | None, Field(ge=0, le=2)] = None
    top_p: Annotated[float | None, Field(gt=0, le=1)] = None
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables of the chat template (vLLM's field)


def _unsupported(req: ChatRequest) -> None:
    """Fields tunekit parses but cannot honour: 400 naming the param (a silent default would mislead)."""
    for param in ("presence_penalty", "frequency_penalty"):
        if getattr(req, param):
            raise APIError(400, f"{param} is not supported by this server", param=param)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if req.response_format and req.response_format.type == "json_schema" and req.response_format.json_schema is None:
        raise APIError(400, "response_format json_schema needs a json_schema object", param="response_format")
    if isinstance(req.tool_choice, dict):
        name = (req.tool_choice.get("function") or {}).get("name")
        if req.tool_choice.get("type") != "function" or not isinstance(name, str):
            raise APIError(400, 'tool_choice must be "none", "auto", "required" or '
                                '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        if name not in {t.function.name for t in req.tools or []}:
            raise APIError(400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    if req.tool_choice not in (None, "none") and not req.tools:
        raise APIError(400, "tool_choice is set but no tools are given", param="tool_choice")


def _text(content, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"only text content parts are supported, not {part.get('type')!r}",
                           param=f"{where}.content[{j}]")
        texts.append(part["text"])
    return "".join(texts)


def _example(req: ChatRequest) -> dict:
    """The request as a tunekit chat example (what `data.render` renders)."""
    messages = []
    for i, m in enumerate(req.messages):
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                   "content": _text(m.content, f"messages[{i}]")}
        for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
            if getattr(m, key) is not None:
                message[key] = getattr(m, key)
        messages.append(message)
    if messages[-1]["role"] == "assistant":
        raise APIError(400, "the last message is an assistant message; continuing a reply is not supported",
                       param=f"messages[{len(messages) - 1}]")
    tools = [t.model_dump(exclude_none=True, by_alias=True) for t in req.tools] if req.tools else None
    return {"messages": messages, "tools": tools}


# --------------------------------------------------------------------------------------------------
# From tokens to a reply


class Reply:
    """The text of one choice, built token by token, as stream chunks and as the final message.

    Text is decoded incrementally (a piece is released only when it does not end in a partial UTF-8
    character); with `reasoning` (a `generate.chat.Reasoning`, for models with a think block) the think block
    is taken out first, as `reasoning` (released with `take_reasoning`); in the rest, a stop string ends the
    reply before it (text that may be the start of one is held back); with tools, the text from a tool-call
    marker on is held and parsed at the end into tool calls.
    """

    def __init__(self, tokenizer, stops: list[str], tools: bool, allowed: set[str] | None, parallel: bool,
                 reasoning: Reasoning | None = None):
        self.tokenizer, self.stops, self.tools, self.allowed, self.parallel = tokenizer, stops, tools, allowed, parallel
        self.splitter = reasoning
        self.reasoning_tokens = 0  # tokens generated while the think block was open (its markers included)
        self._unsent_reasoning = ""
        self.ids: list[int] = []
        self._prefix = self._read = 0  # decode window: ids[prefix:read] is already text
        self.text = ""  # decoded text so far (before any stop string)
        self.sent = 0  # chars of self.text released as content
        self.tokens = 0  # completion tokens (end-of-turn included)
        self.logprobs: list[dict] = []  # per token, for the response
        self._unsent_logprobs: list[dict] = []
        self.finish: str | None = None
        self.calls: list[ToolCall] = []
        self.stopped = False  # a stop string was found

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def add(self, token: Token) -> str:
        """Take one token; returns the content to release now ("" when nothing is safe yet)."""
        if self.stopped:  # tokens the worker made before it saw the cancel: not part of the reply
            return ""
        self.tokens += 1
        if token.logprob is not None and not token.end:
            entry = self._logprob_entry(token.id, token.logprob, token.top)
            self.logprobs.append(entry)
            self._unsent_logprobs.append(entry)
        if token.end:
            return ""
        self.ids.append(token.id)
        thinking = self.splitter is not None and self.splitter.thinking
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._add_text(after[len(before):], final=False)
            self._prefix, self._read = self._read, len(self.ids)
        if thinking and self.splitter.reasoning is not None:
            self.reasoning_tokens += 1
        return self._release(final=False)

    def _add_text(self, text: str, *, final: bool) -> None:
        if self.splitter is None:
            self.text += text
            return
        reasoning, content = self.splitter.feed(text, final=final)
        self._unsent_reasoning += reasoning
        self.text += content

    @property
    def reasoning(self) -> str | None:
        """The reasoning of the reply (None: it has no think block, or the model has no think markers)."""
        return None if self.splitter is None else self.splitter.reasoning

    def take_reasoning(self) -> str:
        """The reasoning released since the last call (stream deltas)."""
        out, self._unsent_reasoning = self._unsent_reasoning, ""
        return out

    def end(self, reason: str) -> str:
        """The reply is over ("stop", "length"): release what was held; returns the last content."""
        rest = ""
        if not self.stopped:
            rest = self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
        self._add_text(rest, final=True)
        content = self._release(final=True)
        self.finish = "stop" if self.stopped else reason
        if self.tools:
            start = tool_call_start(self.text[self.sent:])
            if start is not None:
                calls = parse_tool_calls(self.text[self.sent + start:])
                if self.allowed is not None:
                    calls = [c for c in calls if c.name in self.allowed]
                if calls:
                    self.calls = calls if self.parallel else calls[:1]
                    content += self.text[self.sent:self.sent + start].rstrip()
                    self.text = self.text[:self.sent] + self.text[self.sent:self.sent + start].rstrip()
                    self.sent = len(self.text)
                    self.finish = "tool_calls"
                    return content
            content += self.text[self.sent:]
            self.sent = len(self.text)
        return content

    def _release(self, *, final: bool) -> str:
        if not self.stopped:
            for s in self.stops:
                i = self.text.find(s, max(0, self.sent - len(s) + 1))
                if i >= 0:
                    self.text, self.stopped = self.text[:i], True
        safe = len(self.text)
        if not final and not self.stopped:
            for s in self.stops:  # hold a tail that may grow into a stop string
                safe = min(safe, len(self.text) - _partial_suffix(self.text, s))
        if self.tools:  # hold the tool-call part (and a tail that may grow into a marker) until the end
            unsent = self.text[self.sent:]
            start = tool_call_start(unsent)
            if start is not None or not unsent.strip():
                safe = self.sent + (start or 0)
            else:
                for marker in MARKERS:
                    safe = min(safe, len(self.text) - _partial_suffix(self.text, marker))
            safe = len(self.text[:safe].rstrip())  # whitespace before a call is not content
            if final:
                safe = self.sent if start is not None else len(self.text)
        safe = max(safe, self.sent)
        out = self.text[self.sent:safe]
        self.sent = safe
        return out

    def take_logprobs(self) -> list[dict]:
        out, self._unsent_logprobs = self._unsent_logprobs, []
        return out

    def _logprob_entry(self, token: int, logprob: float, top) -> dict:
        def one(t: int, lp: float) -> dict:
            text = self._decode([t])
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {**one(token, logprob), "top_logprobs": [one(t, lp) for t, lp in top]}

    @property
    def content(self) -> str:
        return self.text


def _partial_suffix(text: str, pattern: str) -> int:
    """Length of the longest end of `text` that is a proper start of `pattern`."""
    for k in range(min(len(pattern) - 1, len(text)), 0, -1):
        if text.endswith(pattern[:k]):
            return k
    return 0


def _tool_call_json(call: ToolCall, index: int, call_id: str) -> dict:
    arguments = call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments, ensure_ascii=False)
    return {"index": index, "id": call_id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


def _check_reply(req: ChatRequest, reply: Reply, choice: int) -> APIError | None:
    """The error for a reply that is not what the request asks for (None when it is): no tool call where
    `tool_choice` requires one, or not the JSON `response_format` asks for. Decoding is not constrained, so
    the output is checked instead."""
    if req.tool_choice == "required" or isinstance(req.tool_choice, dict):
        if not reply.calls:
            return APIError(422, f"choice {choice}: tool_choice asks for a tool call but the model answered "
                                 f"with text: {reply.content[:200]!r}", param="tool_choice",
                            code="invalid_model_output",
                            hint="this server does not force tool calls; use tool_choice auto, or a model "
                                 "trained to call this tool")
        return None
    fmt = req.response_format
    if fmt is None or fmt.type == "text" or reply.calls:
        return None
    try:
        value = json.loads(strip_fence(reply.content))
    except (json.JSONDecodeError, RecursionError) as exc:
        return APIError(422, f"choice {choice}: the model's output is not valid JSON ({exc}): "
                             f"{reply.content[:200]!r}",
                        param="response_format", code="invalid_model_output",
                        hint="this server does not constrain decoding; use a model trained to answer in JSON, "
                             "or raise max_completion_tokens if the output was cut")
    if fmt.type == "json_object" and not isinstance(value, dict):
        return APIError(422, f"choice {choice}: the model's output is JSON but not an object",
                        param="response_format", code="invalid_model_output")
    if fmt.type == "json_schema" and fmt.json_schema.schema_:
        problem = schema_problem(value, fmt.json_schema.schema_, "$")
        if problem:
            return APIError(422, f"choice {choice}: the model's output does not match the schema "
                                 f"{fmt.json_schema.name!r}: {problem}",
                            param="response_format", code="invalid_model_output")
    return None


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def schema_problem(value: Any, schema: dict, where: str) -> str | None:
    """The first way `value` breaks `schema` (type, enum, const, required, properties, additionalProperties:
    false, items), or None. A subset of JSON Schema: enough to check structured outputs."""
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]

        def fits(kind: str) -> bool:
            if kind == "integer":
                return isinstance(value, int) and not isinstance(value, bool)
            if kind == "number":
                return isinstance(value, int | float) and not isinstance(value, bool)
            return kind in _TYPES and isinstance(value, _TYPES[kind]) and not (
                kind != "boolean" and isinstance(value, bool))

        if not any(fits(k) for k in kinds):
            return f"{where} should be {' or '.join(kinds)}, not {json.dumps(value)[:60]}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} should be one of {schema['enum']}"
    if "const" in schema and value != schema["const"]:
        return f"{where} should be {schema['const']!r}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                return f"{where} is missing {key!r}"
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                problem = schema_problem(item, props[key], f"{where}.{key}")
                if problem:
                    return problem
            elif schema.get("additionalProperties") is False:
                return f"{where} has a property {key!r} the schema does not allow"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            problem = schema_problem(item, schema["items"], f"{where}[{i}]")
            if problem:
                return problem
    return None


# --------------------------------------------------------------------------------------------------
# Routes


def _model_json(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "tunekit"}


@router.get("/v1/models")
def list_models(request: Request) -> dict:
    models = visible_models(request.app.state, project_of(request))
    return {"object": "list", "data": [_model_json(s) for s in models.values()]}


@router.get("/v1/models/{model_id:path}")
def get_model(model_id: str, request: Request) -> dict:
    return _model_json(find_model(request, model_id))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    from tunekit.data.render import render_prompt, starts_in_reasoning, think_markers

    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise APIError.from_validation(exc.errors()) from None
    _unsupported(req)
    served = find_model(request, req.model)
    example = _example(req)
    try:
        prompt = await asyncio.to_thread(render_prompt, example, served.tokenizer,  # off the event loop
                                         template_kwargs=req.chat_template_kwargs)
    except TunekitError as exc:
        p = exc.problems[0]
        raise APIError(400, f"{p.message}" + (f" ({p.hint})" if p.hint else ""), param=p.where or "messages") from None

    room = served.context - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt is {len(prompt)} tokens; the model's context is {served.context}",
                       param="messages", code="context_length_exceeded")
    asked = req.max_completion_tokens or req.max_tokens
    max_tokens = min(asked or room, room)
    temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
    sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=req.top_p or 1.0, seed=req.seed,
                        top_logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    n = req.n or 1
    tools = bool(req.tools) and req.tool_choice != "none"
    allowed = None
    if isinstance(req.tool_choice, dict):
        allowed = {req.tool_choice["function"]["name"]}
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stops = [s for s in stops if s]
    markers = think_markers(served.tokenizer)  # None: the model has no think block, replies are all content
    opened = markers is not None and starts_in_reasoning(prompt, served.tokenizer)
    replies = [Reply(served.tokenizer, stops, tools, allowed, req.parallel_tool_calls is not False,
                     Reasoning(markers, opened) if markers else None) for _ in range(n)]

    job = Job(served, prompt, sampling, n, asyncio.get_running_loop())
    request.app.state.engine.submit(job)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": served.name,
            "system_fingerprint": None}
    def usage_of() -> dict:  # exact: prompt tokens once, every generated token of every choice (end of turn too)
        completion = sum(r.tokens for r in replies)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": completion,
                 "total_tokens": len(prompt) + completion,
                 "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}  # from the prefix cache
        if markers:
            usage["completion_tokens_details"] = {"reasoning_tokens": sum(r.reasoning_tokens for r in replies)}
        return usage

    log = request.scope.setdefault("state", {})

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        generator = _stream(job, replies, meta, req, include_usage, usage_of, log)
        return StreamingResponse(generator, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    try:
        await _collect(job, replies)
    finally:
        job.cancel()
    log["tokens"] = usage_of()["completion_tokens"]
    for i, reply in enumerate(replies):
        error = _check_reply(req, reply, i)
        if error:
            raise error
    choices = []
    for i, reply in enumerate(replies):
        message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
        if markers:
            message["reasoning_content"] = reply.reasoning
        if reply.calls:
            message["content"] = reply.content or None
            message["tool_calls"] = [_tool_call_json(c, k, f"call_{uuid.uuid4().hex[:24]}")
                                     for k, c in enumerate(reply.calls)]
            for call in message["tool_calls"]:
                del call["index"]
        choices.append({"index": i, "message": message, "finish_reason": reply.finish,
                        "logprobs": {"content": reply.logprobs, "refusal": None} if req.logprobs else None})
    return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "usage": usage_of()})


async def _read(job: Job, replies: list[Reply]):
    """The job's events as (choice, its reply, the text they added, whether the choice finished), until every
    choice has finished. A token that completes a stop string cancels its choice's rows. APIError 500 when
    generation failed, 503 when the server cancelled a choice (shutting down)."""
    open_choices = job.n
    while open_choices:
        event = await job.events.get()
        if isinstance(event, Failed):
            raise APIError(500, event.message, type="server_error", code="server_error")
        reply = replies[event.choice]
        if isinstance(event, Token):
            text = reply.add(event)
            if reply.stopped:
                job.cancel(event.choice)
            yield event.choice, reply, text, False
            continue
        if event.reason == "cancelled" and not reply.stopped:
            raise APIError(503, "the request was cancelled (the server is shutting down)",
                           type="server_error", code="cancelled")
        text = reply.end(event.reason)
        open_choices -= 1
        yield event.choice, reply, text, True


async def _collect(job: Job, replies: list[Reply]) -> None:
    """Read the job's events until every choice has finished (non-stream requests)."""
    async for _ in _read(job, replies):
        pass


async def _stream(job: Job, replies: list[Reply], meta: dict, req: ChatRequest, include_usage: bool, usage_of,
                  log: dict):
    """SSE chunks: role once per choice, content deltas, tool-call deltas, finish, usage, [DONE]."""

    def chunk(choices: list[dict], usage=None) -> str:
        body = {**meta, "object": "chat.completion.chunk", "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def delta(i: int, d: dict, finish: str | None = None, reply: Reply | None = None) -> dict:
        logprobs = None
        if req.logprobs and reply is not None:
            logprobs = {"content": reply.take_logprobs(), "refusal": None}
        return {"index": i, "delta": d, "finish_reason": finish, "logprobs": logprobs}

    try:
        yield chunk([delta(i, {"role": "assistant", "content": ""}) for i in range(job.n)])
        try:
            async for choice, reply, text, finished in _read(job, replies):
                reasoning = reply.take_reasoning()
                if reasoning:
                    yield chunk([delta(choice, {"reasoning_content": reasoning}, reply=reply if not text else None)])
                if text:
                    yield chunk([delta(choice, {"content": text}, reply=reply)])
                if not finished:
                    continue
                for k, call in enumerate(reply.calls):
                    first = _tool_call_json(call, k, f"call_{uuid.uuid4().hex[:24]}")
                    arguments = first["function"]["arguments"]
                    first["function"]["arguments"] = ""
                    yield chunk([delta(choice, {"tool_calls": [first]})])
                    yield chunk([delta(choice, {"tool_calls": [{"index": k, "function": {"arguments": arguments}}]})])
                error = _check_reply(req, reply, choice)
                if error:
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
                yield chunk([delta(choice, {}, reply.finish, reply=reply)])
        except APIError as error:  # generation failed, or the server cancelled the request
            yield f"data: {json.dumps(error.body())}\n\n"
            return
        log["tokens"] = usage_of()["completion_tokens"]
        if include_usage:
            yield chunk([], usage_of())
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # the client went away, or the reply is complete: the worker drops the rows
