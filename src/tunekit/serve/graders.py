"""`POST /v1/fine_tuning/alpha/graders/run` and `/validate` (OpenAI's grader endpoints), and the judge that
`score_model` and `label_model` graders call: a model this server serves, generating in-process.

A request reads top to bottom: the body's shape (pydantic), then every problem of the grader at once
(`tunekit.eval.graders.check_grader`: a 400 whose `param` is the JSON path of the first problem, e.g.
`grader.graders.name.operation`, and whose message lists them all), then the judges' models (a served model
or an `ft:` model of the request's project, else a 400 naming `grader.model`), then `grade` with the app's
one `PythonSandbox` (made in create_app's lifespan) and a `ServedJudge`. A grader that fails while grading
(a Python error, a judge that answers no number, a missing variable) is a 200 with the error flags set and
reward 0, as OpenAI's response shape has it; only a malformed request is a 400.

`label_model` is refused at the top level of both endpoints (OpenAI's rule: it only exists inside `multi`
and as an eval criterion). The response echoes `metadata.token_usage` as an int (the judges' total tokens)
or null, as the SDK's strict types want (OpenAI sends an object there).

`complete` is the chat completion of serve/chat.py without HTTP: the same request model, rendering, engine
job and `Reply` (stop strings, tool calls, reasoning), awaited on a private event loop in the calling thread
(`complete_sync`), so the graders route (a worker thread) and the eval runner's thread both generate through
the server's one engine, batched with the chat requests.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, ValidationError

from tunekit.serve.deps import project_of, visible_models
from tunekit.serve.errors import APIError

router = APIRouter()

RUN_TYPES = ("string_check", "text_similarity", "python", "score_model", "multi")  # graders/run and /validate
JUDGE_TYPES = ("score_model", "label_model")
JUDGE_MAX_TOKENS = 512  # a judge's completion tokens when its sampling_params give none


# --------------------------------------------------------------------------------------------------
# Generation in-process: the chat route's path without HTTP


@dataclass
class Completion:
    text: str  # the reply's content (tool calls taken out)
    tool_calls: list[dict]  # [{"id", "type": "function", "function": {"name", "arguments": str}}]
    finish_reason: str  # "stop" | "length" | "tool_calls"
    prompt_tokens: int
    completion_tokens: int  # every generated token, end of turn included (as chat usage counts them)
    cached_tokens: int


async def complete(state, project: str, model: str, messages: list[dict], *, max_tokens: int | None,
                   temperature: float, top_p: float = 1.0, seed: int | None = None,
                   tools: list[dict] | None = None) -> Completion:
    """One chat completion by `model` (a model `project` may use) of `messages` ({"role", "content"} with
    string or text-part content), as POST /v1/chat/completions answers it. APIError (400) for an unknown
    model, messages the template refuses or a prompt longer than the context; APIError (500/503) when
    generation failed or the server is stopping."""
    from tunekit.data.render import render_prompt, starts_in_reasoning, think_markers
    from tunekit.errors import TunekitError
    from tunekit.generate.chat import Reasoning
    from tunekit.generate.engine import Job, Sampling
    from tunekit.serve.chat import ChatRequest, Reply, _collect, _example

    served = visible_models(state, project).get(model)
    if served is None:
        raise APIError(400, f"The model {model!r} does not exist (served: "
                            f"{', '.join(sorted(visible_models(state, project))) or 'none'})",
                       param="model", code="model_not_found")
    try:
        req = ChatRequest.model_validate({"model": model, "messages": messages, "tools": tools or None})
    except ValidationError as exc:
        raise APIError.from_validation(exc.errors()) from None
    try:
        prompt = render_prompt(_example(req), served.tokenizer)
    except TunekitError as exc:
        problem = exc.problems[0]
        raise APIError(400, problem.message, param="messages") from None
    room = served.context - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt is {len(prompt)} tokens; the model's context is {served.context}",
                       param="messages", code="context_length_exceeded")
    sampling = Sampling(max_tokens=min(max_tokens or room, room), temperature=temperature, top_p=top_p, seed=seed)
    markers = think_markers(served.tokenizer)
    reasoning = Reasoning(markers, starts_in_reasoning(prompt, served.tokenizer)) if markers else None
    reply = Reply(served.tokenizer, [], bool(tools), None, True, reasoning)
    job = Job(served, prompt, sampling, 1, asyncio.get_running_loop())
    state.engine.submit(job)
    try:
        await _collect(job, [reply])
    finally:
        job.cancel()
    calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
              "function": {"name": c.name, "arguments": c.arguments if isinstance(c.arguments, str)
                           else json.dumps(c.arguments, ensure_ascii=False)}} for c in reply.calls]
    return Completion(reply.content, calls, reply.finish or "stop", len(prompt), reply.tokens, job.cached_tokens)


def complete_sync(state, project: str, model: str, messages: list[dict], **sampling) -> Completion:
    """`complete` from a thread without an event loop (a sync route's worker thread, the eval runner)."""
    return asyncio.run(complete(state, project, model, messages, **sampling))


def message_text(content: Any) -> str:
    """A grader or eval message's content as text: a string, an input_text/output_text part, or a list of
    them. Images and audio are not supported (ValueError)."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text") \
                and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"content of type {kind!r} is not supported: give text")
    return "".join(texts)


class ServedJudge:
    """The `Judge` of score_model and label_model graders: the served model `model` (visible to `project`)
    answers the rendered messages; the sampling params are OpenAI's (`max_completions_tokens`, with its "s",
    or `max_completion_tokens`; `temperature`, default 0 here; `top_p`; `seed`)."""

    def __init__(self, state, project: str):
        self.state, self.project = state, project

    def __call__(self, model: str, messages: list[dict], sampling_params: dict):
        from tunekit.eval.graders import JudgeReply

        params = sampling_params or {}
        max_tokens = params.get("max_completions_tokens") or params.get("max_completion_tokens") or JUDGE_MAX_TOKENS
        chat = [{"role": m.get("role", "user"), "content": message_text(m.get("content", ""))} for m in messages]
        done = complete_sync(self.state, self.project, model, chat, max_tokens=int(max_tokens),
                             temperature=float(params["temperature"]) if params.get("temperature") is not None
                             else 0.0,
                             top_p=float(params["top_p"]) if params.get("top_p") is not None else 1.0,
                             seed=params.get("seed"))
        return JudgeReply(text=done.text, prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens)


# --------------------------------------------------------------------------------------------------
# Checking a grader


def judge_models(grader: Any, where: str) -> list[tuple[str, str]]:
    """(JSON path of `model`, model) of every judge in `grader` (a multi's sub-graders included)."""
    from tunekit.eval.graders import multi_graders

    if not isinstance(grader, dict):
        return []
    if grader.get("type") in JUDGE_TYPES and isinstance(grader.get("model"), str):
        return [(f"{where}.model", grader["model"])]
    subs = multi_graders(grader.get("graders")) if grader.get("type") == "multi" else None
    return [found for key, sub in (subs or {}).items() for found in judge_models(sub, f"{where}.graders.{key}")]


def grader_problems(state, project: str, grader: Any, *, where: str, allowed: tuple[str, ...],
                    item_keys: set[str] | None = None) -> list[tuple[str, str]]:
    """Every problem of `grader` as (JSON path, message with its fix): its shape (`check_grader`), then its
    judges' models (served here and visible to `project`)."""
    from tunekit.eval.graders import check_grader

    problems = [(p.where, p.message + (f" (fix: {p.hint})" if p.hint else ""))
                for p in check_grader(grader, item_keys=item_keys, where=where, allowed=allowed)]
    if problems:
        return problems
    served = visible_models(state, project)
    for path, model in judge_models(grader, where):
        if model not in served:
            problems.append((path, f"the judge model {model!r} is not served here (models: "
                                   f"{', '.join(sorted(served)) or 'none'}): give a served model or an ft: model "
                                   "of this project"))
    return problems


def refuse(problems: list[tuple[str, str]], what: str = "grader") -> APIError:
    """One 400 listing every problem, `param` naming the first."""
    listed = "; ".join(f"{where}: {message}" for where, message in problems)
    return APIError(400, f"invalid {what} ({len(problems)} problem{'s' if len(problems) > 1 else ''}): {listed}",
                    param=problems[0][0], code="invalid_grader")


# --------------------------------------------------------------------------------------------------
# Routes


class RunGrader(BaseModel):
    model_config = ConfigDict(extra="ignore")

    grader: dict[str, Any]
    model_sample: str
    item: dict[str, Any] | None = None


class ValidateGrader(BaseModel):
    model_config = ConfigDict(extra="ignore")

    grader: dict[str, Any]


class GraderErrors(BaseModel):
    formula_parse_error: bool
    sample_parse_error: bool
    truncated_observation_error: bool
    unresponsive_reward_error: bool
    invalid_variable_error: bool
    other_error: bool
    python_grader_server_error: bool
    python_grader_server_error_type: str | None
    python_grader_runtime_error: bool
    python_grader_runtime_error_details: str | None
    model_grader_server_error: bool
    model_grader_refusal_error: bool
    model_grader_parse_error: bool
    model_grader_server_error_details: str | None


class GraderRunMetadata(BaseModel):
    name: str
    type: str
    execution_time: float
    scores: dict[str, Any]
    token_usage: int | None
    sampled_model_name: str | None
    errors: GraderErrors


class GraderRunResponse(BaseModel):
    reward: float
    sub_rewards: dict[str, Any]
    model_grader_token_usage_per_model: dict[str, Any]
    metadata: GraderRunMetadata


class GraderValidateResponse(BaseModel):
    grader: dict[str, Any]


def usage_per_model(token_usage: dict[str, dict]) -> dict[str, dict]:
    """{model: {prompt_tokens, completion_tokens, total_tokens, cached_tokens}} of a GradeResult's usage."""
    out = {}
    for model, usage in (token_usage or {}).items():
        prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        out[model] = {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": int(usage.get("total_tokens", prompt + completion)),
                      "cached_tokens": int(usage.get("cached_tokens", 0))}
    return out


def run_json(result) -> dict:
    """A GradeResult in the wire shape of graders/run (§3.8 of the reference)."""
    usage = usage_per_model(result.token_usage)
    return {"reward": result.reward, "sub_rewards": result.sub_rewards, "model_grader_token_usage_per_model": usage,
            "metadata": {"name": result.name, "type": result.type, "execution_time": result.execution_time,
                         "scores": result.scores,
                         "token_usage": sum(u["total_tokens"] for u in usage.values()) if usage else None,
                         "sampled_model_name": result.sampled_model_name, "errors": result.errors}}


@router.post("/v1/fine_tuning/alpha/graders/run", response_model=GraderRunResponse)
def run_grader(request: Request, body: RunGrader) -> dict:
    from tunekit.eval.graders import grade, make_sample

    state, project = request.app.state, project_of(request)
    problems = grader_problems(state, project, body.grader, where="grader", allowed=RUN_TYPES)
    if problems:
        raise refuse(problems)
    result = grade(body.grader, make_sample(body.model_sample), body.item or {}, judge=ServedJudge(state, project),
                   sandbox=state.sandbox)
    return run_json(result)


@router.post("/v1/fine_tuning/alpha/graders/validate", response_model=GraderValidateResponse)
def validate_grader(request: Request, body: ValidateGrader) -> dict:
    problems = grader_problems(request.app.state, project_of(request), body.grader, where="grader",
                               allowed=RUN_TYPES)
    if problems:
        raise refuse(problems)
    return {"grader": body.grader}
