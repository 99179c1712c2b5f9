"""grade(): one grader on one sample, with OpenAI's result shape (reward, sub_rewards, the 14 error fields).

A runtime failure (a missing template variable, a python grader's error or timeout, a judge that fails or
answers something unreadable, a formula that cannot be evaluated) never raises: the matching error flag is
set, the reward is 0 (or a multi grader's invalid_grade) and error_message says why. Only a grader that
check_grader refuses raises ValueError.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Protocol

from tunekit.eval.graders.check import TYPES, check_grader, multi_graders
from tunekit.eval.graders.formula import FormulaError, evaluate
from tunekit.eval.graders.sandbox import PythonSandbox, SandboxError
from tunekit.eval.graders.similarity import similarity
from tunekit.eval.graders.template import MissingVariable, render

ERROR_FLAGS = (
    "formula_parse_error", "sample_parse_error", "truncated_observation_error", "unresponsive_reward_error",
    "invalid_variable_error", "other_error", "python_grader_server_error", "python_grader_runtime_error",
    "model_grader_server_error", "model_grader_refusal_error", "model_grader_parse_error",
)
ERROR_DETAILS = ("python_grader_server_error_type", "python_grader_runtime_error_details",
                 "model_grader_server_error_details")


@dataclass
class JudgeReply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Judge(Protocol):
    """Answers a model grader's chat: `model` is the grader's model, `messages` OpenAI chat messages (system /
    user / assistant, text content), `sampling_params` the grader's sampling_params without null values."""

    def __call__(self, model: str, messages: list[dict], sampling_params: dict) -> JudgeReply: ...


@dataclass
class GradeResult:
    reward: float
    passed: bool | None
    name: str
    type: str
    sub_rewards: dict[str, float] = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    execution_time: float = 0.0
    scores: dict = field(default_factory=dict)
    token_usage: dict[str, dict] = field(default_factory=dict)
    sampled_model_name: str | None = None
    error_message: str | None = None


class GradeFailed(Exception):
    """A runtime failure of one grader: `flags` to set (and detail strings), a one-line message."""

    def __init__(self, message: str, **flags):
        super().__init__(message)
        self.message = message
        self.flags = flags


def empty_errors() -> dict:
    return {**{k: False for k in ERROR_FLAGS}, **{k: None for k in ERROR_DETAILS}}


def pass_threshold(grader: dict) -> float | None:
    """The score at or above which a grade passes: string_check and label_model 1 (their scores are 1/0);
    text_similarity its pass_threshold (None without one); python and score_model their pass_threshold, by
    default 0.5 * (max - min) + min of the range ([0, 1] for python); multi its pass_threshold or None."""
    kind = grader.get("type")
    given = grader.get("pass_threshold")
    if kind in ("string_check", "label_model"):
        return 1.0
    if given is not None:
        return float(given)
    if kind == "python":
        return 0.5
    if kind == "score_model":
        lo, hi = grader.get("range") or [0.0, 1.0]
        return 0.5 * (hi - lo) + lo
    return None


@dataclass
class _Context:
    sample: dict
    item: dict
    judge: Judge | None
    sandbox: PythonSandbox | None
    errors: dict = field(default_factory=empty_errors)
    token_usage: dict[str, dict] = field(default_factory=dict)
    sampled_model_name: str | None = None
    own_sandbox: PythonSandbox | None = None


def grade(grader: dict, sample: dict, item: dict, *, judge: Judge | None = None,
          sandbox: PythonSandbox | None = None) -> GradeResult:
    """Grade `sample` (see make_sample) for the data row `item`. Without `sandbox`, a python grader starts a
    one-worker sandbox for this call (about 50 ms more)."""
    problems = check_grader(grader, allowed=TYPES)
    if problems:
        raise ValueError("invalid grader:\n" + "\n".join(str(p) for p in problems))
    start = time.perf_counter()
    ctx = _Context(sample, item or {}, judge, sandbox)
    sub_rewards: dict[str, float] = {}
    scores: dict = {}
    message = None
    try:
        if grader["type"] == "multi":
            reward, message = _multi(grader, ctx, sub_rewards, scores)
        else:
            reward = _one(grader, ctx, scores)
    except GradeFailed as exc:
        reward, message = None, exc.message
        _flag(ctx, exc)
    finally:
        if ctx.own_sandbox is not None:
            ctx.own_sandbox.close()
    if reward is None:
        reward = float(grader.get("invalid_grade", 0.0))
    threshold = pass_threshold(grader)
    if grader["type"] == "label_model":
        passed = message is None and scores.get("label") in grader["passing_labels"]
    else:
        passed = None if threshold is None else (message is None and reward >= threshold)
    return GradeResult(reward=float(reward), passed=passed, name=grader["name"], type=grader["type"],
                       sub_rewards=sub_rewards, errors=ctx.errors, execution_time=time.perf_counter() - start,
                       scores=scores, token_usage=ctx.token_usage, sampled_model_name=ctx.sampled_model_name,
                       error_message=message)


def _flag(ctx: _Context, exc: GradeFailed) -> None:
    for key, value in exc.flags.items():
        if key in ERROR_FLAGS:
            ctx.errors[key] = ctx.errors[key] or bool(value)
        elif value is not None and ctx.errors.get(key) is None:
            ctx.errors[key] = value


def _multi(grader: dict, ctx: _Context, sub_rewards: dict, scores: dict) -> tuple[float | None, str | None]:
    failures = []
    for key, sub in multi_graders(grader["graders"]).items():
        sub_scores: dict = {}
        try:
            sub_rewards[key] = _one(sub, ctx, sub_scores)
        except GradeFailed as exc:
            sub_rewards[key] = 0.0
            _flag(ctx, exc)
            failures.append(f"{key}: {exc.message}")
        scores[key] = {"reward": sub_rewards[key], **({"scores": sub_scores} if sub_scores else {})}
    if failures:
        return None, "; ".join(failures)
    try:
        return evaluate(grader["calculate_output"], sub_rewards), None
    except FormulaError as exc:
        raise GradeFailed(f"calculate_output: {exc}", formula_parse_error=True) from exc


def _render(text: str, ctx: _Context) -> str:
    try:
        return render(text, ctx.item, ctx.sample)
    except MissingVariable as exc:
        if exc.not_json:
            raise GradeFailed(f"{{{{{exc.path}}}}} needs output_json, but the sample is not JSON",
                              sample_parse_error=True) from exc
        raise GradeFailed(f"the template names {{{{{exc.path}}}}}, which does not exist",
                          invalid_variable_error=True) from exc


def _one(grader: dict, ctx: _Context, scores: dict) -> float:
    kind = grader["type"]
    if kind == "string_check":
        text, ref = _render(grader["input"], ctx), _render(grader["reference"], ctx)
        op = grader["operation"]
        hit = {"eq": text == ref, "ne": text != ref, "like": ref in text,
               "ilike": ref.casefold() in text.casefold()}[op]
        return 1.0 if hit else 0.0
    if kind == "text_similarity":
        text, ref = _render(grader["input"], ctx), _render(grader["reference"], ctx)
        try:
            value = similarity(grader["evaluation_metric"], text, ref)
        except Exception as exc:  # noqa: BLE001 - a library failure is this sample's error
            raise GradeFailed(f"{grader['evaluation_metric']}: {exc}", other_error=True) from exc
        scores[grader["evaluation_metric"]] = value
        return value
    if kind == "python":
        return _python(grader, ctx)
    if kind == "score_model":
        return _score_model(grader, ctx, scores)
    return _label_model(grader, ctx, scores)


def _python(grader: dict, ctx: _Context) -> float:
    sandbox = ctx.sandbox
    if sandbox is None:
        if ctx.own_sandbox is None:
            ctx.own_sandbox = PythonSandbox(workers=1)
        sandbox = ctx.own_sandbox
    try:
        return sandbox.run(grader["source"], ctx.sample, ctx.item)
    except SandboxError as exc:
        first = exc.details.strip().splitlines()[-1] if exc.details.strip() else exc.reason
        if exc.kind == "server":
            raise GradeFailed(f"python grader: the sandbox failed: {first}", python_grader_server_error=True,
                              python_grader_server_error_type=exc.reason or "server") from exc
        raise GradeFailed(f"python grader: {first}", python_grader_runtime_error=True,
                          python_grader_runtime_error_details=exc.details,
                          unresponsive_reward_error=exc.reason == "timeout",
                          truncated_observation_error=exc.reason == "output") from exc


# ---- model graders -------------------------------------------------------------------------------------

def _judge_messages(grader: dict, ctx: _Context, instruction: str) -> list[dict]:
    """The grader's input messages rendered to plain chat messages, with our answer-format instruction in the
    system message (developer becomes system: tunekit's chat templates know system)."""
    messages = []
    for message in grader["input"]:
        content = message["content"]
        parts = content if isinstance(content, list) else [content]
        texts = [_render(p if isinstance(p, str) else p.get("text", ""), ctx) for p in parts]
        role = "system" if message["role"] == "developer" else message["role"]
        messages.append({"role": role, "content": "\n".join(texts)})
    if messages and messages[0]["role"] == "system":
        messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{instruction}"}
    else:
        messages.insert(0, {"role": "system", "content": instruction})
    return messages


def _ask(grader: dict, ctx: _Context, instruction: str) -> str:
    if ctx.judge is None:
        raise GradeFailed(f"{grader['type']} needs a judge model, and none was given",
                          model_grader_server_error=True,
                          model_grader_server_error_details="no judge: grade() was called without judge=")
    params = {k: v for k, v in (grader.get("sampling_params") or {}).items() if v is not None}
    messages = _judge_messages(grader, ctx, instruction)
    model = grader["model"]
    ctx.sampled_model_name = model
    try:
        reply = ctx.judge(model, messages, params)
    except Exception as exc:  # noqa: BLE001 - the judge's failure is this sample's error
        raise GradeFailed(f"the judge model {model!r} failed: {exc}", model_grader_server_error=True,
                          model_grader_server_error_details=f"{type(exc).__name__}: {exc}"[:2000]) from exc
    usage = ctx.token_usage.setdefault(model, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                                               "cached_tokens": 0})
    usage["prompt_tokens"] += int(reply.prompt_tokens)
    usage["completion_tokens"] += int(reply.completion_tokens)
    usage["total_tokens"] += int(reply.prompt_tokens) + int(reply.completion_tokens)
    return reply.text if isinstance(reply.text, str) else ""


NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _json_object(text: str):
    """The JSON value of a reply: the whole text, inside a ``` fence, or its first {...} span."""
    text = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    for candidate in (text, fence.group(1) if fence else None,
                      text[text.find("{"): text.rfind("}") + 1] if "{" in text else None):
        if candidate:
            try:
                return json.loads(candidate)
            except ValueError:
                continue
    return None


def parse_score(text: str) -> tuple[float, list] | None:
    """(result, steps) from a judge's reply: {"result": number, "steps": [...]}, or a bare number."""
    value = _json_object(text)
    steps: list = []
    if isinstance(value, dict):
        steps = value.get("steps") if isinstance(value.get("steps"), list) else []
        value = value.get("result")
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        value = float(value.strip())
    if value is None and NUMBER.fullmatch(text.strip()):
        value = float(text.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value), steps


def _score_model(grader: dict, ctx: _Context, scores: dict) -> float:
    lo, hi = grader.get("range") or [0.0, 1.0]
    instruction = (f"Grade the answer as instructed. Reply with only a JSON object: "
                   f'{{"result": <a number from {lo:g} to {hi:g}>, "steps": [{{"description": "<what you checked>", '
                   f'"conclusion": "<what you found>"}}]}}')
    text = _ask(grader, ctx, instruction)
    parsed = parse_score(text)
    if parsed is None:
        raise GradeFailed(f"the judge's reply has no numeric result: {text[:200]!r}", model_grader_parse_error=True)
    result, steps = parsed
    scores.update({"result": result, "steps": steps})
    return min(max(result, float(lo)), float(hi))


def match_label(text: str, labels: list[str]) -> str | None:
    """The label a judge's reply names: the reply itself (or its JSON "label"/"result"), trimmed and compared
    case-insensitively; failing that, the one label that occurs as a whole word in the reply."""
    value = _json_object(text)
    if isinstance(value, dict):
        value = value.get("label", value.get("result"))
    candidates = [value] if isinstance(value, str) else []
    candidates.append(text)
    for candidate in candidates:
        key = candidate.strip().strip("\"'`.").strip().lower()
        for label in labels:
            if label.strip().lower() == key:
                return label
    found = [label for label in labels
             if re.search(rf"(?<!\w){re.escape(label.strip().lower())}(?!\w)", text.lower())]
    return found[0] if len(found) == 1 else None


def _label_model(grader: dict, ctx: _Context, scores: dict) -> float:
    labels = grader["labels"]
    instruction = ("Classify as instructed. Reply with only a JSON object {\"label\": \"<label>\"}, where <label> "
                   "is exactly one of: " + ", ".join(json.dumps(x, ensure_ascii=False) for x in labels))
    text = _ask(grader, ctx, instruction)
    label = match_label(text, labels)
    if label is None:
        raise GradeFailed(f"the judge's reply names none of the labels: {text[:200]!r}",
                          model_grader_parse_error=True)
    scores["label"] = label
    return 1.0 if label in grader["passing_labels"] else 0.0
