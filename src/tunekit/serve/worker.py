"""Runs fine-tuning jobs: one thread that checks data, starts `tunekit train` subprocesses and follows them.

Each pass of `Worker._tick`, top to bottom:
1. validate: jobs in `validating_files` get their files checked (purpose, status, at least MIN_EXAMPLES
   examples), copied into DATA_DIR/jobs/ID/, their "auto" hyperparameters resolved, and a run config
   written (jobs/ID/config.yaml); then `queued`, or `failed` with OpenAI's error object.
2. follow: for every training process, new rows of its metrics.jsonl become metrics events (one per logged
   step, keyed by step so a resumed run never repeats one), new checkpoint dirs become checkpoint objects,
   `estimated_finish` comes from the measured seconds per step; a cancelled job's process is killed; an
   ended process makes its job `succeeded` (result files written, the model served at once), `failed`
   (the last lines training printed), or stay `paused` (it stopped at a checkpoint on request).
3. start: queued jobs, oldest first, while fewer than `workers` jobs run; a job with checkpoints
   continues from the last one (`tunekit train --resume`); with `processes` > 1 a job trains on that many
   processes (`tunekit train --nproc N`, the same path as on the command line).

Training runs in its own process (`python -m tunekit.cli train`), so a crash or out-of-memory there never
takes the server down; on Linux the process is killed when the server dies (and its training processes
with it: each dies with its launcher, see tunekit.train.distributed.setup), and a job found `running` when the
server starts again is queued and continues from its last checkpoint. A job's processes are a process
group of their own, killed together.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tunekit.errors import ERROR_FILE_ENV
from tunekit.serve.deps import visible_models
from tunekit.serve.errors import APIError
from tunekit.serve.store import Store, new_id, now
from tunekit.train import hyper, trackers

log = logging.getLogger("tunekit.serve")

ERROR_FILE = "error.json"  # in a job's folder: the error its training reported (tunekit.cli.fail)
MIN_EXAMPLES = 10  # OpenAI's minimum training examples
# Config fields a job's `tunekit` object may not set: the server chooses them.
RESERVED = ("model", "data.train", "data.validation", "output.dir", "output.overwrite", "output.wandb",
            "output.mlflow", "output.tensorboard", "eval.data", "train.epochs", "train.batch_size", "train.lr",
            "train.seed", "objective", "dpo.beta", "grpo.grader", "grpo.judges")
SERVE_DEFAULTS = {"train": {"save_every": 50, "keep_last": 3, "log_every": 1, "warmup_ratio": 0.0},
                  "eval": {"baselines": ["base", "few-shot:3"], "max_new_tokens": 128}}
TRAIN_LOG_TAIL = 1500  # characters of a failed run's output kept in the job's error message
# Reinforcement jobs (objective: grpo): compute_multiplier 1 is grpo.group_size 4 (GrpoConfig's default), "auto"
# batch_size is 8 prompts a step (at most the training prompts), "auto" eval_interval gives about 10 validations.
RFT_GROUP_SIZE = 4
RFT_AUTO_BATCH = 8
RFT_VALIDATIONS = 10


# --------------------------------------------------------------------------------------------------
# What a job trains from, and its config


def base_of(state, project: str, name: str) -> tuple[str, str, int]:
    """(`model.base` for training, root base name, context) of a job's `model`; 400 naming `model` if the
    name is neither a served model nor a fine-tuned model (or checkpoint) of this project."""
    models = visible_models(state, project)
    served, owner = models.get(name), state.model_owner.get(name)
    if served is None:
        known = ", ".join(sorted(models))
        raise APIError(400, f"model {name!r} is not served here (models: {known or 'none'}): give a served model "
                            "or an earlier fine-tuned model of this project", param="model", code="model_not_found")
    if Path(served.path).is_absolute() and not Path(served.path).exists():  # loaded at start-up, gone since
        raise APIError(400, f"model {name!r} cannot be trained from: its folder {served.path} no longer exists",
                       param="model", code="model_not_found")
    job = state.store.job_by_model(name.split(":ckpt-step-")[0]) if owner is not None else None
    if job is None:
        return served.path, name, served.context
    if ":ckpt-step-" in name:
        return f"ckpt:{served.path}", job["root_model"], served.context
    return served.path, job["root_model"], served.context


def _nested(values: dict) -> dict:
    """{"lora.r": 8, "train": {"max_steps": 3}} -> {"lora": {"r": 8}, "train": {"max_steps": 3}}."""
    out: dict = {}
    for key, value in values.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        value = _nested(value) if isinstance(value, dict) else value
        last = parts[-1]
        node[last] = _merge(node[last], value) if isinstance(value, dict) and isinstance(node.get(last), dict) \
            else value
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flat(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in values.items():
        keys += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return keys


def objective_of(job: dict) -> str:
    """"dpo" for a DPO job (method.type "dpo": `objective: dpo` in its config values), "grpo" for a
    reinforcement job (`objective: grpo`), else "sft"."""
    return job["overrides"].get("objective", "sft")


def group_size(hp: dict) -> int:
    """grpo.group_size of a reinforcement job: compute_multiplier x RFT_GROUP_SIZE completions per prompt, >= 2."""
    return max(2, round(RFT_GROUP_SIZE * hp["compute_multiplier"]))


def resolve_rft(hp: dict, overrides: dict, examples: int) -> dict:
    """A reinforcement job's "auto" hyperparameters resolved (n_epochs and learning_rate_multiplier as for the
    other methods, by the caller): batch_size RFT_AUTO_BATCH prompts, compute_multiplier from tunekit's
    grpo.group_size (or 1), eval_interval from tunekit's train.eval_every (or planned steps / RFT_VALIDATIONS),
    eval_samples 1 (validation decodes greedily: one completion per prompt)."""
    hp = dict(hp)
    if hp["batch_size"] == "auto":
        hp["batch_size"] = max(1, min(RFT_AUTO_BATCH, examples))
    if hp["compute_multiplier"] == "auto":
        hp["compute_multiplier"] = overrides.get("grpo", {}).get("group_size", RFT_GROUP_SIZE) / RFT_GROUP_SIZE
    if hp["eval_interval"] == "auto":
        train = overrides.get("train", {})
        planned = hp["n_epochs"] * -(-examples // hp["batch_size"])
        planned = min(planned, train["max_steps"]) if train.get("max_steps") else planned
        hp["eval_interval"] = train.get("eval_every") or max(1, planned // RFT_VALIDATIONS)
    if hp["eval_samples"] == "auto":
        hp["eval_samples"] = 1
    return hp


def resolve_hyperparameters(hp: dict, overrides: dict, examples: int, objective: str) -> dict:
    """A job's "auto" hyperparameters resolved from its training examples (pairs for DPO, prompts for
    reinforcement), as the job's files are validated (and as `tunekit migrate` recreates a job)."""
    hp = dict(hp)
    if hp["n_epochs"] == "auto":
        hp["n_epochs"] = hyper.auto_epochs(examples)
    if objective == "grpo":  # batch_size is prompts per step: its own "auto" (before the rows rule below)
        hp = resolve_rft(hp, overrides, examples)
    max_len = overrides.get("data", {}).get("max_len", 1024)
    batch_tokens = overrides.get("train", {}).get("batch_tokens", 16384)
    if hp["batch_size"] == "auto":
        hp["batch_size"] = hyper.auto_batch_size(batch_tokens, max_len, objective)
    if hp["learning_rate_multiplier"] == "auto":
        hp["learning_rate_multiplier"] = 1.0
    if hp.get("beta") == "auto":
        hp["beta"] = hyper.auto_beta()
    return hp


def run_config(*, base: str, train: Path, validation: Path | None, run_dir: Path, hp: dict, seed: int,
               overrides: dict, integrations: list | None, job_id: str) -> dict:
    """The `tunekit train` config of a job (a plain dict; `config_from_dict` validates it)."""
    cfg = _merge(SERVE_DEFAULTS, overrides)
    method, objective = cfg.get("method", "lora"), cfg.get("objective", "sft")
    cfg["model"] = {**cfg.get("model", {}), "base": base}
    cfg["data"] = {**cfg.get("data", {}), "train": str(train),
                   "validation": str(validation) if validation else None}
    lr = hyper.auto_lr(method, objective) * (1.0 if hp["learning_rate_multiplier"] == "auto"
                                                   else hp["learning_rate_multiplier"])
    cfg["train"] = {**cfg["train"], "epochs": hp["n_epochs"], "batch_size": hp["batch_size"], "lr": lr,
                    "seed": seed}
    cfg["train"].setdefault("micro_batch_size", min(hp["batch_size"], 4))  # rows per forward; same math
    cfg["eval"] = {**cfg["eval"], "enabled": cfg["eval"].get("enabled", validation is not None)}
    if objective == "grpo":  # the validation reward during training replaces the evaluation after it
        cfg["eval"]["enabled"] = False
        cfg["grpo"] = {**cfg["grpo"], "group_size": group_size(hp)}
        cfg["train"]["eval_every"] = hp["eval_interval"]
    if objective == "dpo":  # the evaluation scores the validation pairs against the base (eval/preference.py)
        cfg["dpo"] = {**cfg.get("dpo", {}), "beta": hp["beta"]}
        cfg["eval"]["baselines"] = [b for b in cfg["eval"]["baselines"] if not b.startswith(("few-shot", "rag"))]
    cfg["output"] = {"dir": str(run_dir), "overwrite": True}
    for item in integrations or []:
        w = item["wandb"]
        cfg["output"]["wandb"] = {"project": w["project"], "entity": w.get("entity"), "name": w.get("name") or job_id,
                                  "tags": list(w.get("tags") or []) + [f"tunekit/{job_id}"]}
    return cfg


def check_overrides(values: dict, context: int, objective: str = "sft", grader: dict | None = None,
                    hp: dict | None = None, judges: dict[str, str] | None = None) -> dict:
    """The job's `tunekit` object as nested config values, validated by tunekit's config (400 listing every
    problem, `param` naming the first as tunekit.SECTION.KEY); data.max_len defaults to min(1024, context).
    A DPO job's values get `objective: dpo` and are checked by the preference objective's rules too; a
    reinforcement job's get `objective: grpo` and `grpo.grader` (`grader`, already checked) and are checked by
    grpo's rules; its `hp` (method.reinforcement.hyperparameters) may not set what tunekit values set too. A
    model grader's judges (`judges`: model name -> served path) become grpo.judges."""
    from tunekit.config import config_from_dict
    from tunekit.errors import ConfigError

    nested = _nested(values)
    for key, value in nested.items():
        if key not in ("method", "objective") and not isinstance(value, dict):  # objective: refused below
            raise APIError(400, f"tunekit.{key} must be an object of config values (or use dotted keys: "
                                f"{{\"{key}.KEY\": value}})", param=f"tunekit.{key}")
    reserved = [k for k in _flat(nested) if any(k == r or k.startswith(r + ".") for r in RESERVED)]
    if reserved:
        raise APIError(400, f"tunekit.{reserved[0]} is set by the job itself (model, training_file, method, "
                            "hyperparameters, seed, integrations), not by tunekit config values",
                       param=f"tunekit.{reserved[0]}")
    if objective != "dpo" and "dpo" in nested:
        raise APIError(400, "tunekit.dpo values apply to DPO jobs only", param="tunekit.dpo",
                       hint='set method {"type": "dpo"} to train on preference pairs, or leave tunekit.dpo out')
    if objective != "grpo" and "grpo" in nested:
        raise APIError(400, "tunekit.grpo values apply to reinforcement jobs only", param="tunekit.grpo",
                       hint='set method {"type": "reinforcement"} with a grader, or leave tunekit.grpo out')
    if objective == "dpo":
        nested["objective"] = "dpo"
    trial_group = RFT_GROUP_SIZE
    if objective == "grpo":
        for mine, key, theirs in (("compute_multiplier", "group_size", "grpo"), ("eval_interval", "eval_every", "train")):
            if (hp or {}).get(mine, "auto") != "auto" and key in nested.get(theirs, {}):
                raise APIError(400, f"tunekit.{theirs}.{key} and method.reinforcement.hyperparameters.{mine} set the "
                                    "same thing", param=f"tunekit.{theirs}.{key}",
                               hint=f"give one of them (docs/grpo.md, Jobs API: {mine} -> {theirs}.{key})")
        nested["objective"] = "grpo"
        trial_group = nested.get("grpo", {}).get("group_size", RFT_GROUP_SIZE)
        nested["grpo"] = {**nested.get("grpo", {}), "grader": grader, **({"judges": judges} if judges else {})}
    nested.setdefault("data", {}).setdefault("max_len", max(16, min(1024, context)))
    hp = {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0, "beta": hyper.auto_beta(),
          "eval_interval": 1, "compute_multiplier": trial_group / RFT_GROUP_SIZE}
    trial = run_config(base="base", train=Path("train.jsonl"), validation=None, run_dir=Path("run"), hp=hp, seed=0,
                       overrides=nested, integrations=None, job_id="ftjob-x")
    try:
        config = config_from_dict(trial, check_files=False)
        if objective == "dpo":
            # the objective's own up-front rules (eval, reference, loss options)
            from tunekit.train import dpo

            problems = dpo.check(config, 1)
            if problems:
                raise ConfigError(problems)
        if objective == "grpo":  # the grader is checked already (with the training file's fields)
            from tunekit.train import grpo

            problems = [p for p in grpo.check(config, 1) if not p.where.startswith("grpo.grader")]
            if problems:
                raise ConfigError(problems)
    except ConfigError as exc:
        where = [p.where.split(" ", 1)[-1] for p in exc.problems]
        message = "; ".join(f"tunekit.{w}: {p.message}" + (f" ({p.hint})" if p.hint else "")
                            for w, p in zip(where, exc.problems, strict=True))
        raise APIError(400, f"invalid tunekit config values: {message}", param=f"tunekit.{where[0]}") from None
    return nested


def _reported_error(path: Path) -> tuple[str, str | None] | None:
    """(message, param) of the error the training wrote to `path` (`tunekit.cli.fail` with TUNEKIT_ERROR_FILE), or
    None when it wrote none (a crash: the log's last lines tell)."""
    try:
        error = json.loads(path.read_text(encoding="utf-8"))
        problems = error["problems"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    parts = [f"{p['where']}: {p['message']}" if p.get("where") else p["message"] for p in problems]
    message = "; ".join(([error["title"]] if error.get("title") else []) + parts)
    return message, (problems[0].get("where") or None) if problems else None


def checkpoint_name(job: dict, step: int) -> str:
    """A checkpoint's model name, the same in its event, its checkpoint object and /v1/models (the last
    step's is served as the fine-tuned model's weights under this name too)."""
    return f"{model_name(job)}:ckpt-step-{step}"


def model_name(job: dict) -> str:
    """`ft:{base}:{project}:{suffix}:{8 characters of the job id}` (OpenAI's pattern)."""
    return f"ft:{job['root_model']}:{job['project']}:{job['suffix'] or ''}:{job['id'][len('ftjob-'):][:8]}"


def request_stop(store: Store, job_id: str) -> None:
    """Ask the job's training process to stop at its next step (train.STOP_FILE)."""
    run_dir = store.dir / "jobs" / job_id / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "STOP").touch()


# --------------------------------------------------------------------------------------------------
# The worker


@dataclass
class _Run:
    job_id: str
    proc: subprocess.Popen
    run_dir: Path
    started: float
    first_step: int | None = None  # the first step this process logged (for the step time)
    steps: dict[int, dict] = field(default_factory=dict)  # metrics rows by step


def _descendants(pid: int) -> list[int]:
    """Every process under `pid` (Linux: /proc/PID/task/TID/children; elsewhere none are found)."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += children
            todo += children
    return found


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL a job's training: its process group and every process under it. Under --nproc torchrun starts
    each worker in a session of its own, outside the job's group; they are found before anything is killed
    (a killed parent's children are handed to init)."""
    under = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    for pid in under:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class Worker:
    def __init__(self, state, *, workers: int = 1, processes: int = 1, poll_s: float = 0.5):
        self.state, self.store, self.workers, self.poll_s = state, state.store, workers, poll_s
        self.processes = processes
        self.runs: dict[str, _Run] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tunekit-serve-jobs", daemon=True)

    # ---- life

    def start(self) -> None:
        """Serve the models of succeeded jobs, queue jobs a stopped server left running, start the thread."""
        for job in self.store.jobs(status=["succeeded"], ascending=True):
            if job["model_deleted_at"] is not None:
                continue
            try:
                self._serve(job)
            except Exception as exc:  # a deleted run dir: the job stays, its model is not served
                log.warning("cannot serve %s: %s", job["fine_tuned_model"], exc)
        for job in self.store.jobs(status=["running"], ascending=True):
            if self.store.set_job(job["id"], when_status=["running"], status="queued", estimated_finish=None):
                self.store.add_event(job["id"], "The server restarted: the job continues from its last checkpoint")
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and kill training processes; their jobs stay `running` and continue on restart."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(30)
        for run in self.runs.values():
            _kill(run.proc)
            run.proc.wait()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # a bug here must not end the thread: log it, try again next pass
                log.exception("fine-tuning worker pass failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _tick(self) -> None:
        for job in self.store.jobs(status=["validating_files"], ascending=True):
            self._guarded(job, self._validate, ("validating_files",))
        for run in list(self.runs.values()):
            self._follow(run)
        for job in self.store.jobs(status=["queued"], ascending=True):
            if len(self.runs) >= self.workers:
                break
            if job["id"] not in self.runs:
                self._guarded(job, self._start, ("queued",))

    def _guarded(self, job: dict, step, from_status: tuple[str, ...]) -> None:
        """Run `step(job)`; an unexpected error fails that job (logged with its traceback) instead of
        being retried on every pass."""
        try:
            step(job)
        except Exception as exc:
            log.exception("fine-tuning job %s: %s failed", job["id"], step.__name__)
            self._fail(job["id"], "internal_error", f"{type(exc).__name__}: {exc}", None, from_status=from_status)

    # ---- 1. validate

    def _fail(self, job_id: str, code: str, message: str, param: str | None,
              from_status: tuple[str, ...] = ("validating_files", "queued", "running")) -> None:
        if self.store.set_job(job_id, when_status=from_status, status="failed", finished_at=now(),
                              estimated_finish=None, error={"code": code, "message": message, "param": param}):
            self.store.add_event(job_id, f"Fine-tuning job failed: {message}", level="error")

    def _file_problem(self, job: dict, file_id: str, param: str) -> tuple[str, str] | None:
        row = self.store.file(job["project"], file_id)
        kind = "training" if param == "training_file" else "validation"
        if row is None:
            return f"invalid_{param}", f"The {kind} file {file_id} was deleted"
        if row["purpose"] != "fine-tune":
            return "invalid_file_purpose", (f"The {kind} file {file_id} has purpose {row['purpose']!r}; "
                                            "upload it with purpose 'fine-tune'")
        if row["status"] == "error":
            return f"invalid_{param}", f"The {kind} file {file_id} has format errors: {row['status_details']}"
        if param == "training_file" and (row["examples"] or 0) < MIN_EXAMPLES:
            return "invalid_n_examples", (f"Training file has {row['examples'] or 0} example(s), "
                                          f"but must have at least {MIN_EXAMPLES} examples")
        return None

    def _validate(self, job: dict) -> None:
        from tunekit.config import config_from_dict
        from tunekit.errors import ConfigError

        for file_id, param in ((job["training_file"], "training_file"), (job["validation_file"], "validation_file")):
            if file_id is None:
                continue
            problem = self._file_problem(job, file_id, param)
            if problem:
                return self._fail(job["id"], *problem, param, from_status=("validating_files",))
        job_dir = self.store.dir / "jobs" / job["id"]
        job_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for file_id, name in ((job["training_file"], "train.jsonl"), (job["validation_file"], "valid.jsonl")):
            if file_id is not None:
                row = self.store.file(job["project"], file_id)
                shutil.copyfile(self.store.blob_path(row["sha256"]), job_dir / name)
                paths[name] = job_dir / name
        examples = self.store.file(job["project"], job["training_file"])["examples"]  # pairs for DPO
        objective = objective_of(job)
        hp = resolve_hyperparameters(job["hyperparameters"], job["overrides"], examples, objective)
        base = self._base_dir(job, job_dir)
        cfg = run_config(base=base, train=paths["train.jsonl"], validation=paths.get("valid.jsonl"),
                         run_dir=job_dir / "run", hp=hp, seed=job["seed"], overrides=job["overrides"],
                         integrations=job["integrations"], job_id=job["id"])
        try:
            config = config_from_dict(cfg, base_dir=job_dir)
        except ConfigError as exc:
            return self._fail(job["id"], "invalid_config", "; ".join(str(p) for p in exc.problems), None,
                              from_status=("validating_files",))
        config = self._drop_unreachable_integrations(job, config)
        (job_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
        if self.store.set_job(job["id"], when_status=["validating_files"], status="queued", hyperparameters=hp):
            self.store.add_event(job["id"], "Files validated, moving job to queued state", key="validated")

    def _drop_unreachable_integrations(self, job: dict, config):
        """An `integrations` entry whose tracker cannot work here (W&B online without a key or a server that
        answers) becomes a warning event and is left out: the job trains without it rather than failing."""
        if config.output.wandb is None:
            return config
        problems = trackers.reach(config, config.output.dir)
        wandb = [p for p in problems if p.where.startswith("output.wandb")]
        if not wandb:
            return config
        reasons = "; ".join(f"{p.message} ({p.hint})" for p in wandb)
        self.store.add_event(job["id"], f"The wandb integration cannot work and is left out of this job: {reasons}",
                             level="warn", key="integration-wandb")
        return config.model_copy(update={"output": config.output.model_copy(update={"wandb": None})})

    def _base_dir(self, job: dict, job_dir: Path) -> str:
        """`model.base`: a served model's path, an earlier job's run dir, or for a checkpoint a run dir made
        of the earlier run's config and tokenizer with the checkpoint's adapter as final/."""
        if not job["base"].startswith("ckpt:"):
            return job["base"]
        from tunekit.train.checkpoint import copy_weights  # imports torch: only for a job from a checkpoint

        ckpt = Path(job["base"][len("ckpt:"):])
        earlier = ckpt.parent.parent  # RUN/checkpoints/step-N
        snapshot = job_dir / "base"
        if not (snapshot / "final").is_dir():
            shutil.rmtree(snapshot, ignore_errors=True)
            (snapshot / "final").mkdir(parents=True)
            shutil.copyfile(earlier / "config.yaml", snapshot / "config.yaml")
            for f in (earlier / "final").iterdir():
                if f.is_file() and not f.name.startswith("adapter_"):
                    shutil.copyfile(f, snapshot / "final" / f.name)  # tokenizer files
            copy_weights(ckpt, snapshot / "final")  # the checkpoint's adapter
        return str(snapshot)

    # ---- 3. start

    def _start(self, job: dict) -> None:
        job_dir = self.store.dir / "jobs" / job["id"]
        run_dir = job_dir / "run"
        (run_dir / "STOP").unlink(missing_ok=True)
        resume = (run_dir / "checkpoints").is_dir() and any(p.name.startswith("step-")
                                                             for p in (run_dir / "checkpoints").iterdir())
        cmd = [sys.executable, "-m", "tunekit.cli", "train", str(job_dir / "config.yaml")] + (
            ["--resume"] if resume else []) + (["--nproc", str(self.processes)] if self.processes > 1 else [])
        from tunekit.train.distributed import die_with_parent

        (job_dir / ERROR_FILE).unlink(missing_ok=True)
        with open(job_dir / "train.log", "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=job_dir, start_new_session=True, preexec_fn=die_with_parent,
                                    env={**os.environ, ERROR_FILE_ENV: str(job_dir / ERROR_FILE)})
        self.runs[job["id"]] = _Run(job["id"], proc, run_dir, time.time())
        if self.store.set_job(job["id"], when_status=["queued"], status="running"):
            self.store.add_event(job["id"], "Fine-tuning job started" + (" (resumed from its last checkpoint)"
                                                                         if resume else ""))
        else:  # cancelled between the read and now
            _kill(proc)

    # ---- 2. follow

    def _follow(self, run: _Run) -> None:
        job = self.store.job(None, run.job_id)
        code = run.proc.poll()  # before reading: rows written up to the exit are read in this pass
        self._read_metrics(run, job)
        self._read_checkpoints(run, job)
        self._read_tracker_warnings(run, job)
        if code is None:
            if job["status"] == "cancelled":
                _kill(run.proc)
            return
        del self.runs[run.job_id]
        job = self.store.job(None, run.job_id)
        if job["status"] == "cancelled":
            return
        if code == 0:
            return self._succeed(job, run)
        if job["status"] in ("paused", "queued"):  # stopped at a checkpoint on request (queued: resumed since)
            steps = [int(p.name[5:]) for p in (run.run_dir / "checkpoints").glob("step-*")]
            self.store.add_event(job["id"], f"Fine-tuning job paused at step {max(steps, default=0)}")
            return
        reported = _reported_error(run.run_dir.parent / ERROR_FILE)
        if reported is not None:  # the training's own error: its problems, param the first one's place
            message, param = reported
            self._fail(job["id"], "training_failed", f"training stopped: {message}", param, from_status=("running",))
            return
        tail = (run.run_dir.parent / "train.log").read_text(encoding="utf-8", errors="replace")[-TRAIN_LOG_TAIL:]
        lines = [line for line in tail.splitlines() if line.strip()]
        self._fail(job["id"], "training_failed", f"training exited with code {code}: " + " | ".join(lines[-8:]),
                   None, from_status=("running",))

    def _read_metrics(self, run: _Run, job: dict) -> None:
        path = run.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            step = row["step"]
            if step in run.steps:
                continue
            run.steps[step] = row
            if run.first_step is None:
                run.first_step = step
            total = self._total_steps(job, row)
            data = {"step": step, "total_steps": total, **step_metrics(job, row)}
            if objective_of(job) != "grpo":
                data["full_valid_loss"] = row.get("valid_loss")
            if objective_of(job) == "sft":
                data["full_valid_mean_token_accuracy"] = row.get("valid_token_accuracy")
            message = f"Step {step}/{total}: training loss={row['train_loss']:.4f}"
            if objective_of(job) == "grpo":  # OpenAI's RFT message and `scores` object (docs/grpo.md, Jobs API)
                data["scores"] = rft_scores(job, row)
                message = f"Step {step}/{total}: train mean reward={row['reward_mean']:.4f}" + (
                    f", full validation mean reward={row['valid_reward_mean']:.4f}"
                    if row.get("valid_reward_mean") is not None else "") + f", training loss={row['train_loss']:.4f}"
            if objective_of(job) == "dpo":
                message += f", reward accuracy={row['reward_accuracy']:.2f}, reward margin={row['reward_margin']:.4f}"
            if row.get("valid_loss") is not None:
                message += f", validation loss={row['valid_loss']:.4f}"
            self.store.add_event(job["id"], message, type="metrics", data=data, key=f"step-{step}")
        if run.steps and job["status"] == "running":
            last = max(run.steps)
            total = self._total_steps(job, run.steps[last])
            done = last - (run.first_step or last) + 1
            per_step = (time.time() - run.started) / max(1, done)
            self.store.set_job(job["id"], when_status=["running"], total_steps=total,
                               estimated_finish=now() + int(per_step * max(0, total - last)))

    def _read_tracker_warnings(self, run: _Run, job: dict) -> None:
        """A tracker the training process switched off mid-run (see train/trackers.py) is a warning event:
        the job goes on."""
        path = run.run_dir / trackers.WARNINGS_FILE
        if not path.is_file():
            return
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            self.store.add_event(job["id"], f"Integration {row['tracker']}: {row['message']}", level="warn",
                                 key=f"tracker-warning-{i}")

    @staticmethod
    def _total_steps(job: dict, row: dict) -> int:
        """Planned steps: epochs x steps per epoch (metrics rows carry step and epoch = step / per epoch),
        at most train.max_steps."""
        per_epoch = max(1, round(row["step"] / row["epoch"])) if row.get("epoch") else 1
        total = job["hyperparameters"]["n_epochs"] * per_epoch
        max_steps = job["overrides"].get("train", {}).get("max_steps")
        return min(total, max_steps) if max_steps else total

    def _read_checkpoints(self, run: _Run, job: dict) -> None:
        for ckpt in sorted((run.run_dir / "checkpoints").glob("step-*")):
            step = int(ckpt.name[5:])
            metrics = {"step": float(step), **step_metrics(job, run.steps.get(step, {}))}
            if self.store.add_checkpoint(job["id"], step, metrics, ckpt):
                self.store.add_event(job["id"], f"Checkpoint created at step {step} with Snapshot ID: "
                                                f"{checkpoint_name(job, step)}", key=f"ckpt-{step}",
                                     data={"checkpoint_step": step})  # for clients: no need to parse the message

    # ---- ends

    def _succeed(self, job: dict, run: _Run) -> None:
        (run.run_dir / "STOP").unlink(missing_ok=True)  # a pause asked for after the last step
        summary = json.loads((run.run_dir / "summary.json").read_text(encoding="utf-8"))
        result_files = [self._result_file(job, "step_metrics.csv",
                                          _metrics_csv(run.run_dir / "metrics.jsonl", objective_of(job),
                                                       rft_metrics(job) if objective_of(job) == "grpo" else None))]
        for suffix in ("md", "html"):  # the same report as text, and self-contained with its plots
            report = run.run_dir / "eval" / f"report.{suffix}"
            if report.is_file():
                result_files.append(self._result_file(job, f"eval_report.{suffix}", report.read_bytes()))
        name = model_name(job)
        job = {**job, "fine_tuned_model": name, "total_steps": summary["steps"]}
        try:
            self._serve(job)
        except Exception as exc:
            return self._fail(job["id"], "model_not_loadable", f"the trained model cannot be served: {exc}", None,
                              from_status=("running", "paused", "queued"))
        if self.store.set_job(job["id"], when_status=["running", "paused", "queued"], status="succeeded",
                              fine_tuned_model=name, finished_at=now(), trained_tokens=summary["trained_tokens"],
                              result_files=result_files, estimated_finish=None, total_steps=summary["steps"]):
            self.store.add_event(job["id"], f"New fine-tuned model created: {name}", key="model")
            self.store.add_event(job["id"], "The job has successfully completed", key="succeeded")

    def _result_file(self, job: dict, filename: str, content: bytes) -> str:
        tmp = self.store.upload_tmp()
        tmp.write_bytes(content)
        sha, size = self.store.put_blob(tmp)
        file_id = new_id("file-")
        self.store.add_file({"id": file_id, "project": job["project"], "created_at": now(), "bytes": size,
                             "filename": filename, "purpose": "fine-tune-results", "status": "processed",
                             "status_details": None, "sha256": sha, "examples": None})
        return file_id

    def _serve(self, job: dict) -> None:
        """Put the job's model (and its kept LoRA checkpoints) in /v1/models for its project."""
        from tunekit.generate.models import ModelSpec, load_models
        run_dir = self.store.dir / "jobs" / job["id"] / "run"
        specs = [ModelSpec(job["fine_tuned_model"], str(run_dir))]
        chained = job["base"].startswith("ckpt:") or (Path(job["base"]) / "config.yaml").is_file()
        method = job["overrides"].get("method", "lora")
        last = run_dir / "checkpoints" / f"step-{job['total_steps']:06d}"
        if method != "full" and not chained:  # a checkpoint adapter on the plain base (chains: merged base)
            for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
                if ckpt != last:
                    specs.append(ModelSpec(checkpoint_name(job, int(ckpt.name[5:])), str(ckpt)))
        shared = {s.weights.key: s.weights for s in self.state.models.values()}
        served = load_models(specs, self.state.device, shared=shared)
        if last.is_dir():  # the last checkpoint is the fine-tuned model: its name serves those weights too
            name = checkpoint_name(job, job["total_steps"])
            served[name] = replace(served[job["fine_tuned_model"]], name=name, path=str(last))
        self.state.model_owner = {**self.state.model_owner, **{name: job["project"] for name in served}}
        self.state.models = {**self.state.models, **served}  # a new dict: requests may be reading the old one


def unserve(state, job: dict) -> list[str]:
    """Take a job's model and its checkpoint models out of /v1/models; returns their names."""
    gone = [n for n in state.models if n == job["fine_tuned_model"] or n.startswith(job["fine_tuned_model"] + ":ckpt-")]
    state.models = {n: s for n, s in state.models.items() if n not in gone}
    state.model_owner = {n: p for n, p in state.model_owner.items() if n not in gone}
    return gone


# Metric names in events, checkpoint objects and step_metrics.csv -> metrics.jsonl keys (tunekit.train.loop).
# SFT: OpenAI's names. DPO (OpenAI documents none): the loss as train_loss / valid_loss, rewards by TRL's names.
SFT_METRICS = {"train_loss": "train_loss", "train_mean_token_accuracy": "train_token_accuracy",
               "valid_loss": "valid_loss", "valid_mean_token_accuracy": "valid_token_accuracy"}
DPO_METRICS = {"train_loss": "train_loss", "train_reward_accuracy": "reward_accuracy",
               "train_reward_margin": "reward_margin", "train_chosen_reward": "reward_chosen",
               "train_rejected_reward": "reward_rejected", "valid_loss": "valid_loss",
               "valid_reward_accuracy": "valid_reward_accuracy", "valid_reward_margin": "valid_reward_margin",
               "valid_chosen_reward": "valid_reward_chosen", "valid_rejected_reward": "valid_reward_rejected"}


# Reinforcement (objective: grpo, tunekit.train.grpo's metrics): OpenAI's RFT event keys where it has one
# (train_mean_reward, full_valid_mean_reward, completion_tokens_mean), tunekit's others with a train_ / valid_
# prefix; a multi grader adds train_reward_mean/KEY and valid_reward_mean/KEY per sub-grader (`rft_metrics`).
RFT_METRICS = {"train_mean_reward": "reward_mean", "full_valid_mean_reward": "valid_reward_mean",
               "completion_tokens_mean": "completion_tokens_mean",
               "valid_completion_tokens_mean": "valid_completion_tokens_mean", "train_loss": "train_loss",
               "train_reward_std": "reward_std", "train_no_signal_share": "no_signal_share", "train_kl": "kl",
               "train_clipped_share": "clipped_share", "train_grader_error_share": "grader_error_share",
               "train_stopped_share": "stopped_share"}


def _sub_graders(job: dict) -> dict:
    """{key: sub-grader} of a reinforcement job's multi grader ({} for any other grader or job)."""
    from tunekit.eval.graders import multi_graders

    grader = job["overrides"].get("grpo", {}).get("grader") or {}
    return (multi_graders(grader.get("graders")) or {}) if grader.get("type") == "multi" else {}


def rft_metrics(job: dict) -> dict:
    """API name -> metrics.jsonl key of a reinforcement job: RFT_METRICS and its sub-graders' means."""
    subs = {}
    for key in _sub_graders(job):
        subs[f"train_reward_mean/{key}"] = f"reward/{key}"
        subs[f"valid_reward_mean/{key}"] = f"valid_reward/{key}"
    return {**RFT_METRICS, **subs}


def rft_scores(job: dict, row: dict) -> dict:
    """OpenAI's `scores` object of an RFT metrics event: the step's train and validation reward means, and per
    grader (the grader itself, or each sub-grader of a multi) its own means."""
    grader = job["overrides"]["grpo"]["grader"]
    subs = _sub_graders(job)
    graders = [{"name": grader.get("name"), "type": grader.get("type"), "train_reward_mean": row.get("reward_mean"),
                "valid_reward_mean": row.get("valid_reward_mean")}] if not subs else [
        {"name": sub.get("name", key), "type": sub.get("type"), "train_reward_mean": row.get(f"reward/{key}"),
         "valid_reward_mean": row.get(f"valid_reward/{key}")} for key, sub in subs.items()]
    return {"train_reward_mean": row.get("reward_mean"), "valid_reward_mean": row.get("valid_reward_mean"),
            "graders": graders}


def metric_names(job: dict) -> dict:
    """API name -> metrics.jsonl key of the job's metrics events and checkpoint objects."""
    objective = objective_of(job)
    if objective == "grpo":
        return rft_metrics(job)
    return DPO_METRICS if objective == "dpo" else SFT_METRICS


def step_metrics(job: dict, row: dict) -> dict:
    """The metrics of one metrics.jsonl row under their API names (None where the step has no such value:
    validation metrics only on validation steps)."""
    return {name: row.get(key) for name, key in metric_names(job).items()}


# step_metrics.csv of a supervised job: OpenAI's header, column -> metrics.jsonl key. tunekit's validation
# is always a pass over the whole validation set, so the full_valid_* columns repeat valid_* (as the
# metrics events do), on the steps that have one.
SFT_CSV = {"train_loss": "train_loss", "train_accuracy": "train_token_accuracy", "valid_loss": "valid_loss",
           "valid_mean_token_accuracy": "valid_token_accuracy", "full_valid_loss": "valid_loss",
           "full_valid_mean_token_accuracy": "valid_token_accuracy"}


def _metrics_csv(path: Path, objective: str = "sft", names: dict | None = None) -> bytes:
    """step_metrics.csv: one row per logged step (OpenAI's columns; DPO and reinforcement: the flat metrics of
    the metrics events, `names`), a validation column empty on steps without validation. Every column is a
    number or empty: readers such as W&B's `WandbLogger.sync` call `isnan` on each cell."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = names or (DPO_METRICS if objective == "dpo" else SFT_CSV)
    writer.writerow(["step", *names])
    columns = list(names.values())
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        writer.writerow([row["step"]] + [row.get(c, "") if row.get(c) is not None else "" for c in columns])
    return out.getvalue().encode()
