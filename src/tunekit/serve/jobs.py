"""`/v1/fine_tuning/jobs`: create, list, retrieve, cancel, pause, resume, events, checkpoints.

Create checks the request's shape at once (model, file ids, hyperparameter ranges, the `tunekit` config
overrides: every problem is a 400 naming its param) and answers `validating_files` at once; the worker
(worker.py) checks the data, resolves "auto" hyperparameters and trains. Data problems fail the job with
OpenAI's error object, never the request. State conflicts (cancel a finished job, resume a running one)
are 400s: the openai SDK retries 409.

`model` is a model this server serves, or an earlier fine-tuned model of the same project, or of another
project that gave this one a checkpoint permission (permissions.py) (its `ft:` name or a checkpoint's
`...:ckpt-step-N` name): continued fine-tuning trains a new LoRA adapter on top of the
earlier adapter merged into its base (tunekit's `model.previous_adapter: merge`).

`method` is `supervised` (the default; chat, completion or text files), `dpo` (preference pairs; tunekit's
`objective: dpo` with the job's `beta`) or `reinforcement` (prompt files and a grader; tunekit's `objective:
grpo` with the grader as `grpo.grader`, docs/grpo.md "Jobs API"). The job stores its method as config values
(`objective: dpo` / `objective: grpo` and `grpo.grader` in its overrides) and its hyperparameters (with `beta`
for DPO, OpenAI's seven RFT keys for reinforcement); `job_json` echoes both in OpenAI's shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, PlainValidator
from pydantic_core import PydanticCustomError

from tunekit.serve.deps import find_model, project_of, store_of, visible_models
from tunekit.serve.errors import APIError
from tunekit.serve.files import find_file, first_format, item_keys
from tunekit.serve.store import new_id, now, page
from tunekit.serve.worker import (
    base_of,
    check_overrides,
    checkpoint_name,
    objective_of,
    request_stop,
    unserve,
)

router = APIRouter()

TERMINAL = ("succeeded", "failed", "cancelled")


# --------------------------------------------------------------------------------------------------
# Request schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _auto_or(low: float, high: float, *, integer: bool, low_open: bool = False):
    """A hyperparameter's type: "auto", null (the same) or a number in range; otherwise one message saying
    what is allowed (pydantic's union would report only its first member, "Input should be 'auto'")."""
    kind = f"an integer from {low:g} to {high:g}" if integer else \
        f"a number {'>' if low_open else '>='} {low:g} and <= {high:g}"

    def check(value):
        if value is None or value == "auto":
            return value
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and (not integer or float(value).is_integer()) and (value > low if low_open else value >= low) \
                and value <= high:
            return int(value) if integer else float(value)
        raise PydanticCustomError("hyperparameter", 'give "auto" or {kind}; got {value}',
                                  {"kind": kind, "value": repr(value)})

    return Annotated[Literal["auto"] | (int if integer else float) | None,
                     PlainValidator(check, json_schema_input_type=Literal["auto"] | float | None)]


class Hyperparameters(_Strict):
    """A method's hyperparameters (and the legacy top-level `hyperparameters`); `beta` is DPO's only."""

    n_epochs: _auto_or(1, 50, integer=True) = None
    batch_size: _auto_or(1, 256, integer=True) = None
    learning_rate_multiplier: _auto_or(0, 100, integer=False, low_open=True) = None
    beta: _auto_or(0, 2, integer=False, low_open=True) = None  # rewards are beta x (policy - reference) log-probs


class MethodConfig(_Strict):
    hyperparameters: Hyperparameters | None = None


def _effort(value):
    if value is None or value in REASONING_EFFORTS:
        return value
    raise PydanticCustomError("hyperparameter", "give one of {allowed} (there is no \"auto\"); got {value}",
                              {"allowed": ", ".join(f'"{e}"' for e in REASONING_EFFORTS), "value": repr(value)})


REASONING_EFFORTS = ("default", "low", "medium", "high")


class RftHyperparameters(_Strict):
    """OpenAI's reinforcement hyperparameters; how each maps onto tunekit: docs/grpo.md "Jobs API"."""

    n_epochs: _auto_or(1, 50, integer=True) = None
    batch_size: _auto_or(1, 256, integer=True) = None  # prompts per optimizer step
    learning_rate_multiplier: _auto_or(0, 100, integer=False, low_open=True) = None
    eval_interval: _auto_or(1, 1_000_000, integer=True) = None  # -> train.eval_every
    eval_samples: _auto_or(1, 100, integer=True) = None  # accepted; validation is greedy, one per prompt
    compute_multiplier: _auto_or(0.00001, 10, integer=False, low_open=True) = None  # -> grpo.group_size
    reasoning_effort: Annotated[Literal["default", "low", "medium", "high"] | None,
                                PlainValidator(_effort, json_schema_input_type=str | None)] = None  # ignored


class ReinforcementConfig(_Strict):
    grader: dict[str, Any]  # checked with the training file's fields by `check_reward`
    hyperparameters: RftHyperparameters | None = None
    response_format: dict[str, Any] | None = None  # only null: structured output is not built


class Method(_Strict):
    type: str  # "supervised" | "dpo" | "reinforcement"; others are refused by `requested_method`
    supervised: MethodConfig | None = None
    dpo: MethodConfig | None = None
    reinforcement: ReinforcementConfig | None = None


class WandbSettings(BaseModel):
    model_config = ConfigDict(extra="ignore")

    project: Annotated[str, Field(min_length=1, max_length=128)]
    name: Annotated[str, Field(max_length=128)] | None = None
    entity: Annotated[str, Field(max_length=128)] | None = None
    tags: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=50)] | None = None


class Integration(_Strict):
    type: Literal["wandb"]
    wandb: WandbSettings


class CreateJob(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    training_file: Annotated[str, Field(min_length=1)]
    validation_file: str | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # the legacy form of method.supervised.hyperparameters
    suffix: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] | None = None
    seed: Annotated[int, Field(ge=0, le=2147483647)] | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None
    integrations: Annotated[list[Integration], Field(max_length=5)] | None = None
    # tunekit config values (nested sections or dotted keys), e.g. {"method": "full", "lora.r": 8}
    tunekit: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------------
# Response schema


class JobError(BaseModel):
    code: str
    message: str
    param: str | None


class ResolvedHyperparameters(BaseModel):
    batch_size: Literal["auto"] | int
    learning_rate_multiplier: Literal["auto"] | float
    n_epochs: Literal["auto"] | int


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: ResolvedHyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None = None
    integrations: list[dict] | None = None
    metadata: dict[str, str] | None = None
    method: dict
    user_provided_suffix: str | None = None


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """OpenAI's list envelope: a page of objects, and whether more follow (`after` = the last id)."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict | None


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, float | None]


class CheckpointPage(Page[Checkpoint]):
    first_id: str | None
    last_id: str | None


HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")  # every method's; DPO adds beta
# reinforcement's beside those (OpenAI's ReinforcementHyperparameters); reasoning_effort has no "auto"
RFT_HYPERPARAMETERS = ("eval_interval", "eval_samples", "compute_multiplier", "reasoning_effort")
# What a job's first record is, by format (the message of a file given to the wrong method)
RECORD_KEYS = {"chat": "messages", "completion": "prompt/completion", "text": "text",
               "preference": "chosen/rejected or preferred_output/non_preferred_output",
               "reinforcement": "messages ending with the user turn to answer, no reply"}
METHOD_OF = {"sft": "supervised", "dpo": "dpo", "grpo": "reinforcement"}  # tunekit objective -> method.type
MODEL_GRADERS = ("score_model", "label_model")


def job_json(job: dict) -> dict:
    hp = job["hyperparameters"]  # DPO: with beta; reinforcement: OpenAI's seven keys
    kind = METHOD_OF[objective_of(job)]
    method = {"hyperparameters": hp}
    if kind == "reinforcement":  # the grader as sent, and response_format (always null here)
        method = {"grader": job["overrides"]["grpo"]["grader"], "hyperparameters": hp, "response_format": None}
    return FineTuningJob(
        id=job["id"], created_at=job["created_at"], error=job["error"], fine_tuned_model=job["fine_tuned_model"],
        finished_at=job["finished_at"], hyperparameters={k: hp[k] for k in HYPERPARAMETERS}, model=job["model"],
        organization_id=f"org-{job['project']}", result_files=job["result_files"], seed=job["seed"],
        status=job["status"], trained_tokens=job["trained_tokens"], training_file=job["training_file"],
        validation_file=job["validation_file"], estimated_finish=job["estimated_finish"],
        integrations=job["integrations"], metadata=job["metadata"],
        method={"type": kind, kind: method},
        user_provided_suffix=job["suffix"]).model_dump()


# --------------------------------------------------------------------------------------------------
# Routes


def _find_job(request: Request, job_id: str) -> dict:
    job = store_of(request).job(project_of(request), job_id)
    if job is None:
        raise APIError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
    return job


def requested_method(body: CreateJob) -> tuple[str, dict]:
    """(method type, hyperparameters: every one not given "auto"; DPO's with beta) of a create request. 400
    naming the field for a method this server does not train, another method's object or hyperparameter, or a
    value given both in the top-level (legacy) `hyperparameters` and the method's that disagree."""
    method = body.method or Method(type="supervised")
    kind = method.type
    if kind not in ("supervised", "dpo", "reinforcement"):
        raise APIError(400, f'method.type must be "supervised", "dpo" or "reinforcement"; got {kind!r}',
                       param="method.type")
    if kind == "reinforcement" and method.reinforcement is None:
        raise APIError(400, "a reinforcement job needs method.reinforcement with its grader (the reward)",
                       param="method.reinforcement",
                       hint='e.g. {"grader": {"type": "string_check", "name": "answer", "input": '
                            '"{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}}')
    for other in ("supervised", "dpo", "reinforcement"):
        if other != kind and getattr(method, other) is not None:
            fix = f'or set method.type "{other}"' if other != "reinforcement" else "and leave method.reinforcement out"
            raise APIError(400, f"method.{other} is given, but method.type is {kind!r}", param=f"method.{other}",
                           hint=f"give the hyperparameters as method.{kind}.hyperparameters, {fix}")
    given, legacy = (getattr(method, kind) or MethodConfig()).hyperparameters, body.hyperparameters
    if kind == "reinforcement" and method.reinforcement.response_format is not None:
        raise APIError(400, "response_format (structured output for the samples) is not supported by this server "
                            "yet", param="method.reinforcement.response_format",
                       hint="leave it out and ask for JSON in the prompt: a reply that parses as JSON is the "
                            "grader's {{sample.output_json}} all the same")
    if legacy is not None and legacy.beta is not None:
        raise APIError(400, "beta is a DPO hyperparameter, not one of the top-level (legacy) hyperparameters",
                       param="hyperparameters.beta", hint='give it as method.dpo.hyperparameters.beta, with '
                                                          'method.type "dpo"')
    if kind == "supervised" and given is not None and given.beta is not None:
        raise APIError(400, "beta is a DPO hyperparameter; a supervised job has none",
                       param="method.supervised.hyperparameters.beta",
                       hint='set method.type "dpo" and give it as method.dpo.hyperparameters.beta, or leave it out')
    hp = {}
    for key in HYPERPARAMETERS + (("beta",) if kind == "dpo" else ()):
        mine, old = getattr(given, key, None), getattr(legacy, key, None)
        if mine is not None and old is not None and mine != old:
            raise APIError(400, f"hyperparameters.{key} ({old!r}) disagrees with method.{kind}.hyperparameters."
                                f"{key} ({mine!r})", param=f"hyperparameters.{key}",
                           hint=f"give it once, in method.{kind}.hyperparameters (the top-level hyperparameters "
                                "are the legacy form of the same values)")
        value = mine if mine is not None else old
        hp[key] = "auto" if value is None else value
    if kind == "reinforcement":
        for key in RFT_HYPERPARAMETERS:
            value = getattr(given, key, None)
            hp[key] = value if value is not None else "default" if key == "reasoning_effort" else "auto"
    return kind, hp


def check_reward(grader: dict, path) -> None:
    """A reinforcement job's grader against the fields of its training file's first lines: 400 listing every
    problem, `param` the JSON path of the first (method.reinforcement.grader...)."""
    from tunekit.eval.graders import check_grader
    from tunekit.train.grpo import REWARD_TYPES

    problems = check_grader(grader, item_keys=item_keys(path), where="method.reinforcement.grader",
                            allowed=REWARD_TYPES)
    if problems:
        message = "; ".join(f"{p.where}: {p.message}" + (f" ({p.hint})" if p.hint else "") for p in problems)
        raise APIError(400, f"invalid grader: {message}", param=problems[0].where)


def reward_judges(state, project: str, grader: dict) -> dict[str, str]:
    """The judges of a reinforcement job's model graders (score_model, or label_model inside a multi): each
    grader's `model` must be a model this project may use here (a served model, one of its fine-tuned models or
    checkpoints, or one shared with it), which answers in the training process; else a 400 naming the grader's
    `model` (model_not_found)."""
    from tunekit.eval.graders import multi_graders

    where = "method.reinforcement.grader"
    subs = multi_graders(grader.get("graders")) if grader.get("type") == "multi" else None
    judges: dict[str, str] = {}
    for name, sub in [(None, grader)] + list((subs or {}).items()):
        if not isinstance(sub, dict) or sub.get("type") not in MODEL_GRADERS:
            continue
        model = sub["model"]
        served = visible_models(state, project).get(model)
        at = f"{where}.model" if name is None else f"{where}.graders.{name}.model"
        if served is None:
            raise APIError(400, f"{at}: the judge model {model!r} is not served here (models: "
                                f"{', '.join(sorted(visible_models(state, project))) or 'none'})", param=at,
                           code="model_not_found", hint="name a model this server serves (`tunekit serve --model`) "
                                                        "or a fine-tuned model of this project: it answers each grade "
                                                        "during training")
        judges[model] = served.path
    return judges


def _check_format(path, row: dict, param: str, kind: str) -> None:
    """A file of the other method's kind (a preference file for a supervised job, chat data for a DPO job) is a
    400 at create, naming its first record's line, not a job that fails in training."""
    found = first_format(path)
    if found is None:
        return
    line, fmt = found
    if kind == "reinforcement" and fmt != "reinforcement":
        raise APIError(400, f"{row['id']} ({row['filename']}) line {line} is a {fmt} example ({RECORD_KEYS[fmt]}), but "
                            "a reinforcement job trains on prompts: messages ending with the user turn the model "
                            "answers, no reply", param=param,
                       hint='give lines of {"messages": [{"role": "user", "content": ...}], ...fields the grader '
                            'reads as {{item.FIELD}}}, or set method.type "supervised"')
    if kind == "supervised" and fmt == "reinforcement":
        raise APIError(400, f"{row['id']} ({row['filename']}) line {line} is a reinforcement prompt "
                            f"({RECORD_KEYS[fmt]}), but a supervised job trains on examples with the reply",
                       param=param, hint='set method {"type": "reinforcement"} with a grader to train on prompts, '
                                         'or give lines whose messages end with the assistant reply')
    if kind == "supervised" and fmt == "preference":
        raise APIError(400, f"{row['id']} ({row['filename']}) line {line} is a preference pair ({RECORD_KEYS[fmt]}), "
                            "but a supervised job trains on chat, completion or text examples", param=param,
                       hint='set method {"type": "dpo"} to train on preference pairs, or give a file of '
                            '{"messages": [...]} lines')
    if kind == "dpo" and fmt != "preference":
        raise APIError(400, f"{row['id']} ({row['filename']}) line {line} is a {fmt} example ({RECORD_KEYS[fmt]}), but "
                            "a DPO job trains on preference pairs", param=param,
                       hint='give lines of {"input": {"messages": [...]}, "preferred_output": [...], '
                            '"non_preferred_output": [...]}, or set method.type "supervised"')


@router.post("/v1/fine_tuning/jobs", response_model=FineTuningJob)
def create_job(request: Request, body: CreateJob) -> dict:
    store = store_of(request)
    project = project_of(request)
    kind, hp = requested_method(body)
    base, root, context = base_of(request.app.state, project, body.model)
    training = find_file(request, body.training_file, "training_file", status=400)
    files = [("training_file", training)]
    if body.validation_file is not None:
        files.append(("validation_file", find_file(request, body.validation_file, "validation_file", status=400)))
    for param, row in files:
        _check_format(store.blob_path(row["sha256"]), row, param, kind)
    objective = {v: k for k, v in METHOD_OF.items()}[kind]
    grader = body.method.reinforcement.grader if kind == "reinforcement" else None
    if grader is not None:
        check_reward(grader, store.blob_path(training["sha256"]))
    judges = reward_judges(request.app.state, project, grader) if grader is not None else {}
    overrides = check_overrides(body.tunekit or {}, context, objective=objective, grader=grader, hp=hp,
                                judges=judges)
    job_id = new_id("ftjob-")
    seed = body.seed if body.seed is not None else int.from_bytes(job_id.encode()[-4:], "big") % 2147483647
    integrations = [i.model_dump() for i in body.integrations] if body.integrations else None
    job = {"id": job_id, "project": project, "created_at": now(), "status": "validating_files",
           "model": body.model, "base": base, "root_model": root, "training_file": training["id"],
           "validation_file": body.validation_file, "suffix": body.suffix, "seed": seed,
           "metadata": body.metadata, "integrations": integrations, "hyperparameters": hp,
           "overrides": overrides, "result_files": []}
    store.add_job(job)
    store.add_event(job_id, f"Created fine-tuning job: {job_id}", key="created")
    store.add_event(job_id, f"Validating training file: {training['id']}"
                    + (f" and validation file: {body.validation_file}" if body.validation_file else ""),
                    key="validating")
    request.app.state.worker.wake()
    return job_json(store.job(project, job_id))


@router.get("/v1/fine_tuning/jobs", response_model=Page[FineTuningJob])
def list_jobs(request: Request, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict:
    rows = store_of(request).jobs(project_of(request))
    wanted = _metadata_filter(request)
    if wanted == {}:
        rows = [r for r in rows if not r["metadata"]]
    elif wanted is not None:
        rows = [r for r in rows if all((r["metadata"] or {}).get(k) == v for k, v in wanted.items())]
    rows, more = page(rows, after, limit)
    return {"object": "list", "data": [job_json(r) for r in rows], "has_more": more}


def _metadata_filter(request: Request) -> dict | None:
    """`metadata[k]=v` query pairs (the SDK's deep-object form) as a dict; `metadata=null`: jobs without
    metadata ({}); neither: None (no filter)."""
    pairs = {k[len("metadata["):-1]: v for k, v in request.query_params.multi_items()
             if k.startswith("metadata[") and k.endswith("]")}
    if pairs:
        return pairs
    if request.query_params.get("metadata") == "null":
        return {}
    return None


@router.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}", response_model=FineTuningJob)
def retrieve_job(request: Request, fine_tuning_job_id: str) -> dict:
    return job_json(_find_job(request, fine_tuning_job_id))


def _transition(request: Request, job_id: str, allowed: tuple[str, ...], to: str, verb: str,
                message: str, **fields) -> dict:
    store = store_of(request)
    job = _find_job(request, job_id)
    if job["status"] not in allowed or not store.set_job(job_id, when_status=allowed, status=to, **fields):
        job = _find_job(request, job_id)
        raise APIError(400, f"cannot {verb} job {job_id}: it is {job['status']} (only {' or '.join(allowed)} "
                            f"jobs can be {'cancelled' if verb == 'cancel' else verb + 'd'})", param="fine_tuning_job_id", code="invalid_job_state")
    store.add_event(job_id, message)
    request.app.state.worker.wake()
    return job_json(_find_job(request, job_id))


@router.post("/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel", response_model=FineTuningJob)
def cancel_job(request: Request, fine_tuning_job_id: str) -> dict:
    return _transition(request, fine_tuning_job_id, ("validating_files", "queued", "running", "paused"),
                       "cancelled", "cancel", "Fine-tuning job cancelled", finished_at=now(), estimated_finish=None)


@router.post("/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause", response_model=FineTuningJob)
def pause_job(request: Request, fine_tuning_job_id: str) -> dict:
    job = _transition(request, fine_tuning_job_id, ("running",), "paused", "pause",
                      "Pausing fine-tuning job: a checkpoint is written after the current step",
                      estimated_finish=None)
    request_stop(store_of(request), fine_tuning_job_id)
    return job


@router.post("/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume", response_model=FineTuningJob)
def resume_job(request: Request, fine_tuning_job_id: str) -> dict:
    return _transition(request, fine_tuning_job_id, ("paused",), "queued", "resume",
                       "Resuming fine-tuning job from its last checkpoint")


@router.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}/events", response_model=Page[JobEvent])
def list_events(request: Request, fine_tuning_job_id: str, after: str | None = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict:
    _find_job(request, fine_tuning_job_id)
    rows, more = page(store_of(request).events(fine_tuning_job_id), after, limit)
    data = [{"id": r["id"], "object": "fine_tuning.job.event", "created_at": r["created_at"], "level": r["level"],
             "message": r["message"], "type": r["type"], "data": r["data"]} for r in rows]
    return {"object": "list", "data": data, "has_more": more}


@router.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints", response_model=CheckpointPage)
def list_checkpoints(request: Request, fine_tuning_job_id: str, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 10) -> dict:
    job = _find_job(request, fine_tuning_job_id)
    # kept checkpoints only: training keeps the last few (train.keep_last) and deletes older ones
    rows = [r for r in store_of(request).checkpoints(fine_tuning_job_id) if Path(r["path"]).is_dir()]
    rows, more = page(rows, after, limit)
    data = [{"id": r["id"], "object": "fine_tuning.job.checkpoint", "created_at": r["created_at"],
             "fine_tuned_model_checkpoint": checkpoint_name(job, r["step"]), "fine_tuning_job_id": job["id"],
             "step_number": r["step"], "metrics": r["metrics"]} for r in rows]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


class Rollout(BaseModel):
    """One completion a reinforcement job sampled and graded (a tunekit extension of the jobs API)."""

    object: Literal["fine_tuning.job.rollout"] = "fine_tuning.job.rollout"
    step: int
    prompt: str | None  # the prompt's last turn
    completion: str | None  # the text the grader read
    reward: float
    advantage: float
    grader_error: bool
    tokens: int


class RolloutPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[Rollout]
    has_more: bool


@router.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}/rollouts", response_model=RolloutPage)
def list_rollouts(request: Request, fine_tuning_job_id: str,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 16) -> dict:
    """The newest `limit` sampled completions of a reinforcement job with their grades, newest step first: at each
    logged step, the completions of the step's first prompt (RUN_DIR/rollouts.jsonl). Another kind of job: a 400."""
    import json

    job = _find_job(request, fine_tuning_job_id)
    if objective_of(job) != "grpo":
        raise APIError(400, f"job {fine_tuning_job_id} is a {METHOD_OF[objective_of(job)]} job: only reinforcement "
                            "jobs sample completions", param="fine_tuning_job_id")
    path = store_of(request).dir / "jobs" / job["id"] / "run" / "rollouts.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    rows = []
    for line in lines:
        try:
            rows.append(Rollout.model_validate(json.loads(line)).model_dump())
        except ValueError:  # a line being written as this reads
            continue
    rows.sort(key=lambda r: -r["step"])  # stable: a step's completions keep their order
    return {"object": "list", "data": rows[:limit], "has_more": len(rows) > limit}


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


@router.delete("/v1/models/{model_id:path}", response_model=ModelDeleted)
def delete_model(request: Request, model_id: str) -> dict:
    """Stop serving a fine-tuned model of this project (and its checkpoints); its job and files stay."""
    store, state = store_of(request), request.app.state
    find_model(request, model_id)  # another project's model does not exist here
    owner = state.model_owner.get(model_id)
    if owner is not None and owner != project_of(request):  # shared with this project (permissions.py)
        raise APIError(403, f"{model_id!r} belongs to another project, which shared it with this one: only its "
                            "own project can delete it", param="model", code="permission_denied")
    job = store.job_by_model(model_id) if owner is not None else None
    if job is None:
        raise APIError(400, f"{model_id!r} is not a fine-tuned model (a served base or a checkpoint): only "
                            "fine-tuned models can be deleted", param="model")
    store.set_job(job["id"], model_deleted_at=now())
    unserve(state, job)
    return {"id": model_id, "object": "model", "deleted": True}
