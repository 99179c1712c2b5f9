"""Runs eval runs: one thread that takes queued runs oldest first and writes one output item per data row.

A run, top to bottom (`EvalRunner._execute`):
1. `queued` -> `in_progress`; the eval's criteria, and the rows: inline (`file_content`) or read from the
   project's file (`file_id`: a line that is not JSON, or whose item does not match the eval's item_schema,
   becomes an errored item).
2. for each chunk of rows not yet written: the samples (a `jsonl` row's own sample, or a `completions`
   model's answer to the rendered `input_messages`: the chunk's prompts go to the engine together, so they
   generate as one batch), then each criterion graded (`tunekit.eval.graders.grade`, judges on served
   models, Python in the app's sandbox), then the output item written together with the run's new counts
   (`Store.add_output_item`, one transaction, only while the run is still `in_progress`).
3. `completed` (or `failed` with an error object: the file or the model is gone).

Restart-safe: an item is written at most once per row (UNIQUE (run, row)) and with the counts it changes, so
a run found `in_progress` when the server starts again continues at its first row without an item, with
its counts as they were. While the server stops, nothing generated after the stop began is written (a
generation the engine abandons would otherwise read as an errored row). Cancelling or deleting a run makes
its next write fail, which ends it.

Counting (OpenAI documents none; our choice): an item is `error` when its sample could not be produced
(generation failed, a missing template variable, a bad file line) or a criterion failed to grade (a Python
exception, a judge that could not be called; `GradeResult.error_message`); `pass` when every criterion
passed; `fail` otherwise. `result_counts.total` is the number of items written so far. Per criterion,
`passed`/`failed` count the items that have a sample (an errored grade counts as failed).
`per_model_usage` sums the model under test and every judge, one entry per model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass, field

from tunekit.serve.deps import visible_models
from tunekit.serve.errors import APIError
from tunekit.serve.evals import NO_ERROR, hex_id, item_problems, item_validator
from tunekit.serve.graders import ServedJudge, complete, message_text, usage_per_model
from tunekit.serve.store import now

log = logging.getLogger("tunekit.serve")

DEFAULT_MAX_TOKENS = 256  # completion tokens per sample when sampling_params give none
DEFAULT_SEED = 42  # completions runs sample reproducibly unless sampling_params give a seed
CHUNK = 16  # rows whose samples are generated together (one engine batch)


@dataclass
class Row:
    index: int  # datasource_item_id: the row's 0-based position (a file's line order, blank lines skipped)
    item: dict
    sample: dict | None = None  # a jsonl row's own sample
    error: dict | None = None  # {code, message}: the row cannot be used (bad line, item_schema mismatch)


@dataclass
class Tally:
    """A run's counts, kept as its items are written (and rebuilt from them when a run resumes)."""

    criteria: list[str]
    counts: dict = field(default_factory=lambda: {"total": 0, "errored": 0, "failed": 0, "passed": 0})
    per_criterion: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.per_criterion = {c: {"passed": 0, "failed": 0} for c in self.criteria}

    def add(self, item: dict) -> None:
        self.counts["total"] += 1
        self.counts[{"pass": "passed", "fail": "failed"}.get(item["status"], "errored")] += 1
        for result in item["results"]:
            counts = self.per_criterion.setdefault(result["testing_criteria"], {"passed": 0, "failed": 0})
            counts["passed" if result["passed"] else "failed"] += 1
        for model, u in item["usage"].items():
            total = self.usage.setdefault(model, {"invocation_count": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                                  "total_tokens": 0, "cached_tokens": 0})
            for key in ("invocation_count", "prompt_tokens", "completion_tokens", "cached_tokens"):
                total[key] += u[key]
            total["total_tokens"] = total["prompt_tokens"] + total["completion_tokens"]

    def fields(self) -> dict:
        return {"result_counts": dict(self.counts),
                "per_testing_criteria_results": [{"testing_criteria": c, **n} for c, n in self.per_criterion.items()],
                "per_model_usage": [{"model_name": m, **u} for m, u in self.usage.items()]}


class RunGone(Exception):
    """The run was cancelled or deleted, or the server is stopping: write nothing more."""


class EvalRunner:
    def __init__(self, state, *, poll_s: float = 0.5):
        self.state, self.store, self.poll_s = state, state.store, poll_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tunekit-serve-evals", daemon=True)

    # ---- life

    def start(self) -> None:
        """Start the thread (after the worker has served the fine-tuned models runs may sample from); runs
        left `in_progress` by a stopped server continue at their first row without an output item."""
        resumed = self.store.eval_runs(status=["in_progress"])
        if resumed:
            log.info("eval runs continuing after a restart: %s", ", ".join(r["id"] for r in resumed))
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # a bug here must not end the thread: log it, try again next pass
                if not self._stopping.is_set():
                    log.exception("eval runner pass failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _tick(self) -> None:
        # runs a stopped server left in_progress first, then queued ones, each oldest first
        for run in self.store.eval_runs(status=["in_progress"]) + self.store.eval_runs(status=["queued"]):
            if self._stopping.is_set():
                return
            try:
                self._execute(run)
            except RunGone:
                continue
            except Exception as exc:
                if self._stopping.is_set():
                    return
                log.exception("eval run %s failed", run["id"])
                self._fail(run, "internal_error", f"{type(exc).__name__}: {exc}")

    def _fail(self, run: dict, code: str, message: str) -> None:
        self.store.set_eval_run(run["id"], when_status=("queued", "in_progress"), status="failed",
                                error={"code": code, "message": message}, finished_at=now())

    # ---- a run

    def _execute(self, run: dict) -> None:
        store = self.store
        if run["status"] == "queued" and not store.set_eval_run(run["id"], when_status=["queued"],
                                                                status="in_progress"):
            return  # cancelled or deleted meanwhile
        ev = store.eval(run["project"], run["eval_id"])
        if ev is None:
            return  # deleted with its runs
        source = run["data_source"]
        if source["type"] == "completions" and source["model"] not in visible_models(self.state, run["project"]):
            return self._fail(run, "model_not_found", f"the model {source['model']!r} is no longer served")
        try:
            rows = self._rows(run, ev)
        except FileNotFoundError as exc:
            return self._fail(run, "file_not_found", str(exc))
        tally = Tally([c["id"] for c in ev["testing_criteria"]])
        done = set()
        for item in store.output_items(run["id"]):
            tally.add(item)
            done.add(item["datasource_item_id"])
        todo = [r for r in rows if r.index not in done]
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            for row, sample in zip(chunk, self._samples(run, chunk), strict=True):
                item = self._item(run, ev, row, sample)
                tally.add(item)
                if self._stopping.is_set() or not store.add_output_item(item, tally.fields()):
                    raise RunGone()
        store.set_eval_run(run["id"], when_status=["in_progress"], status="completed", finished_at=now())

    def _rows(self, run: dict, ev: dict) -> list[Row]:
        source = run["data_source"]["source"]
        if source["type"] == "file_content":  # checked against the item schema at create
            return [Row(i, r["item"], r.get("sample")) for i, r in enumerate(source["content"])]
        file = self.store.file(run["project"], source["id"])
        if file is None:
            raise FileNotFoundError(f"the file {source['id']} was deleted")
        validator = item_validator(ev["data_source_config"]["item_schema"])
        rows = []
        text = self.store.blob_path(file["sha256"]).read_text(encoding="utf-8-sig", errors="replace")
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        for index, (number, line) in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                rows.append(Row(index, {}, error={"code": "invalid_json", "message": f"line {number}: {exc}"}))
                continue
            if not isinstance(record, dict):
                rows.append(Row(index, {}, error={"code": "invalid_item",
                                                  "message": f"line {number} is not a JSON object"}))
                continue
            # OpenAI's row shape is {"item": {...}, "sample"?: {...}}; a line without "item" is the item itself
            item = record["item"] if isinstance(record.get("item"), dict) else record
            sample = record.get("sample") if item is not record and isinstance(record.get("sample"), dict) else None
            problems = item_problems(validator, item)
            error = {"code": "invalid_item", "message": f"line {number} does not match the eval's item_schema: "
                                                        + "; ".join(problems[:3])} if problems else None
            rows.append(Row(index, item, sample, error))
        return rows

    # ---- samples

    def _samples(self, run: dict, rows: list[Row]) -> list[dict]:
        """Per row: {"sample": the graders' sample namespace, "echo": the output item's sample, "usage"} or
        {"error": {code, message}, "echo": ...}."""
        source = run["data_source"]
        if source["type"] == "jsonl":
            return [self._given_sample(row) for row in rows]
        return self._generated(run, rows)

    @staticmethod
    def _given_sample(row: Row) -> dict:
        from tunekit.eval.graders import make_sample

        echo = {"input": [], "output": [], "finish_reason": "stop", "model": "",
                "usage": {"total_tokens": 0, "completion_tokens": 0, "prompt_tokens": 0, "cached_tokens": 0},
                "error": NO_ERROR, "temperature": 1.0, "max_completion_tokens": 0, "top_p": 1.0, "seed": 0}
        if row.error is not None:
            return {"error": row.error, "echo": {**echo, "error": row.error}}
        if row.sample is None:
            return {"sample": None, "echo": echo, "usage": {}}
        given = row.sample
        text = given.get("output_text")
        if not isinstance(text, str):  # a chat completion's choices
            try:
                text = given["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                text = None
            text = text if isinstance(text, str) else ""
        tools = given.get("output_tools") or given.get("tool_calls")
        sample = make_sample(text, tool_calls=tools if isinstance(tools, list) else None,
                             output_json=given.get("output_json"), json_from_text=True)
        echo = {**echo, "output": [{"role": "assistant", "content": text}], "model": str(given.get("model", ""))}
        return {"sample": sample, "echo": echo, "usage": {}}

    def _generated(self, run: dict, rows: list[Row]) -> list[dict]:
        from tunekit.eval.graders import make_sample

        source = run["data_source"]
        params = source.get("sampling_params", {})
        sampling = {"max_tokens": params.get("max_completion_tokens", DEFAULT_MAX_TOKENS),
                    "temperature": params.get("temperature", 1.0), "top_p": params.get("top_p", 1.0),
                    "seed": params.get("seed", DEFAULT_SEED), "tools": params.get("tools")}
        model = source["model"]
        echo = {"input": [], "output": [], "finish_reason": "stop", "model": model,
                "usage": {"total_tokens": 0, "completion_tokens": 0, "prompt_tokens": 0, "cached_tokens": 0},
                "error": NO_ERROR, "temperature": float(sampling["temperature"]),
                "max_completion_tokens": int(sampling["max_tokens"]), "top_p": float(sampling["top_p"]),
                "seed": int(sampling["seed"])}
        prompts: list[list[dict] | dict] = []
        for row in rows:
            if row.error is not None:
                prompts.append(row.error)
                continue
            try:
                prompts.append(render_messages(source["input_messages"], row.item))
            except ValueError as exc:
                prompts.append({"code": "invalid_variable", "message": str(exc)})

        async def generate_all():
            jobs = [complete(self.state, run["project"], model, p, **sampling) for p in prompts if isinstance(p, list)]
            return iter(await asyncio.gather(*jobs, return_exceptions=True))

        done = asyncio.run(generate_all())
        if self._stopping.is_set():  # the engine may have abandoned these generations
            raise RunGone()
        out = []
        for messages in prompts:
            if isinstance(messages, dict):  # the row's error
                out.append({"error": messages, "echo": {**echo, "error": messages}})
                continue
            shown = [{"role": m["role"], "content": m["content"]} for m in messages]
            result = next(done)
            if isinstance(result, BaseException):
                error = {"code": getattr(result, "code", None) or "generation_error",
                         "message": getattr(result, "message", None) or f"{type(result).__name__}: {result}"}
                if not isinstance(result, APIError):
                    log.error("eval run %s: generation failed", run["id"], exc_info=result)
                out.append({"error": error, "echo": {**echo, "input": shown, "error": error}})
                continue
            output = {"role": "assistant", "content": result.text}
            if result.tool_calls:
                output["tool_calls"] = result.tool_calls
            usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                     "total_tokens": result.prompt_tokens + result.completion_tokens,
                     "cached_tokens": result.cached_tokens}
            out.append({"sample": {**make_sample(result.text, tool_calls=result.tool_calls,
                                                 finish_reason=result.finish_reason), "model": model},
                        "echo": {**echo, "input": shown, "output": [output], "finish_reason": result.finish_reason,
                                 "usage": usage},
                        "usage": {model: {"invocation_count": 1, **usage}}})
        return out

    # ---- grading

    def _item(self, run: dict, ev: dict, row: Row, sampled: dict) -> dict:
        from tunekit.eval.graders import grade, make_sample

        item = {"id": hex_id("outputitem_"), "run_id": run["id"], "eval_id": run["eval_id"], "created_at": now(),
                "datasource_item_id": row.index, "datasource_item": row.item, "sample": sampled["echo"]}
        if "error" in sampled:
            return {**item, "status": "error", "results": [], "usage": {}}
        sample = sampled["sample"] if sampled["sample"] is not None else make_sample("", json_from_text=False)
        usage = {m: dict(u) for m, u in sampled["usage"].items()}
        judge = ServedJudge(self.state, run["project"])
        results, errored = [], False
        for criterion in ev["testing_criteria"]:
            graded = grade(criterion, sample, row.item, judge=judge, sandbox=self.state.sandbox)
            if self._stopping.is_set():
                raise RunGone()
            passed = bool(graded.passed)  # None only without a threshold, which create refuses for criteria
            errored = errored or graded.error_message is not None
            judged = usage_per_model(graded.token_usage)
            results.append({"name": criterion["name"], "type": criterion["type"], "score": graded.reward,
                            "passed": bool(passed) and graded.error_message is None, "sample": None,
                            "testing_criteria": criterion["id"], "error": graded.error_message,
                            "token_usage": judged})
            for model, u in judged.items():
                total = usage.setdefault(model, {"invocation_count": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                                 "total_tokens": 0, "cached_tokens": 0})
                total["invocation_count"] += 1
                for key in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"):
                    total[key] += u[key]
        status = "error" if errored else "pass" if all(r["passed"] for r in results) else "fail"
        return {**item, "status": status, "results": results, "usage": usage}


def render_messages(input_messages: dict, item: dict) -> list[dict]:
    """The chat messages of one row: the template's messages with {{item.*}} filled in, or the item field an
    item_reference names (a list of {"role", "content"} messages). ValueError names what is missing."""
    from tunekit.eval.graders.template import MissingVariable, lookup, parse_path, render

    if input_messages["type"] == "item_reference":
        ref = input_messages["item_reference"]
        try:
            value = lookup(parse_path(ref), item, {})
        except MissingVariable as exc:
            raise ValueError(f"the item has no {exc.path} (input_messages.item_reference {ref!r})") from None
        if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                  for m in value):
            raise ValueError(f"{ref} must be a list of {{\"role\", \"content\"}} messages")
        try:
            return [{"role": m["role"], "content": message_text(m.get("content") or "")} for m in value]
        except ValueError as exc:
            raise ValueError(f"{ref}: {exc}") from None
    out = []
    for message in input_messages["template"]:
        try:
            text = render(message["content"]["text"], item, {})
        except MissingVariable as exc:
            raise ValueError(f"the item has no {exc.path} (a variable of input_messages)") from None
        out.append({"role": message["role"], "content": text})
    return out
