"""`tunekit migrate`: an OpenAI account's fine-tuning jobs, and the files they train on, brought over to tunekit.

`migrate(...)` reads top to bottom:

1. the arguments, every problem at once: a `--model-map` entry that is not SOURCE_MODEL=BASE or whose base is
   neither a folder nor a hub id, a `--set` value that is not KEY=VALUE, a destination folder that holds
   something other than an earlier migration;
2. the source, through the openai SDK: the account's fine-tuning jobs and fine-tune files (OpenAI, Azure
   OpenAI's v1 surface, or a tunekit server: they speak the same API); a server destination's models;
3. one plan per job: carried, or not and why (failed or cancelled at the source, unless named with `--job`; a
   base model, or a model grader's judge model, with no `--model-map` entry; what tunekit's jobs API refuses).
   A carried job's request is read as `tunekit serve` reads a create request (serve/jobs.py `CreateJob`,
   `requested_method`, `check_reward`; serve/worker.py `check_overrides`, `resolve_rft`, `run_config`), so the
   config a job gets in a folder is the config a tunekit server trains for the same request;
4. the training and validation files of the carried jobs: fetched once each (the state file keeps source file
   id -> sha256 and path, and a file it holds is never fetched again) and checked as `tunekit serve` checks an
   upload (serve/files.py `check_fine_tune_file`: the data check, or the prompt check of a reinforcement file);
5. unless `run`, stop there: the plan says what would happen and nothing is written (files fetched for the counts
   go to a temporary folder, deleted after). With `run`, a folder destination gets DEST/ftjob-ID/ with
   config.yaml (the run config, `tunekit train` ready), job.json (the source job and the request made of it),
   train.jsonl and valid.jsonl; a server destination (`--to http://...`) gets the files uploaded and the jobs
   created through the openai SDK, where they train as any job.

Every write is atomic (a temporary name, then a rename): a migration stopped at any point leaves whole files
and whole job folders, and the next call carries on from the state file (DEST/migrate-state.json; for a server
destination STATE_DIR/migrate-state.json), fetching nothing twice and creating no job twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunekit.config import RunConfig, config_from_dict, parse_override
from tunekit.errors import ConfigError, Problem, TunekitError
from tunekit.eval.grading import judge_models
from tunekit.fsio import publish_dir, write_bytes_atomic
from tunekit.locate import locate_model
from tunekit.serve.errors import APIError
from tunekit.serve.files import check_fine_tune_file
from tunekit.serve.jobs import (
    HYPERPARAMETERS,
    METHOD_OF,
    RFT_HYPERPARAMETERS,
    CreateJob,
    check_reward,
    requested_method,
)
from tunekit.serve.worker import MIN_EXAMPLES, check_overrides, resolve_hyperparameters, run_config

STATE_FILE = "migrate-state.json"
FILES_DIR = "files"  # the fetched files, one per source file id, beside the state file
SKIPPED = ("failed", "cancelled")  # source statuses left out unless the job is named with --job
OBJECTIVE = {method: objective for objective, method in METHOD_OF.items()}  # "dpo" -> "dpo", "reinforcement" -> "grpo"
DEFAULT_STATE_DIR = Path("tunekit-migrate")  # a server destination's state and fetched files
UNKNOWN_CONTEXT = 2048  # positions assumed where a server destination's model is not read here (its server reads it)
CHUNK = 1 << 20  # bytes per read while fetching

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------------
# The state file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoredFile(_Strict):
    sha256: str
    path: str  # relative to the state file's folder
    bytes: int
    filename: str  # as uploaded to the source


class ServerState(_Strict):
    files: dict[str, str] = Field(default_factory=dict)  # source file id -> its id on the destination server
    jobs: dict[str, str] = Field(default_factory=dict)  # source job id -> the job created there


class State(_Strict):
    version: Literal[1] = 1
    source: str  # the source's base URL: a folder holds one account's migration
    files: dict[str, StoredFile] = Field(default_factory=dict)
    folders: dict[str, str] = Field(default_factory=dict)  # source job id -> its folder (a folder destination)
    servers: dict[str, ServerState] = Field(default_factory=dict)  # destination base URL -> what was made there


def _save(state: State, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(folder / STATE_FILE, state.model_dump_json(indent=2).encode())


def _read_state(folder: Path, where: str) -> State | None:
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        return State.model_validate_json(path.read_bytes())
    except (ValidationError, OSError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise TunekitError(Problem(where, f"{path} cannot be read as a migration's state: {first}",
                                   "it is written by tunekit migrate only: give another folder, or move this one "
                                   "aside to start the migration again")) from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# The plan


@dataclass
class SourceFile:
    """A training or validation file of a carried job: where it is here, and what the upload check says."""

    id: str
    filename: str
    bytes: int
    path: Path | None = None  # the local copy
    sha256: str | None = None
    fetched: bool = False  # downloaded by this call (False: the state file's copy)
    lines: int | None = None  # non-empty lines
    examples: int | None = None  # valid examples (pairs for DPO, prompts for reinforcement)
    status: str | None = None  # the upload check: "processed" or "error"
    details: str | None = None  # its problems when "error"
    problem: str | None = None  # why there is no copy


@dataclass
class JobPlan:
    id: str
    status: str  # at the source
    model: str  # the source's base model
    method: str  # supervised | dpo | reinforcement (or what the source says, when tunekit does not train it)
    training_file: str
    validation_file: str | None
    source: dict  # the job as the source lists it
    base: str | None = None  # the mapped base: a folder destination's model dir or hub id, a server's model name
    request: dict | None = None  # the create request a tunekit server gets (model: base; tunekit: the --set values)
    hyperparameters: dict = field(default_factory=dict)  # as sent; a folder's with every "auto" resolved
    auto: list[str] = field(default_factory=list)  # the hyperparameters the source left "auto"
    overrides: dict | None = None  # the job's config values as the jobs API checked them (`check_overrides`)
    config: dict | None = None  # a folder destination's run config (paths relative to the job's folder)
    tokens: dict[str, int] = field(default_factory=dict)  # "training" / "validation" -> tokens per epoch
    not_carried: list[Problem] = field(default_factory=list)  # why not; empty: carried
    notes: list[str] = field(default_factory=list)  # carried, with this difference
    done: str | None = None  # where it went: its folder, or the job id on the destination server
    earlier: bool = False  # done by an earlier call (the state file says so)

    @property
    def carried(self) -> bool:
        return not self.not_carried

    def files(self) -> list[tuple[str, str]]:
        """(role, source file id) of the job's data."""
        return [("training", self.training_file)] + ([("validation", self.validation_file)]
                                                     if self.validation_file else [])


@dataclass
class Plan:
    source: str
    destination: str  # a folder, or a tunekit server's base URL
    server: bool  # the destination is a server
    run: bool
    jobs: list[JobPlan]
    files: dict[str, SourceFile]  # the carried jobs' files, by source id
    other_files: int = 0  # the source's fine-tune files no carried job uses: not carried
    failed: list[Problem] = field(default_factory=list)  # run: what the destination refused

    @property
    def carried(self) -> list[JobPlan]:
        return [j for j in self.jobs if j.carried]


# --------------------------------------------------------------------------------------------------
# Arguments


@dataclass
class _Args:
    model_map: dict[str, str]  # source model -> base (a folder destination's: located, absolute or a hub id)
    contexts: dict[str, int]  # a folder destination's base -> its positions (what a server reads as its context)
    values: dict[str, Any]  # --set: dotted config key -> value, as a job's `tunekit` object
    folder: Path | None  # a folder destination
    state_dir: Path  # where the state file and the fetched files are


def _read_arguments(*, source: str, api_key: str | None, model_map: list[str], to: str, to_api_key: str | None,
                    values: list[str], state_dir: Path | None) -> _Args:
    problems = []
    server = to.startswith(("http://", "https://"))
    if not source.startswith(("http://", "https://")):
        problems.append(Problem("--from-base-url", f"{source!r} is not a URL",
                                "give the API's root: https://api.openai.com/v1, or a tunekit server's "
                                "http://HOST:PORT/v1"))
    if not api_key:
        problems.append(Problem("--api-key", "no API key for the source", "give --api-key KEY or set OPENAI_API_KEY"))
    if to_api_key is not None and not server:
        problems.append(Problem("--to-api-key", f"--to {to} is a folder: it takes no key",
                                "give --to http://HOST:PORT/v1 to create the jobs on a tunekit server"))
    mapping: dict[str, str] = {}
    contexts: dict[str, int] = {}
    for entry in model_map:
        name, sep, base = entry.partition("=")
        name, base = name.strip(), base.strip()
        if not sep or not name or not base:
            problems.append(Problem("--model-map", f"{entry!r} is not SOURCE_MODEL=BASE",
                                    "e.g. --model-map gpt-4o-mini-2024-07-18=Qwen/Qwen2.5-1.5B-Instruct"))
            continue
        if name in mapping:
            problems.append(Problem("--model-map", f"{name} is mapped twice", "give one --model-map per source model"))
            continue
        if not server:  # a folder's config names a model dir (absolute: read from any folder) or a hub id
            located = locate_model(base, field=f"--model-map {name}={base}")
            if isinstance(located, Problem):
                problems.append(located)
                continue
            base = located
            if base not in contexts:
                try:
                    contexts[base] = _context(base)
                except TunekitError as exc:
                    problems += [Problem(f"--model-map {name}={entry.partition('=')[2].strip()}", p.message, p.hint)
                                 for p in exc.problems]
                    continue
        mapping[name] = base
    given: dict[str, Any] = {}
    for text in values:
        try:
            keys, value = parse_override(text)
        except ConfigError as exc:
            problems += [Problem("--set", f"{p.where}: {p.message}", p.hint) for p in exc.problems]
            continue
        given[".".join(keys)] = value
    folder = None if server else Path(to).expanduser()
    if folder is not None:
        if state_dir is not None:
            problems.append(Problem("--state-dir", "a folder destination keeps its state in the folder",
                                    "leave --state-dir out, or give --to http://HOST:PORT/v1"))
        if folder.exists() and not folder.is_dir():
            problems.append(Problem("--to", f"{folder} is a file", "give a new folder, or an earlier migration's"))
        elif folder.is_dir() and any(folder.iterdir()) and not (folder / STATE_FILE).is_file():
            problems.append(Problem("--to", f"{folder} holds other things (no {STATE_FILE}): not a migration folder",
                                    "give a new or empty folder, or the folder of an earlier tunekit migrate"))
    if problems:
        raise TunekitError(problems, title="tunekit migrate: invalid arguments")
    return _Args(mapping, contexts, given, folder, folder if folder is not None else (state_dir or DEFAULT_STATE_DIR))


def _context(base: str) -> int:
    """The positions of a base model, as `tunekit serve` reads a served model's context: its config's
    max_position_embeddings, else 2048 (a run dir: the config of the model its chain starts from)."""
    from transformers import AutoConfig

    from tunekit.model import config_source

    try:
        config = AutoConfig.from_pretrained(config_source(base))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunekitError(Problem("--model-map", f"cannot read the config of {base}: {first}",
                                   "map to a model dir or run dir with a config.json, or a hub id")) from None
    return int(getattr(config, "max_position_embeddings", None) or 2048)


# --------------------------------------------------------------------------------------------------
# The API, through the openai SDK


def _client(url: str, key: str):
    import openai

    # retries: the SDK's own (connection errors, 429, 5xx), twice
    return openai.OpenAI(base_url=url, api_key=key, max_retries=2, timeout=120)


def _api_message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return getattr(exc, "message", None) or str(exc)


def _call(what: str, url: str, url_option: str, key_option: str, fn: Callable[[], Any]):
    """`fn()`, its errors as a TunekitError naming the option to fix: the URL (unreachable, not the API), or the
    key (refused)."""
    import openai

    try:
        return fn()
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        raise TunekitError(Problem(key_option, f"{url} refused the API key ({exc.status_code} on {what}: "
                                               f"{_api_message(exc)})",
                                   f"give a key of the account that holds the jobs: {key_option} KEY")) from None
    except openai.NotFoundError as exc:
        raise TunekitError(Problem(url_option, f"{url} has no {what} (404: {_api_message(exc)})",
                                   "give the API's root, ending in /v1: https://api.openai.com/v1, or a tunekit "
                                   "server's http://HOST:PORT/v1 (started with --data-dir)")) from None
    except openai.APIConnectionError as exc:  # also a timeout
        reason = exc.__cause__ or exc
        raise TunekitError(Problem(url_option, f"cannot reach {url} ({what}): {reason}",
                                   "check the URL and that the server is up")) from None
    except openai.APIStatusError as exc:
        raise TunekitError(Problem(url_option, f"{url} answered {exc.status_code} to {what}: {_api_message(exc)}",
                                   "try again later; if it persists, the URL may not be an OpenAI-compatible "
                                   "API")) from None
    except (openai.APIError, AttributeError, TypeError, ValueError) as exc:  # a 200 that is not the API's JSON
        raise TunekitError(Problem(url_option, f"{url} did not answer {what} as OpenAI's API does: "
                                               f"{type(exc).__name__}: {exc}",
                                   "give the API's root, ending in /v1")) from None


def _as_dict(item) -> dict:
    return item.to_dict() if hasattr(item, "to_dict") else dict(item)


# --------------------------------------------------------------------------------------------------
# One job


def _method(job: dict) -> tuple[str, dict, list[str]]:
    """(method type, the create request's `method`, notes) of a source job: its `method`, or for a job made
    before OpenAI had one, its top-level (legacy) hyperparameters as a supervised job's. Hyperparameters tunekit
    has no setting for are left out, with a note."""
    method = job.get("method") or {"type": "supervised",
                                   "supervised": {"hyperparameters": job.get("hyperparameters") or {}}}
    kind = method.get("type") or "supervised"
    inner = method.get(kind) or {}
    given = inner.get("hyperparameters") or ((job.get("hyperparameters") or {}) if kind == "supervised" else {})
    known = HYPERPARAMETERS + (("beta",) if kind == "dpo" else ()) + (
        RFT_HYPERPARAMETERS if kind == "reinforcement" else ())
    hp = {k: v for k, v in given.items() if k in known and v is not None}
    notes = [f"hyperparameter {k}={v!r} has no tunekit setting: left out" for k, v in given.items()
             if k not in known and v is not None]
    out: dict = {"hyperparameters": hp}
    if kind == "reinforcement":
        out = {"grader": inner.get("grader"), "hyperparameters": hp, "response_format": inner.get("response_format")}
    return kind, {"type": kind, kind: out}, notes


def _not_mapped(job: dict, jobs: list[dict], server: bool) -> Problem:
    model = job.get("model") or ""
    what = "a model the server serves" if server else "a model dir, run dir or hub id"
    maker = next((j["id"] for j in jobs if model and j.get("fine_tuned_model") == model.split(":ckpt-step-")[0]),
                 None)
    hint = f"add --model-map {model}=BASE ({what})"
    if maker is not None:  # continued fine-tuning: the earlier model is a job of this account
        then = "the fine-tuned model its migrated job makes there" if server else f"its migrated run (DEST/{maker}/run)"
        hint += f"; {model} is the model of job {maker}: once that job is migrated and trained, map it to {then}"
    return Problem("--model-map", f"job {job['id']}: its model {model} is not mapped to an open base model", hint)


def _values_for(values: dict[str, Any], kind: str) -> dict[str, Any]:
    """The --set values a job of method `kind` gets: dpo.* values go to DPO jobs only, grpo.* values to
    reinforcement jobs only (the jobs API refuses them on others), everything else to every job."""
    skip = {"supervised": ("dpo", "grpo"), "dpo": ("grpo",), "reinforcement": ("dpo",)}.get(kind, ())
    return {k: v for k, v in values.items() if k.split(".")[0] not in skip}


def _judged_by(grader: dict, model_map: dict[str, str]) -> dict:
    """The grader with each model grader's `model` replaced by what it is mapped to (also inside a multi)."""
    if grader.get("type") in ("score_model", "label_model"):
        return {**grader, "model": model_map[grader["model"]]}
    if grader.get("type") == "multi" and isinstance(grader.get("graders"), dict):
        return {**grader, "graders": {k: _judged_by(v, model_map) if isinstance(v, dict) else v
                                      for k, v in grader["graders"].items()}}
    return grader


def plan_job(job: dict, *, jobs: list[dict], model_map: dict[str, str], values: dict[str, Any], chosen: bool,
             server: bool, context: Callable[[str], int]) -> JobPlan:
    """What a source job becomes (no file read yet): its base, its create request read as `tunekit serve` reads
    one, and its config values; or why it is not carried. A `--set` value the jobs API refuses is raised
    (TunekitError naming --set): it is the command's input, not the job's."""
    kind, method, notes = _method(job)
    plan = JobPlan(id=job["id"], status=job.get("status") or "unknown", model=job.get("model") or "", method=kind,
                   training_file=job.get("training_file") or "", validation_file=job.get("validation_file"),
                   source=job, notes=notes)
    if plan.status in SKIPPED and not chosen:
        plan.not_carried.append(Problem(f"job {plan.id}", f"it {plan.status} at the source",
                                        f"give --job {plan.id} to carry it all the same"))
        return plan
    plan.base = model_map.get(plan.model)
    if plan.base is None:
        plan.not_carried.append(_not_mapped(job, jobs, server))
        return plan
    integrations = [i for i in job.get("integrations") or [] if isinstance(i, dict) and i.get("type") == "wandb"]
    plan.notes += [f"integration {i.get('type')!r} is not carried (tunekit has W&B only)"
                   for i in job.get("integrations") or [] if i not in integrations]
    if integrations:
        project = integrations[0].get("wandb", {}).get("project")
        plan.notes.append(f"W&B logging to project {project!r} is carried: training needs a W&B login")
    request = {"model": plan.base, "training_file": plan.training_file, "validation_file": plan.validation_file,
               "method": method, "suffix": job.get("user_provided_suffix"), "seed": job.get("seed"),
               "metadata": job.get("metadata"),
               "integrations": [{"type": "wandb", "wandb": i.get("wandb") or {}} for i in integrations] or None}
    plan.request = {k: v for k, v in request.items() if v is not None}
    mine = _values_for(values, kind)
    if mine:
        plan.request["tunekit"] = mine
    try:
        body = CreateJob.model_validate(plan.request)
        kind, plan.hyperparameters = requested_method(body)
        plan.auto = [k for k, v in plan.hyperparameters.items() if v == "auto"]
    except (ValidationError, APIError) as exc:
        error = APIError.from_validation(list(exc.errors())) if isinstance(exc, ValidationError) else exc
        plan.not_carried.append(Problem(f"job {plan.id} {error.param or ''}".strip(), error.message,
                                        "tunekit's jobs API refuses this request as the source gave it"))
        return plan
    grader = body.method.reinforcement.grader if kind == "reinforcement" else None
    objective = OBJECTIVE[kind]
    judges: dict[str, str] = {}
    if grader is not None and (names := judge_models([grader])):  # model graders: their judges are mapped too
        unmapped = sorted(n for n in names if n not in model_map)
        if unmapped:
            plan.not_carried.append(Problem(
                "--model-map", f"job {plan.id}: its grader's judge model(s) {', '.join(map(repr, unmapped))} are not "
                "mapped to an open model", f"add --model-map {unmapped[0]}=JUDGE (a model that answers the grader "
                "during training)"))
            return plan
        grader = _judged_by(grader, model_map)
        plan.request["method"]["reinforcement"]["grader"] = grader
        if not server:  # a folder's config names the judges' folders; a server maps its served names itself
            judges = {model_map[n]: model_map[n] for n in names}

    def checked(given: dict) -> dict:
        return check_overrides(given, context(plan.base), objective=objective, grader=grader, hp=plan.hyperparameters,
                               judges=judges)

    try:
        plan.overrides = checked(plan.request.get("tunekit", {}))
    except APIError as exc:
        try:
            checked({})
        except APIError:  # the job is refused without the values too: the job's own problem
            plan.not_carried.append(Problem(f"job {plan.id} {exc.param or ''}".strip(), exc.message,
                                            "tunekit's jobs API refuses this job as the source made it (a "
                                            "config value it lacks can be given with --set KEY=VALUE)"))
            return plan
        raise TunekitError(Problem("--set", f"job {plan.id} ({kind}): {exc.message}",
                                   "--set takes the config values a job's `tunekit` object takes "
                                   "(docs/migrating.md)")) from None
    return plan


def _check_data(plan: JobPlan, files: dict[str, SourceFile]) -> None:
    """A job whose file could not be fetched, fails the upload check, or has fewer than MIN_EXAMPLES training
    examples is not carried (the server would fail it the same way); a reinforcement job's grader is checked
    against its prompts' fields."""
    for role, file_id in plan.files():
        f = files[file_id]
        if f.problem is not None:
            plan.not_carried.append(Problem(f"job {plan.id} {role}_file", f.problem,
                                            "the job cannot train without it"))
        elif f.status == "error":
            plan.not_carried.append(Problem(f"job {plan.id} {role}_file {file_id} ({f.filename})",
                                            f"the data check refuses it: {f.details}",
                                            "fix the file and upload it again: tunekit data check shows every "
                                            "problem"))
        elif role == "training" and (f.examples or 0) < MIN_EXAMPLES:
            plan.not_carried.append(Problem(f"job {plan.id} training_file {file_id} ({f.filename})",
                                            f"{f.examples or 0} valid example(s); training needs at least "
                                            f"{MIN_EXAMPLES}", "fix the file (tunekit data check)"))
    if plan.carried and plan.method == "reinforcement":
        try:
            check_reward(plan.request["method"]["reinforcement"]["grader"], files[plan.training_file].path)
        except APIError as exc:
            plan.not_carried.append(Problem(f"job {plan.id} {exc.param or 'method.reinforcement.grader'}",
                                            exc.message, "no reward tunekit can compute: this job stays behind"))


def _configure(plan: JobPlan, files: dict[str, SourceFile], folder: Path) -> None:
    """A folder destination's run config of a carried job: the server's `run_config` of its request, with paths
    relative to the job's folder (train.jsonl, valid.jsonl, run/), checked by tunekit's config."""
    overrides = plan.overrides
    objective = OBJECTIVE[plan.method]
    plan.hyperparameters = resolve_hyperparameters(plan.hyperparameters, overrides,
                                                   files[plan.training_file].examples or 0, objective)
    cfg = run_config(base=plan.base, train=Path("train.jsonl"),
                     validation=Path("valid.jsonl") if plan.validation_file else None, run_dir=Path("run"),
                     hp=plan.hyperparameters, seed=plan.request.get("seed", 0),
                     overrides=overrides, integrations=plan.request.get("integrations"), job_id=plan.id)
    try:  # every problem with its field; the data files are written after (check_files=False)
        config_from_dict(cfg, source=str(folder / plan.id / "config.yaml"), base_dir=folder / plan.id,
                         check_files=False)
    except ConfigError as exc:
        plan.not_carried += exc.problems
        return
    plan.config = cfg


def _count_tokens(plan: JobPlan, files: dict[str, SourceFile], tokenizers: dict, cache: bool) -> None:
    """Tokens per epoch of a folder job's files, with its base's tokenizer, as training fits them (data.max_len);
    a note where they cannot be counted."""
    from tunekit.data.check import check_file
    from tunekit.model import load_tokenizer, read_run_dir

    if plan.method == "reinforcement":
        return  # prompts: the completions are sampled while training
    if plan.base not in tokenizers:
        try:
            run = read_run_dir(plan.base)  # an earlier run: the tokenizer saved with its weights
            tokenizers[plan.base] = load_tokenizer(run.final if run else plan.base, where=f"--model-map {plan.model}")
        except TunekitError as exc:
            tokenizers[plan.base] = None
            plan.notes.append(f"no token counts: {exc.problems[0].message}")
    tokenizer = tokenizers[plan.base]
    if tokenizer is None:
        return
    data = plan.config["data"]
    for role, file_id in plan.files():
        report = check_file(files[file_id].path, tokenizer=tokenizer, max_len=data.get("max_len"),
                            truncation=data.get("truncation", "drop"), cache=cache)
        if report.preference is not None:  # each side of a pair: the prompt and one reply
            p = report.preference
            plan.tokens[role] = 2 * p.prompt.total + p.chosen.total + p.rejected.total if p.prompt else 0
        elif report.stats is not None and report.stats.tokens_per_epoch is not None:
            plan.tokens[role] = report.stats.tokens_per_epoch


# --------------------------------------------------------------------------------------------------
# Files


def _fetch(client, f: SourceFile, into: Path, url: str) -> None:
    """Download `f` to into/FILE_ID.jsonl (a temporary name, then a rename), hashing on the way; `f.problem` when
    the source no longer has it or sends another size than it lists."""
    import openai

    into.mkdir(parents=True, exist_ok=True)
    tmp = into / f".{f.id}.tmp-{os.getpid()}"
    digest, size = hashlib.sha256(), 0

    def download() -> bool:
        nonlocal size
        try:
            with client.files.with_streaming_response.content(f.id) as response, open(tmp, "wb") as out:
                for chunk in response.iter_bytes(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except openai.NotFoundError:
            return False
        return True

    try:
        found = _call(f"the content of {f.id}", url, "--from-base-url", "--api-key", download)
        if not found:
            f.problem = f"file {f.id} ({f.filename}) is no longer at the source"
        elif f.bytes and size != f.bytes:
            f.problem = f"file {f.id} ({f.filename}): {size:,} bytes arrived, the source lists {f.bytes:,}"
        else:
            dest = into / f"{f.id}.jsonl"
            os.replace(tmp, dest)
            f.path, f.sha256, f.fetched, f.bytes = dest, digest.hexdigest(), True, size
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# The migration


def migrate(*, source: str, api_key: str | None, model_map: list[str], to: str, to_api_key: str | None = None,
            values: list[str] = (), jobs: list[str] = (), state_dir: Path | None = None, run: bool = False,
            log: Log = lambda message: None) -> Plan:
    """Plan the migration of the source account's fine-tuning jobs to `to` (a folder, or a tunekit server's
    base URL) and, with `run`, carry it out. `model_map`: SOURCE_MODEL=BASE entries; `values`: KEY=VALUE config
    values every migrated job gets (as a job's `tunekit` object); `jobs`: only these source jobs (default: all but
    the failed and cancelled ones). TunekitError for the command's input, an unreachable source or destination,
    or a refused key; a job that cannot be carried is in the plan with its reason."""
    source, to = source.rstrip("/"), to.rstrip("/") if to.startswith(("http://", "https://")) else to
    args = _read_arguments(source=source, api_key=api_key, model_map=list(model_map), to=to, to_api_key=to_api_key,
                           values=list(values), state_dir=state_dir)
    server = args.folder is None
    state_option = "--state-dir" if server else "--to"
    state = _read_state(args.state_dir, state_option)
    if state is not None and state.source != source:
        raise TunekitError(Problem(state_option, f"{args.state_dir} holds a migration from {state.source}",
                                   f"give another folder for {source}, or --from-base-url {state.source}"))
    state = state or State(source=source)

    # 2. the source's jobs and files; a server destination's models
    client = _client(source, api_key)
    listed = _call("fine-tuning jobs", source, "--from-base-url", "--api-key",
                   lambda: [_as_dict(j) for j in client.fine_tuning.jobs.list(limit=100)])
    source_files = _call("files", source, "--from-base-url", "--api-key",
                         lambda: {f["id"]: f for f in map(_as_dict, client.files.list(purpose="fine-tune"))})
    known = {job["id"] for job in listed}
    if any(j not in known for j in jobs):
        raise TunekitError([Problem("--job", f"the source has no job {j}", "give ids from the source's job list")
                            for j in jobs if j not in known])
    dest = None
    if server:
        dest = _client(to, to_api_key or "unused")
        served = _call("models", to, "--to", "--to-api-key", lambda: {m.id for m in dest.models.list()})
        unknown = [Problem("--model-map", f"{name}={base}: {to} serves no model {base!r} (it serves: "
                                          f"{', '.join(sorted(served)) or 'none'})",
                           f"map {name} to one of those, or serve the base there: tunekit serve {base}=PATH")
                   for name, base in args.model_map.items() if base not in served]
        if unknown:
            raise TunekitError(unknown, title="tunekit migrate: invalid arguments")

    # 3. one plan per job; what an earlier call did
    made = state.servers.get(to, ServerState()).jobs if server else state.folders
    plans = []
    for job in listed:
        if jobs and job["id"] not in jobs:
            continue
        plan = plan_job(job, jobs=listed, model_map=args.model_map, values=args.values, chosen=job["id"] in jobs,
                        server=server, context=lambda base: args.contexts.get(base, UNKNOWN_CONTEXT))
        there = made.get(plan.id)  # a folder deleted since is written again
        if plan.carried and there is not None and (server or (args.folder / there / "config.yaml").is_file()):
            plan.done, plan.earlier = there, True
        plans.append(plan)

    # 4. the carried jobs' files: the state's copies, or fetched (a dry run's to a temporary folder) and checked
    files: dict[str, SourceFile] = {}
    tokenizers: dict = {}
    with tempfile.TemporaryDirectory(prefix="tunekit-migrate-") as scratch:
        into = args.state_dir / FILES_DIR if run else Path(scratch)
        for plan in plans:
            for _, file_id in plan.files() if plan.carried else []:
                if file_id not in files:
                    files[file_id] = _local_copy(file_id, client, source, source_files.get(file_id), state, args,
                                                 into, run, log)
        for plan in plans:
            if plan.carried:
                _check_data(plan, files)
            if plan.carried and not server:
                _configure(plan, files, args.folder)
            if plan.carried and not server:
                _count_tokens(plan, files, tokenizers, cache=run)
        used = {file_id for plan in plans if plan.carried for _, file_id in plan.files()}
        result = Plan(source=source, destination=to, server=server, run=run, jobs=plans,
                      files={k: v for k, v in files.items() if k in used}, other_files=len(set(source_files) - used))
        if not run:
            return result

    # 5. carry it out
    if server:
        _create_on_server(result, dest, state, args, log)
    else:
        _write_folders(result, state, args, log)
    return result


def _local_copy(file_id: str, client, source: str, listed: dict | None, state: State, args: _Args, into: Path,
                run: bool, log: Log) -> SourceFile:
    """A carried job's file: the state's copy when its sha256 still matches, else fetched (with `run`, into the
    state's folder and recorded there); then checked as an upload is."""
    stored = state.files.get(file_id)
    f = SourceFile(file_id, (listed or {}).get("filename") or (stored.filename if stored else file_id),
                   (listed or {}).get("bytes") or (stored.bytes if stored else 0))
    local = args.state_dir / stored.path if stored is not None else None
    if local is not None and local.is_file() and _sha256(local) == stored.sha256:
        f.path, f.sha256, f.bytes = local, stored.sha256, stored.bytes
    elif listed is None and not _exists(client, file_id):
        f.problem = f"file {file_id} is no longer at the source"
    else:
        _fetch(client, f, into, source)
        if f.path is not None and run:
            state.files[file_id] = StoredFile(sha256=f.sha256, path=f"{FILES_DIR}/{f.path.name}", bytes=f.bytes,
                                              filename=f.filename)
            _save(state, args.state_dir)
            log(f"fetched {file_id} ({f.filename}, {f.bytes:,} bytes)")
    if f.path is not None:
        f.status, f.details, f.examples = check_fine_tune_file(f.path)
        with open(f.path, "rb") as fh:
            f.lines = sum(1 for line in fh if line.strip())
    return f


def _exists(client, file_id: str) -> bool:
    import openai

    try:
        client.files.retrieve(file_id)
    except openai.NotFoundError:
        return False
    except openai.APIError:
        return True  # let the download say what is wrong
    return True


def _write_folders(plan: Plan, state: State, args: _Args, log: Log) -> None:
    """Each carried job as DEST/ftjob-ID/: written under a temporary name, then renamed into place."""
    folder = args.folder
    for job in plan.carried:
        if job.earlier:
            continue
        final = folder / job.id
        if (final / "config.yaml").is_file():  # published by a call that stopped before it saved the state
            job.done, job.earlier = job.id, True
        else:
            tmp = folder / f".tmp-{job.id}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copyfile(plan.files[job.training_file].path, tmp / "train.jsonl")
            if job.validation_file:
                shutil.copyfile(plan.files[job.validation_file].path, tmp / "valid.jsonl")
            # the run config as written (relative paths: the folder can move); `_configure` validated it
            (tmp / "config.yaml").write_text(RunConfig.model_validate(job.config).to_yaml(), encoding="utf-8")
            (tmp / "job.json").write_text(json.dumps({"source": job.source, "request": job.request}, indent=2) + "\n",
                                          encoding="utf-8")
            publish_dir(tmp, final)
            job.done = job.id
            log(f"wrote {final}")
        state.folders[job.id] = job.id
        _save(state, args.state_dir)


def _create_on_server(plan: Plan, client, state: State, args: _Args, log: Log) -> None:
    """The carried jobs' files uploaded once each, then each job created, through the openai SDK; the state saved
    after every upload and every job, so that a call that stops creates nothing twice when run again. A refusal
    (a 4xx) is recorded in `plan.failed` and the other jobs go on; a destination that cannot be reached stops."""
    import openai

    url = plan.destination
    made = state.servers.setdefault(url, ServerState())
    checked: set[str] = set()  # destination file ids known to be there
    for job in plan.carried:
        if job.earlier:
            continue
        try:
            ids = {}
            for role, file_id in job.files():
                there = made.files.get(file_id)
                if there is not None and there not in checked and not _exists(client, there):
                    there = None  # deleted on the destination since: uploaded again
                if there is None:
                    f = plan.files[file_id]
                    with open(f.path, "rb") as fh:
                        obj = client.files.create(file=(f.filename, fh), purpose="fine-tune")
                    if obj.status == "error":
                        raise APIError(400, f"{role} file {file_id} ({f.filename}): {obj.status_details}")
                    there = made.files[file_id] = obj.id
                    _save(state, args.state_dir)
                    log(f"uploaded {file_id} ({f.filename}) as {there}")
                checked.add(there)
                ids[f"{role}_file"] = there
            request = {**job.request, **ids}
            values = request.pop("tunekit", None)  # tunekit's extension of the request: the SDK sends it as is
            created = client.fine_tuning.jobs.create(**request, extra_body={"tunekit": values} if values else None)
        except (openai.APIStatusError, APIError) as exc:
            status = getattr(exc, "status_code", None) or getattr(exc, "status", "")
            plan.failed.append(Problem(f"job {job.id}", f"{url} refused it ({status}): {_api_message(exc)}",
                                       "fix what it names and run again: what was made is kept"))
            continue
        except openai.APIConnectionError as exc:
            raise TunekitError(Problem("--to", f"cannot reach {url}: {exc.__cause__ or exc}",
                                       "check that the server is up, then run again: what was made is kept "
                                       f"({args.state_dir / STATE_FILE})")) from None
        job.done = made.jobs[job.id] = created.id
        _save(state, args.state_dir)
        log(f"created {created.id} on {url} (from {job.id})")


# --------------------------------------------------------------------------------------------------
# The plan as text


def _hp_text(hp: dict, auto: list[str]) -> str:
    return ", ".join(f"{k} {v}" + (" (auto)" if k in auto and v != "auto" else "") for k, v in hp.items())


def describe(plan: Plan) -> list[str]:
    """The plan (or what was done) as lines of plain text."""
    carried, left = plan.carried, [j for j in plan.jobs if not j.carried]
    where = f"tunekit server {plan.destination}" if plan.server else f"folder {plan.destination}"
    lines = [f"source: {plan.source} ({len(plan.jobs)} job(s))", f"destination: {where}", ""]
    lines.append(f"carried ({len(carried)}):" if carried else "carried: none")
    for job in carried:
        lines.append(f"  {job.id}  {job.method}  {job.model} -> {job.base}  ({job.status} at the source)")
        lines.append(f"      hyperparameters: {_hp_text(job.hyperparameters, job.auto)}")
        request = job.request or {}
        extras = [f"seed {request['seed']}" if "seed" in request else "",
                  f"suffix {request['suffix']}" if request.get("suffix") else "",
                  "metadata " + ", ".join(f"{k}={v}" for k, v in request["metadata"].items())
                  if request.get("metadata") else ""]
        if any(extras):
            lines.append("      " + "; ".join(e for e in extras if e))
        for role, file_id in job.files():
            f = plan.files[file_id]
            unit = "prompts" if job.method == "reinforcement" else "pairs" if job.method == "dpo" else "examples"
            text = f"      {role}: {file_id} ({f.filename}): {f.bytes:,} bytes, {f.lines:,} lines, {f.examples:,} {unit}"
            if role in job.tokens:
                epochs = job.hyperparameters.get("n_epochs")
                text += f", {job.tokens[role]:,} tokens per epoch"
                if role == "training" and isinstance(epochs, int):
                    text += f" (x {epochs} epochs: {job.tokens[role] * epochs:,})"
            lines.append(text)
        for note in job.notes:
            lines.append(f"      note: {note}")
        if job.done is not None:
            there = plan.destination.rstrip("/") + "/" + job.done if not plan.server else f"job {job.done}"
            lines.append(f"      -> {there}" + (" (done earlier)" if job.earlier else ""))
        elif not plan.run:
            lines.append(f"      -> would be {'created as a job' if plan.server else f'{plan.destination}/{job.id}/'}")
    if left:
        lines += ["", f"not carried ({len(left)}):"]
    for job in left:
        lines.append(f"  {job.id}  {job.method}  {job.model}  ({job.status} at the source)")
        for p in job.not_carried:
            lines.append(f"      {p.where}: {p.message}")
            if p.hint:
                lines.append(f"      hint: {p.hint}")
    fetched = [f for f in plan.files.values() if f.fetched]
    kept = [f for f in plan.files.values() if f.path is not None and not f.fetched]
    lines += ["", f"files: {len(plan.files)} used by carried jobs; {len(fetched)} fetched "
                  f"({sum(f.bytes for f in fetched):,} bytes), {len(kept)} already here"
              + (f"; {plan.other_files} other fine-tune file(s) at the source, used by no carried job, "
                 "not carried" if plan.other_files else "")]
    for p in plan.failed:
        lines.append(f"failed: {p.where}: {p.message}")
    if not plan.run:
        lines.append("dry run: nothing was written or started; add --run to carry it out")
    return lines
