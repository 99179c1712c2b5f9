"""`/v1/evals`: OpenAI's Evals API. Evals (create, retrieve, update, list, delete), their runs (create, retrieve,
list, cancel, delete) and the runs' output items (list, retrieve).

An eval is a `custom` data source config (the JSON Schema of one item, `item_schema`) and testing criteria
(graders: string_check, text_similarity, python, score_model, label_model). Create checks every criterion at
once (`tunekit.eval.graders.check_grader`, with the item keys of `item_schema`'s properties; judges' models
must be served here) and answers a 400 listing every problem, `param` naming the first JSON path
(`testing_criteria[1].operation`). The eval echoes the config in OpenAI's response form,
`{"type": "custom", "schema": {"type": "object", "properties": {"item": ..., "sample"?: ...}, "required": [...]}}`,
and each criterion with the `id` ("NAME-UUID") that run results name.

A run's data source is `jsonl` (rows that bring their own sample) or `completions` (each row's prompt is
rendered from `input_messages` and sampled from `model`, any model served to the project: a base model or an
`ft:` model). Rows come inline (`file_content`: every item is checked against `item_schema` at create, a
mismatch is a 400 naming `data_source.source.content[i].item`) or from an uploaded file (`file_id`: read when
the run executes; a line that is not JSON or whose item does not match the schema becomes an errored output
item, so one bad line does not lose the others). Create answers `queued` at once; eval_runner.py executes
runs in the background. State conflicts (cancel a finished run) are 400s: the openai SDK retries 409.

Another project's eval, run or output item does not exist for a request (404), as with files and jobs.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunekit.serve.deps import project_of, store_of, visible_models
from tunekit.serve.errors import APIError
from tunekit.serve.files import find_file
from tunekit.serve.graders import grader_problems, message_text, refuse
from tunekit.serve.store import now, page

router = APIRouter()

CRITERIA_TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model")  # no multi
RUN_STATUSES = ("queued", "in_progress", "completed", "canceled", "failed")
ACTIVE = ("queued", "in_progress")
NO_ERROR = {"code": "", "message": ""}  # the SDK requires an error object on every run and sample
ROLES = ("user", "assistant", "system", "developer")
INLINE_PROBLEMS = 5  # item problems named in a 400
# The `sample` namespace criteria read (tunekit.eval.graders.make_sample), as the eval's sample schema
SAMPLE_SCHEMA = {"type": "object", "properties": {
    "model": {"type": "string"}, "output_text": {"type": "string"}, "output_json": {"type": "object"},
    "output_tools": {"type": "array", "items": {"type": "object"}}, "choices": {"type": "array",
                                                                           "items": {"type": "object"}}},
    "required": ["output_text", "choices"]}


def hex_id(prefix: str) -> str:
    """OpenAI's eval ids: `eval_`, `evalrun_`, `outputitem_` + 32 hex digits."""
    return prefix + secrets.token_hex(16)


# --------------------------------------------------------------------------------------------------
# Request schema (unknown fields ignored; configs and data sources are checked by hand to name the param)

Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                     Field(max_length=16)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CreateEval(_Lenient):
    data_source_config: dict[str, Any]
    testing_criteria: Annotated[list[dict[str, Any]], Field(min_length=1)]
    name: str | None = None
    metadata: Metadata | None = None


class UpdateEval(_Lenient):
    name: str | None = None
    metadata: Metadata | None = None


class CreateRun(_Lenient):
    data_source: dict[str, Any]
    name: str | None = None
    metadata: Metadata | None = None


class SamplingParams(_Lenient):
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: int | None = None
    reasoning_effort: str | None = None  # accepted, not used: served models have no effort setting
    response_format: dict[str, Any] | None = None  # output_json is parsed from the text (decoding is not constrained)
    tools: list[dict[str, Any]] | None = None


# --------------------------------------------------------------------------------------------------
# Response schema


class EvalObject(BaseModel):
    object: Literal["eval"] = "eval"
    id: str
    name: str
    created_at: int
    metadata: dict[str, str]
    data_source_config: dict[str, Any]
    testing_criteria: list[dict[str, Any]]


class ResultCounts(BaseModel):
    total: int
    errored: int
    failed: int
    passed: int


class ModelUsage(BaseModel):
    model_name: str
    invocation_count: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int


class CriterionResult(BaseModel):
    testing_criteria: str
    passed: int
    failed: int


class ErrorObject(BaseModel):
    code: str
    message: str


class RunObject(BaseModel):
    object: Literal["eval.run"] = "eval.run"
    id: str
    eval_id: str
    name: str
    model: str
    status: str
    created_at: int
    report_url: str
    result_counts: ResultCounts
    per_model_usage: list[ModelUsage]
    per_testing_criteria_results: list[CriterionResult]
    data_source: dict[str, Any]
    error: ErrorObject
    metadata: dict[str, str]


class OutputItem(BaseModel):
    object: Literal["eval.run.output_item"] = "eval.run.output_item"
    id: str
    run_id: str
    eval_id: str
    created_at: int
    status: str  # "pass" | "fail" | "error"
    datasource_item_id: int
    datasource_item: dict[str, Any]
    results: list[dict[str, Any]]
    sample: dict[str, Any]


class Deleted(BaseModel):
    object: str
    deleted: bool


class EvalDeleted(Deleted):
    eval_id: str


class RunDeleted(Deleted):
    run_id: str


class ListPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


def eval_json(row: dict) -> dict:
    config = row["data_source_config"]  # the request form: {type, item_schema, include_sample_schema}
    properties, required = {"item": config["item_schema"]}, ["item"]
    if config["include_sample_schema"]:
        properties["sample"], required = SAMPLE_SCHEMA, ["item", "sample"]
    return {"object": "eval", "id": row["id"], "name": row["name"], "created_at": row["created_at"],
            "metadata": row["metadata"] or {},
            "data_source_config": {"type": "custom", "schema": {"type": "object", "properties": properties,
                                                                "required": required}},
            "testing_criteria": row["testing_criteria"]}


def run_json(row: dict) -> dict:
    return {"object": "eval.run", "id": row["id"], "eval_id": row["eval_id"], "name": row["name"],
            "model": row["model"], "status": row["status"], "created_at": row["created_at"],
            "report_url": row["report_url"], "result_counts": row["result_counts"],
            "per_model_usage": row["per_model_usage"],
            "per_testing_criteria_results": row["per_testing_criteria_results"],
            "data_source": row["data_source"], "error": row["error"] or NO_ERROR, "metadata": row["metadata"] or {}}


def item_json(row: dict) -> dict:
    return {"object": "eval.run.output_item", "id": row["id"], "run_id": row["run_id"], "eval_id": row["eval_id"],
            "created_at": row["created_at"], "status": row["status"],
            "datasource_item_id": row["datasource_item_id"], "datasource_item": row["datasource_item"],
            "results": row["results"], "sample": row["sample"]}


def list_json(data: list[dict], more: bool) -> dict:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


# --------------------------------------------------------------------------------------------------
# Checks


def item_validator(schema: dict):
    """A jsonschema validator of `schema` (the draft its `$schema` names, else the latest). `$ref`s resolve
    inside the schema only: nothing is fetched."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema)


def item_problems(validator, item: Any) -> list[str]:
    """Each way `item` breaks the eval's item_schema, as "PATH: message" (the item itself is `item`)."""
    try:
        errors = sorted(validator.iter_errors(item), key=lambda e: list(map(str, e.absolute_path)))
    except Exception as exc:  # a $ref that resolves nowhere, met on this item's path
        return [f"item: the item_schema cannot be applied: {type(exc).__name__}: {exc}"]
    out = []
    for error in errors:
        where = "item" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        out.append(f"{where}: {error.message}")
    return out


def _check_config(config: dict) -> dict:
    """The request's data_source_config, checked, in the form kept: {type, item_schema, include_sample_schema}."""
    import jsonschema

    kind = config.get("type")
    if kind in ("logs", "stored_completions"):
        raise APIError(400, f"data_source_config type {kind!r} reads stored chat completions, which this server "
                            "does not keep", param="data_source_config.type",
                       hint='use {"type": "custom", "item_schema": {...}} and give the rows in each run')
    if kind != "custom":
        raise APIError(400, f'data_source_config.type must be "custom"; got {kind!r}', param="data_source_config.type")
    schema = config.get("item_schema")
    if not isinstance(schema, dict):
        raise APIError(400, "data_source_config.item_schema must be a JSON Schema object (the schema of one item)",
                       param="data_source_config.item_schema",
                       hint='e.g. {"type": "object", "properties": {"question": {"type": "string"}}}')
    if not isinstance(schema.get("$schema", ""), str):
        raise APIError(400, "data_source_config.item_schema.$schema must be a string (a metaschema URI)",
                       param="data_source_config.item_schema")
    try:
        validator = item_validator(schema)
        validator.check_schema(schema)
        list(validator.iter_errors({}))  # a top-level $ref that resolves nowhere fails here, not in every run
    except jsonschema.SchemaError as exc:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.absolute_path)
        raise APIError(400, f"data_source_config.item_schema is not a valid JSON Schema: {path or '(root)'}: "
                            f"{exc.message}", param="data_source_config.item_schema") from None
    except Exception as exc:  # referencing's Unresolvable (remote $refs are never fetched)
        raise APIError(400, f"data_source_config.item_schema cannot be applied: {type(exc).__name__}: {exc}",
                       param="data_source_config.item_schema",
                       hint="keep every $ref inside the schema (e.g. #/$defs/NAME)") from None
    include = config.get("include_sample_schema")
    if include is not None and not isinstance(include, bool):
        raise APIError(400, "data_source_config.include_sample_schema must be true or false",
                       param="data_source_config.include_sample_schema")
    return {"type": "custom", "item_schema": schema, "include_sample_schema": bool(include)}


def _check_criteria(request: Request, criteria: list[dict], config: dict) -> list[dict]:
    """Every criterion checked (400 listing every problem), each returned with its `id`."""
    properties = config["item_schema"].get("properties")
    item_keys = set(properties) if isinstance(properties, dict) else None
    state, project = request.app.state, project_of(request)
    problems = []
    for i, criterion in enumerate(criteria):
        where = f"testing_criteria[{i}]"
        found = grader_problems(state, project, criterion, where=where, allowed=CRITERIA_TYPES, item_keys=item_keys)
        if not found and criterion.get("type") == "text_similarity" and not _number(criterion.get("pass_threshold")):
            found = [(f"{where}.pass_threshold", "a text_similarity criterion needs pass_threshold (a number: the "
                                                 "score at or above which an item passes)")]
        problems += found
    if problems:
        raise refuse(problems, "testing_criteria")
    return [{**c, "id": f"{c['name']}-{uuid.uuid4()}"} for c in criteria]


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_source(request: Request, source: Any, validator, kind: str) -> dict:
    """The run's `source`, checked: inline rows against the item schema (400 naming the first bad row's
    item), a file id against the project's files."""
    if not isinstance(source, dict):
        raise APIError(400, "data_source.source must be an object", param="data_source.source")
    stype = source.get("type")
    if stype in ("stored_completions", "responses"):
        raise APIError(400, f"data_source.source type {stype!r} reads stored completions or responses, which this "
                            "server does not keep", param="data_source.source.type",
                       hint='give the rows inline ({"type": "file_content", "content": [{"item": {...}}]}) or as an '
                            'uploaded JSONL file ({"type": "file_id", "id": "file-..."})')
    if stype == "file_id":
        file_id = source.get("id")
        if not isinstance(file_id, str):
            raise APIError(400, "data_source.source.id must be a file id", param="data_source.source.id")
        find_file(request, file_id, "data_source.source.id", status=400)
        return {"type": "file_id", "id": file_id}
    if stype != "file_content":
        raise APIError(400, f'data_source.source.type must be "file_content" or "file_id"; got {stype!r}',
                       param="data_source.source.type")
    content = source.get("content")
    if not isinstance(content, list) or not content:
        raise APIError(400, "data_source.source.content must be a non-empty list of {\"item\": {...}} rows",
                       param="data_source.source.content")
    problems: list[tuple[str, str]] = []
    rows = []
    for i, row in enumerate(content):
        where = f"data_source.source.content[{i}]"
        if not isinstance(row, dict) or not isinstance(row.get("item"), dict):
            problems.append((f"{where}.item", "each row must be an object with an \"item\" object"))
            continue
        if row.get("sample") is not None and not isinstance(row["sample"], dict):
            problems.append((f"{where}.sample", "a row's sample must be an object (e.g. {\"output_text\": ...})"))
            continue
        problems += [(f"{where}.item", p) for p in item_problems(validator, row["item"])]
        rows.append({"item": row["item"], **({"sample": row["sample"]} if row.get("sample") is not None else {})})
    if problems:
        shown = "; ".join(f"{w}: {m}" for w, m in problems[:INLINE_PROBLEMS])
        more = f"; and {len(problems) - INLINE_PROBLEMS} more" if len(problems) > INLINE_PROBLEMS else ""
        raise APIError(400, f"{len(problems)} row problem(s) against the eval's item_schema: {shown}{more}",
                       param=problems[0][0], code="invalid_item",
                       hint="make each item match data_source_config.item_schema, or update the schema in a new eval")
    return {"type": "file_content", "content": rows}


def _check_messages(messages: Any) -> dict:
    """`input_messages`: a template (normalised to OpenAI's echo form) or an item reference."""
    from tunekit.eval.graders.template import parse_path, template_paths

    param = "data_source.input_messages"
    if not isinstance(messages, dict):
        raise APIError(400, "a completions run needs input_messages: {\"type\": \"template\", \"template\": "
                            "[...]} or {\"type\": \"item_reference\", \"item_reference\": \"item.FIELD\"}", param=param)
    kind = messages.get("type")
    if kind == "item_reference":
        ref = messages.get("item_reference")
        if not isinstance(ref, str) or not ref.startswith("item."):
            raise APIError(400, "input_messages.item_reference must name an item field, e.g. \"item.messages\"",
                           param=f"{param}.item_reference")
        return {"type": "item_reference", "item_reference": ref}
    if kind != "template":
        raise APIError(400, f'input_messages.type must be "template" or "item_reference"; got {kind!r}',
                       param=f"{param}.type")
    template = messages.get("template")
    if not isinstance(template, list) or not template:
        raise APIError(400, "input_messages.template must be a non-empty list of messages", param=f"{param}.template")
    out = []
    for i, entry in enumerate(template):
        where = f"{param}.template[{i}]"
        if not isinstance(entry, dict) or entry.get("role") not in ROLES:
            raise APIError(400, f"each template message needs a role ({', '.join(ROLES)}) and content",
                           param=f"{where}.role")
        try:
            text = message_text(entry.get("content"))
        except ValueError as exc:
            raise APIError(400, str(exc), param=f"{where}.content") from None
        for expr in template_paths(text):
            try:
                steps = parse_path(expr)
            except ValueError as exc:
                raise APIError(400, str(exc), param=f"{where}.content") from None
            if steps[0] != "item":
                raise APIError(400, f"{{{{{expr}}}}}: a prompt can use item.* variables only (the sample does not "
                                    "exist before the model answers)", param=f"{where}.content")
        out.append({"type": "message", "role": entry["role"], "content": {"type": "input_text", "text": text}})
    return {"type": "template", "template": out}


def _check_data_source(request: Request, ds: dict, ev: dict) -> tuple[dict, str]:
    """(the data source as it is kept and echoed, the model under test or "")."""
    kind = ds.get("type")
    if kind == "responses":
        raise APIError(400, "the responses data source (OpenAI's Responses API) is not supported by this server",
                       param="data_source.type", hint='use {"type": "completions", "model": ..., ...}')
    if kind not in ("jsonl", "completions"):
        raise APIError(400, f'data_source.type must be "jsonl" or "completions"; got {kind!r}',
                       param="data_source.type")
    validator = item_validator(ev["data_source_config"]["item_schema"])
    source = _check_source(request, ds.get("source"), validator, kind)
    if kind == "jsonl":
        return {"type": "jsonl", "source": source}, ""
    model = ds.get("model")
    models = visible_models(request.app.state, project_of(request))
    if not isinstance(model, str) or model not in models:
        raise APIError(400, f"data_source.model {model!r} is not served here (models: "
                            f"{', '.join(sorted(models)) or 'none'}): give a served model or an ft: model of this "
                            "project", param="data_source.model", code="model_not_found")
    try:
        params = SamplingParams.model_validate(ds.get("sampling_params") or {})
    except ValidationError as exc:
        errors = [{**e, "loc": ("data_source", "sampling_params", *e["loc"])} for e in exc.errors()]
        raise APIError.from_validation(errors) from None
    fmt = params.response_format
    if fmt is not None and fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(400, 'sampling_params.response_format.type must be "text", "json_object" or "json_schema"',
                       param="data_source.sampling_params.response_format.type")
    for i, tool in enumerate(params.tools or []):
        if tool.get("type") != "function" or not isinstance((tool.get("function") or {}).get("name"), str):
            raise APIError(400, 'each tool must be {"type": "function", "function": {"name": ..., ...}}',
                           param=f"data_source.sampling_params.tools[{i}]")
    out = {"type": "completions", "source": source, "model": model,
           "input_messages": _check_messages(ds.get("input_messages")),
           "sampling_params": params.model_dump(exclude_none=True)}
    return out, model


# --------------------------------------------------------------------------------------------------
# Routes: evals


def find_eval(request: Request, eval_id: str) -> dict:
    row = store_of(request).eval(project_of(request), eval_id)
    if row is None:
        raise APIError(404, f"No such eval: {eval_id}", param="eval_id")
    return row


@router.post("/v1/evals", response_model=EvalObject)
def create_eval(request: Request, body: CreateEval) -> dict:
    store = store_of(request)
    config = _check_config(body.data_source_config)
    criteria = _check_criteria(request, body.testing_criteria, config)
    created = now()
    row = {"id": hex_id("eval_"), "project": project_of(request), "created_at": created, "updated_at": created,
           "name": body.name or "", "metadata": body.metadata, "data_source_config": config,
           "testing_criteria": criteria}
    store.add_eval(row)
    return eval_json(row)


@router.get("/v1/evals", response_model=ListPage)
def list_evals(request: Request, after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20,
               order: Literal["asc", "desc"] = "asc",
               order_by: Literal["created_at", "updated_at"] = "created_at") -> dict:
    rows = store_of(request).evals(project_of(request))  # by seq: creation order
    if order_by == "updated_at":
        rows = sorted(rows, key=lambda r: (r["updated_at"], r["seq"]))
    if order == "desc":
        rows = rows[::-1]
    rows, more = page(rows, after, limit)
    return list_json([eval_json(r) for r in rows], more)


@router.get("/v1/evals/{eval_id}", response_model=EvalObject)
def retrieve_eval(request: Request, eval_id: str) -> dict:
    return eval_json(find_eval(request, eval_id))


@router.post("/v1/evals/{eval_id}", response_model=EvalObject)
def update_eval(request: Request, eval_id: str, body: UpdateEval) -> dict:
    find_eval(request, eval_id)
    fields: dict[str, Any] = {"updated_at": now()}
    if body.name is not None:
        fields["name"] = body.name
    if body.metadata is not None:
        fields["metadata"] = body.metadata
    store_of(request).set_eval(eval_id, **fields)
    return eval_json(find_eval(request, eval_id))


@router.delete("/v1/evals/{eval_id}", response_model=EvalDeleted)
def delete_eval(request: Request, eval_id: str) -> dict:
    """The eval, its runs (running ones are cancelled first) and their output items."""
    store = store_of(request)
    find_eval(request, eval_id)
    for run in store.eval_runs(eval_id, status=ACTIVE):
        store.set_eval_run(run["id"], when_status=ACTIVE, status="canceled", finished_at=now())
    store.delete_eval(eval_id)
    return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}


# --------------------------------------------------------------------------------------------------
# Routes: runs


def find_run(request: Request, eval_id: str, run_id: str) -> dict:
    find_eval(request, eval_id)
    row = store_of(request).eval_run(project_of(request), eval_id, run_id)
    if row is None:
        raise APIError(404, f"No such eval run: {run_id}", param="run_id")
    return row


@router.post("/v1/evals/{eval_id}/runs", response_model=RunObject)
def create_run(request: Request, eval_id: str, body: CreateRun) -> dict:
    store = store_of(request)
    ev = find_eval(request, eval_id)
    data_source, model = _check_data_source(request, body.data_source, ev)
    run_id = hex_id("evalrun_")
    row = {"id": run_id, "eval_id": eval_id, "project": project_of(request), "created_at": now(),
           "name": body.name or model or "jsonl", "model": model, "status": "queued", "data_source": data_source,
           "metadata": body.metadata, "error": None,
           "report_url": f"{str(request.base_url).rstrip('/')}/#/evals/{eval_id}",  # the dashboard's eval page
           "result_counts": {"total": 0, "errored": 0, "failed": 0, "passed": 0}, "per_model_usage": [],
           "per_testing_criteria_results": [{"testing_criteria": c["id"], "passed": 0, "failed": 0}
                                            for c in ev["testing_criteria"]]}
    store.add_eval_run(row)
    request.app.state.eval_runner.wake()
    return run_json(store.eval_run(row["project"], eval_id, run_id))


@router.get("/v1/evals/{eval_id}/runs", response_model=ListPage)
def list_runs(request: Request, eval_id: str, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20, order: Literal["asc", "desc"] = "asc",
              status: Literal["queued", "in_progress", "completed", "canceled", "failed"] | None = None) -> dict:
    find_eval(request, eval_id)
    rows = store_of(request).eval_runs(eval_id, status=[status] if status else None)
    rows, more = page(rows if order == "asc" else rows[::-1], after, limit)
    return list_json([run_json(r) for r in rows], more)


@router.get("/v1/evals/{eval_id}/runs/{run_id}", response_model=RunObject)
def retrieve_run(request: Request, eval_id: str, run_id: str) -> dict:
    return run_json(find_run(request, eval_id, run_id))


@router.post("/v1/evals/{eval_id}/runs/{run_id}/cancel", response_model=RunObject)
@router.post("/v1/evals/{eval_id}/runs/{run_id}", response_model=RunObject)  # the spec's path for cancel
def cancel_run(request: Request, eval_id: str, run_id: str) -> dict:
    store = store_of(request)
    run = find_run(request, eval_id, run_id)
    if run["status"] not in ACTIVE or not store.set_eval_run(run_id, when_status=ACTIVE, status="canceled",
                                                             finished_at=now()):
        run = find_run(request, eval_id, run_id)
        raise APIError(400, f"cannot cancel run {run_id}: it is {run['status']} (only queued or in_progress runs "
                            "can be canceled)", param="run_id", code="invalid_run_state")
    return run_json(find_run(request, eval_id, run_id))


@router.delete("/v1/evals/{eval_id}/runs/{run_id}", response_model=RunDeleted)
def delete_run(request: Request, eval_id: str, run_id: str) -> dict:
    store = store_of(request)
    find_run(request, eval_id, run_id)
    store.set_eval_run(run_id, when_status=ACTIVE, status="canceled", finished_at=now())  # the runner stops
    store.delete_eval_run(run_id)
    return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}


# --------------------------------------------------------------------------------------------------
# Routes: output items


@router.get("/v1/evals/{eval_id}/runs/{run_id}/output_items", response_model=ListPage)
def list_output_items(request: Request, eval_id: str, run_id: str, after: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=100)] = 20, order: Literal["asc", "desc"] = "asc",
                      status: Literal["pass", "fail", "error"] | None = None) -> dict:
    find_run(request, eval_id, run_id)
    rows = store_of(request).output_items(run_id, status=status)  # by row index
    rows, more = page(rows if order == "asc" else rows[::-1], after, limit)
    return list_json([item_json(r) for r in rows], more)


@router.get("/v1/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}", response_model=OutputItem)
def retrieve_output_item(request: Request, eval_id: str, run_id: str, output_item_id: str) -> dict:
    find_run(request, eval_id, run_id)
    row = store_of(request).output_item(run_id, output_item_id)
    if row is None:
        raise APIError(404, f"No such output item: {output_item_id}", param="output_item_id")
    return item_json(row)
