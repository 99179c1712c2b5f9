"""OpenAI's Evals API on `tunekit serve`, driven by the openai SDK with strict response validation.

A live server with a data dir serves the tiny Llama of conftest as `tiny`; one fine-tuning job of two steps
makes an `ft:` model of it. Evals on the toy "say WORD" task run on both models; what a run reports
(result_counts, per criterion, per model usage) is checked against counts made here from its output items,
and a sample against the chat completion of the same prompt.
"""

from __future__ import annotations

import json
import time

import pytest

openai = pytest.importorskip("openai", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("jsonschema", reason="eval item schemas need jsonschema (the serve extra)")
pytest.importorskip("multipart", reason="uploads need python-multipart (the serve extra)")
pytest.importorskip("rapidfuzz", reason="the text_similarity criterion needs the graders extra")

from live_server import serving  # noqa: E402

ITEM_SCHEMA = {"type": "object", "properties": {"word": {"type": "string"}, "expected": {"type": "string"}},
               "required": ["word", "expected"]}
CRITERIA = [
    {"type": "string_check", "name": "says the word", "input": "{{sample.output_text}}",
     "reference": "{{item.word}}", "operation": "ilike"},
    {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}", "reference": "{{item.expected}}",
     "evaluation_metric": "fuzzy_match", "pass_threshold": 0.3},
    {"type": "python", "name": "short", "pass_threshold": 0.5,
     "source": "def grade(sample, item):\n    return 1.0 if len(sample['output_text']) < 40 else 0.0\n"},
]
WORDS = ["apple", "river", "stone", "cloud", "green"]
ROWS = [{"item": {"word": w, "expected": f"{w} {w} {w}"}} for w in WORDS]
TEMPLATE = {"type": "template", "template": [{"role": "developer", "content": "Repeat the word."},
                                             {"role": "user", "content": "say {{item.word}}"}]}
SAMPLING = {"temperature": 0, "max_completion_tokens": 8, "seed": 3}


def sdk(url: str, key: str = "anything", strict: bool = True) -> openai.OpenAI:
    # max_retries=0: the SDK retries 409 and 5xx, which would hide them
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120,
                         _strict_response_validation=strict)


def make_eval(client, name: str = "say", criteria=None, **config):
    return client.evals.create(name=name, metadata={"task": "toy"}, testing_criteria=criteria or CRITERIA,
                               data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA, **config})


def completions(model: str, rows=ROWS, messages=TEMPLATE, sampling=SAMPLING) -> dict:
    return {"type": "completions", "model": model, "source": {"type": "file_content", "content": rows},
            "input_messages": messages, "sampling_params": sampling}


def wait_run(client, eval_id: str, run_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
        if run.status in ("completed", "failed", "canceled"):
            return run
        assert time.monotonic() < deadline, f"run still {run.status}"
        time.sleep(0.2)


def counted(items, model: str) -> tuple[dict, dict, dict]:
    """(result_counts, per criterion {id: (passed, failed)}, usage of `model`: its samples and its judgements)
    made from output items."""
    counts = {"total": len(items), "passed": 0, "failed": 0, "errored": 0}
    per, usage = {}, {"prompt_tokens": 0, "completion_tokens": 0, "invocation_count": 0}
    for item in items:
        counts[{"pass": "passed", "fail": "failed", "error": "errored"}[item.status]] += 1
        for r in item.results:
            passed, failed = per.get(r.testing_criteria, (0, 0))
            per[r.testing_criteria] = (passed + r.passed, failed + (not r.passed))
        if item.sample.model and item.sample.error.code == "":
            usage["prompt_tokens"] += item.sample.usage.prompt_tokens
            usage["completion_tokens"] += item.sample.usage.completion_tokens
            usage["invocation_count"] += 1
        for judged in (r.to_dict()["token_usage"].get(model) for r in item.results):
            if judged:  # a judge criterion on the model under test
                usage["prompt_tokens"] += judged["prompt_tokens"]
                usage["completion_tokens"] += judged["completion_tokens"]
                usage["invocation_count"] += 1
    return counts, per, usage


def check_report(client, run) -> list:
    """The run's counts equal those made from its output items (listed in pages of 2); returns the items."""
    items = list(client.evals.runs.output_items.list(run.id, eval_id=run.eval_id, limit=2))
    assert [i.datasource_item_id for i in items] == list(range(len(items))) and len({i.id for i in items}) == len(items)
    counts, per, usage = counted(items, run.model)
    assert run.result_counts.model_dump() == counts
    assert {r.testing_criteria: (r.passed, r.failed) for r in run.per_testing_criteria_results} == per
    if run.model:
        [mine] = [u for u in run.per_model_usage if u.run_model_name == run.model]
        assert {k: getattr(mine, k) for k in usage} == usage
        assert mine.total_tokens == mine.prompt_tokens + mine.completion_tokens
    for status in ("pass", "fail"):
        listed = list(client.evals.runs.output_items.list(run.id, eval_id=run.eval_id, status=status))
        assert [i.id for i in listed] == [i.id for i in items if i.status == status]
    return items


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    data_dir = tmp_path_factory.mktemp("evals-data")
    with serving(models=[f"tiny={tiny_llama_dir}"], data_dir=data_dir, threads=1) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def ft_model(server) -> str:
    """A fine-tuned model of `tiny` from a 2-step job of the jobs API (LoRA, a few seconds)."""
    from test_finetune import tiny_job, toy_jsonl, upload, wait_for

    client = sdk(server[0])
    job = client.fine_tuning.jobs.create(model="tiny", training_file=upload(client, toy_jsonl(12, 0)).id,
                                         hyperparameters={"batch_size": 4, "n_epochs": 1},
                                         extra_body=tiny_job(max_steps=2))
    job = wait_for(client, job.id, ("succeeded", "failed"), timeout=240)
    assert job.status == "succeeded", job.error
    return job.fine_tuned_model


# --------------------------------------------------------------------------------------------------
# Evals


def test_an_eval_is_echoed_in_openais_response_form_and_listed(server):
    client = sdk(server[0])
    ev = make_eval(client, include_sample_schema=True)
    assert ev.id.startswith("eval_") and len(ev.id) == 5 + 32 and ev.object == "eval"
    schema = ev.data_source_config.schema_
    assert (ev.data_source_config.type, schema["required"]) == ("custom", ["item", "sample"])
    assert schema["properties"]["item"] == ITEM_SCHEMA and schema["properties"]["sample"]["type"] == "object"
    assert (ev.name, ev.metadata) == ("say", {"task": "toy"})
    echoed = [c.model_dump(exclude_none=True) for c in ev.testing_criteria]
    for sent, got in zip(CRITERIA, echoed, strict=True):
        assert got["id"].startswith(sent["name"] + "-") and {k: v for k, v in got.items() if k != "id"} == sent
    assert client.evals.retrieve(ev.id).model_dump() == ev.model_dump()
    plain = make_eval(client, name="plain")
    assert plain.data_source_config.schema_ == {"type": "object", "properties": {"item": ITEM_SCHEMA},
                                                 "required": ["item"]}

    third = make_eval(client, name="third")
    updated = client.evals.update(plain.id, name="renamed", metadata={"v": "2"})
    assert (updated.name, updated.metadata, updated.created_at) == ("renamed", {"v": "2"}, plain.created_at)
    mine = {ev.id, plain.id, third.id}
    pages = [e.id for e in client.evals.list(limit=1) if e.id in mine]  # pages of one, oldest first
    assert pages == [ev.id, plain.id, third.id]
    assert [e.id for e in client.evals.list(order="desc") if e.id in mine] == [third.id, plain.id, ev.id]
    by_update = [e.id for e in client.evals.list(order_by="updated_at", order="desc", limit=100) if e.id in mine]
    assert by_update.index(plain.id) <= 1  # updated last: first, or tied with `third` to the second
    deleted = client.evals.delete(third.id)
    assert (deleted.object, deleted.deleted, deleted.eval_id) == ("eval.deleted", True, third.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.evals.retrieve(third.id)
    assert err.value.param == "eval_id"


@pytest.mark.parametrize("body, param, words", [
    ({"testing_criteria": [{**CRITERIA[0], "operation": "is"}, {**CRITERIA[1], "pass_threshold": None}]},
     "testing_criteria[0].operation", ["testing_criteria[1].pass_threshold", "2 problems"]),
    ({"testing_criteria": [{"type": "multi", "name": "m", "graders": {"a": CRITERIA[0]}, "calculate_output": "a"}]},
     "testing_criteria[0].type", ["multi"]),
    ({"testing_criteria": [{**CRITERIA[0], "reference": "{{item.label}}"}]},
     "testing_criteria[0].reference", ["label"]),
    ({"testing_criteria": [{"type": "score_model", "name": "j", "model": "gpt-4o",
                            "input": [{"role": "user", "content": "{{sample.output_text}}"}]}]},
     "testing_criteria[0].model", ["gpt-4o", "tiny"]),
    ({"data_source_config": {"type": "custom", "item_schema": {"type": "objekt"}}},
     "data_source_config.item_schema", ["objekt"]),
    ({"data_source_config": {"type": "custom", "item_schema": {"$ref": "https://example.com/item.json"}}},
     "data_source_config.item_schema", ["example.com"]),  # never fetched
    ({"data_source_config": {"type": "logs"}}, "data_source_config.type", ["logs"]),
])
def test_a_bad_eval_is_a_400_naming_the_param(server, body, param, words):
    request = {"name": "bad", "data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA},
               "testing_criteria": CRITERIA, **body}
    with pytest.raises(openai.BadRequestError) as err:
        sdk(server[0]).evals.create(**request)
    assert err.value.param == param and all(w in err.value.body["message"] for w in words), err.value.body


# --------------------------------------------------------------------------------------------------
# Runs


def test_completions_runs_on_the_base_and_a_fine_tuned_model(server, ft_model):
    client = sdk(server[0])
    ev = make_eval(client)
    for model in ("tiny", ft_model):
        run = client.evals.runs.create(ev.id, name=f"on {model}", metadata={"m": "1"}, data_source=completions(model))
        assert (run.status, run.model, run.name, run.error.code) == ("queued", model, f"on {model}", "")
        assert run.id.startswith("evalrun_") and run.report_url.endswith(f"/#/evals/{ev.id}")  # the dashboard page
        run = wait_run(client, ev.id, run.id)
        assert run.status == "completed" and run.result_counts.total == len(ROWS)
        items = check_report(client, run)
        assert run.data_source.input_messages.template[1].model_dump(exclude_none=True) == {
            "type": "message", "role": "user", "content": {"type": "input_text", "text": "say {{item.word}}"}}
        first = client.evals.runs.output_items.retrieve(items[0].id, eval_id=ev.id, run_id=run.id)
        assert first.model_dump() == items[0].model_dump()
        assert first.datasource_item == ROWS[0]["item"] and [r.name for r in first.results] == [
            c["name"] for c in CRITERIA]
        sample = first.sample
        assert [m.model_dump() for m in sample.input] == [{"role": "developer", "content": "Repeat the word."},
                                                          {"role": "user", "content": "say apple"}]
        assert (sample.model, sample.temperature, sample.max_completion_tokens, sample.seed) == (model, 0, 8, 3)
        # the sample is the chat completion of the same prompt (greedy)
        reply = client.chat.completions.create(model=model, messages=[m.model_dump() for m in sample.input],
                                               temperature=0, max_completion_tokens=8)
        assert sample.output[0].content == reply.choices[0].message.content
        assert sample.finish_reason == reply.choices[0].finish_reason
        assert sample.usage.prompt_tokens == reply.usage.prompt_tokens
        for item in items:  # each criterion's verdict, recomputed from the sample
            text, word = item.sample.output[0].content, item.datasource_item["word"]
            said, close, short = item.results
            assert (said.passed, said.score) == (word.lower() in text.lower(), float(word.lower() in text.lower()))
            assert close.passed == (close.score >= 0.3) and short.passed == (len(text) < 40)
            assert item.status == ("pass" if all(r.passed for r in item.results) else "fail")
    runs = client.evals.runs.list(ev.id, limit=1)
    assert [r.model for r in runs] == ["tiny", ft_model]
    assert [r.model for r in client.evals.runs.list(ev.id, order="desc")] == [ft_model, "tiny"]
    assert [r.model for r in client.evals.runs.list(ev.id, status="completed")] == ["tiny", ft_model]
    assert list(client.evals.runs.list(ev.id, status="queued")) == []


def test_item_reference_messages_and_a_judge_criterion(server):
    client = sdk(server[0])
    schema = {"type": "object", "properties": {"chat": {}, "word": {"type": "string"}}}  # chat: any JSON
    judge = {"type": "score_model", "name": "judge", "model": "tiny", "range": [0, 1],
             "sampling_params": {"max_completions_tokens": 6},
             "input": [{"role": "user", "content": "Is '{{sample.output_text}}' the word {{item.word}}?"}]}
    ev = client.evals.create(name="ref", data_source_config={"type": "custom", "item_schema": schema},
                             testing_criteria=[judge])
    rows = [{"item": {"word": w, "chat": [{"role": "user", "content": f"say {w}"}]}} for w in WORDS[:2]]
    rows.append({"item": {"word": "x", "chat": "not a list"}})
    run = client.evals.runs.create(ev.id, data_source=completions(
        "tiny", rows, {"type": "item_reference", "item_reference": "item.chat"}))
    run = wait_run(client, ev.id, run.id)
    items = check_report(client, run)
    assert items[2].status == "error" and "item.chat" in items[2].sample.error.message and items[2].results == []
    assert [m.content for m in items[0].sample.input] == ["say apple"]
    for item in items[:2]:
        [result] = item.results
        assert 0 <= result.score <= 1
        assert item.status == ("error" if result.to_dict()["error"] else "pass" if result.passed else "fail")
    judged = [u for u in run.per_model_usage if u.run_model_name == "tiny"]
    generated = sum(i.sample.usage.prompt_tokens for i in items)
    assert judged[0].invocation_count == 4 and judged[0].prompt_tokens > generated  # 2 samples + 2 judgements


def test_jsonl_runs_grade_the_rows_samples_and_bad_file_lines_are_errored_items(server):
    client = sdk(server[0])
    ev = make_eval(client, criteria=CRITERIA[:1])
    lines = [json.dumps({"item": {"word": "apple", "expected": "-"}, "sample": {"output_text": "an APPLE"}}),
             "not json",
             json.dumps({"item": {"word": 5, "expected": "-"}, "sample": {"output_text": "5"}}),
             json.dumps({"word": "stone", "expected": "-"}),  # the item itself, no sample: graded on ""
             json.dumps({"item": {"word": "cloud", "expected": "-"},
                         "sample": {"choices": [{"message": {"content": "a cloud"}}]}})]
    # purpose "evals" is missing from the SDK's FileObject literal: upload with a lenient client
    file = sdk(server[0], strict=False).files.create(file=("rows.jsonl", "\n".join(lines).encode()), purpose="evals")
    run = wait_run(client, ev.id, client.evals.runs.create(ev.id, data_source={
        "type": "jsonl", "source": {"type": "file_id", "id": file.id}}).id)
    assert (run.status, run.model, run.name) == ("completed", "", "jsonl")
    items = check_report(client, run)
    assert [i.status for i in items] == ["pass", "error", "error", "fail", "pass"]
    assert items[1].sample.error.code == "invalid_json" and "line 2" in items[1].sample.error.message
    assert items[2].sample.error.code == "invalid_item" and "item.word" in items[2].sample.error.message
    assert items[3].datasource_item == {"word": "stone", "expected": "-"}
    assert run.result_counts.model_dump() == {"total": 5, "errored": 2, "failed": 1, "passed": 2}

    inline = client.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": [
        {"item": {"word": "a", "expected": "a"}, "sample": {"output_text": "a"}}]}})
    assert wait_run(client, ev.id, inline.id).result_counts.passed == 1


@pytest.mark.parametrize("data_source, param", [
    ({"type": "jsonl", "source": {"type": "file_content", "content": [ROWS[0], {"item": {"word": 1}}]}},
     "data_source.source.content[1].item"),
    ({"type": "jsonl", "source": {"type": "file_id", "id": "file-nope"}}, "data_source.source.id"),
    (completions("gpt-4o"), "data_source.model"),
    (completions("tiny", messages={"type": "template", "template": [
        {"role": "user", "content": "{{sample.output_text}}"}]}), "data_source.input_messages.template[0].content"),
    (completions("tiny", sampling={"temperature": 3}), "data_source.sampling_params.temperature"),
    ({"type": "responses", "source": {"type": "file_content", "content": ROWS}}, "data_source.type"),
    ({"type": "completions", "model": "tiny", "source": {"type": "stored_completions"}}, "data_source.source.type"),
])
def test_a_bad_run_is_a_400_naming_the_param(server, data_source, param):
    client = sdk(server[0])
    ev = make_eval(client)
    with pytest.raises(openai.BadRequestError) as err:
        client.evals.runs.create(ev.id, data_source=data_source)
    assert err.value.param == param, err.value.body
    assert list(client.evals.runs.list(ev.id)) == []


def test_item_schema_problems_are_all_listed(server):
    client = sdk(server[0])
    ev = make_eval(client)
    rows = [ROWS[0], {"item": {"word": 1, "expected": "x"}}, {"item": {"word": "y"}}]
    with pytest.raises(openai.BadRequestError) as err:
        client.evals.runs.create(ev.id, data_source=completions("tiny", rows))
    message = err.value.body["message"]
    assert err.value.param == "data_source.source.content[1].item" and err.value.body["code"] == "invalid_item"
    assert "2 row problem(s)" in message and "content[2].item" in message and "'expected' is a required" in message


def test_cancel_and_delete_runs(server):
    client = sdk(server[0])
    slow = {"type": "python", "name": "slow", "source": "import time\ndef grade(sample, item):\n"
                                                       "    time.sleep(0.3)\n    return 1.0\n"}
    ev = make_eval(client, criteria=[slow])
    rows = [{"item": {"word": "w", "expected": "w"}, "sample": {"output_text": "w"}}] * 20
    run = client.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_content",
                                                                                     "content": rows}})
    canceled = client.evals.runs.cancel(run.id, eval_id=ev.id)
    assert canceled.status == "canceled"
    time.sleep(1)
    after = client.evals.runs.retrieve(run.id, eval_id=ev.id)
    assert after.status == "canceled" and after.result_counts.total < len(rows)
    with pytest.raises(openai.BadRequestError) as err:
        client.evals.runs.cancel(run.id, eval_id=ev.id)
    assert err.value.param == "run_id"
    deleted = client.evals.runs.delete(run.id, eval_id=ev.id)
    assert (deleted.object, deleted.deleted, deleted.run_id) == ("eval.run.deleted", True, run.id)
    for gone in (lambda: client.evals.runs.retrieve(run.id, eval_id=ev.id),
                 lambda: client.evals.runs.output_items.list(run.id, eval_id=ev.id)):
        with pytest.raises(openai.NotFoundError):
            gone()
    # deleting an eval deletes its runs
    other = client.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_content",
                                                                                       "content": rows[:1]}})
    client.evals.delete(ev.id)
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve(other.id, eval_id=ev.id)


# --------------------------------------------------------------------------------------------------
# Restart and projects


def test_a_run_survives_a_server_restart(tmp_path, tiny_llama_dir):
    """Stop the server while a run is mid-way: the next server on the same data dir finishes it, keeping the
    items written before and writing each row once."""
    slow = {"type": "python", "name": "slow", "pass_threshold": 0.5,
            "source": "import time\ndef grade(sample, item):\n    time.sleep(0.15)\n    return float(item['n'] % 2)\n"}
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    rows = [{"item": {"n": n}, "sample": {"output_text": str(n)}} for n in range(24)]
    settings = {"models": [f"tiny={tiny_llama_dir}"], "data_dir": tmp_path, "threads": 1}
    with serving(**settings) as (url, _):
        client = sdk(url)
        ev = client.evals.create(data_source_config={"type": "custom", "item_schema": schema}, testing_criteria=[slow])
        assert ev.name == ""
        run = client.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_content",
                                                                                         "content": rows}})
        deadline = time.monotonic() + 60
        while client.evals.runs.retrieve(run.id, eval_id=ev.id).result_counts.total < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with serving(**settings) as (url, _):
        client = sdk(url)
        stopped = client.evals.runs.retrieve(run.id, eval_id=ev.id)
        before = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id))
        assert stopped.status == "in_progress" and 2 <= len(before) < len(rows), stopped
        run = wait_run(client, ev.id, run.id)
        assert run.status == "completed"
        items = check_report(client, run)
        assert [i.id for i in items[:len(before)]] == [i.id for i in before]
        assert [i.status for i in items] == ["fail", "pass"] * 12
        assert run.result_counts.model_dump() == {"total": 24, "errored": 0, "failed": 12, "passed": 12}


def test_projects_cannot_see_each_others_evals(tmp_path, tiny_llama_dir):
    with serving(models=[f"tiny={tiny_llama_dir}"], data_dir=tmp_path, api_keys=["a:key-a", "b:key-b"],
                 threads=1) as (url, _):
        a, b = sdk(url, "key-a"), sdk(url, "key-b")
        ev = make_eval(a, criteria=CRITERIA[:1])
        run = a.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": [
            {"item": {"word": "w", "expected": "w"}, "sample": {"output_text": "w"}}]}})
        run = wait_run(a, ev.id, run.id)
        [item] = a.evals.runs.output_items.list(run.id, eval_id=ev.id)
        for refused in (lambda: b.evals.retrieve(ev.id), lambda: b.evals.update(ev.id, name="mine"),
                        lambda: b.evals.delete(ev.id), lambda: b.evals.runs.list(ev.id),
                        lambda: b.evals.runs.retrieve(run.id, eval_id=ev.id),
                        lambda: b.evals.runs.cancel(run.id, eval_id=ev.id),
                        lambda: b.evals.runs.delete(run.id, eval_id=ev.id),
                        lambda: b.evals.runs.create(ev.id, data_source=completions("tiny")),
                        lambda: b.evals.runs.output_items.list(run.id, eval_id=ev.id),
                        lambda: b.evals.runs.output_items.retrieve(item.id, eval_id=ev.id, run_id=run.id)):
            with pytest.raises(openai.NotFoundError):
                refused()
        assert ev.id not in {e.id for e in b.evals.list()}
        theirs = sdk(url, "key-b", strict=False).files.create(file=("r.jsonl", b'{"item": {}}\n'), purpose="evals")
        with pytest.raises(openai.BadRequestError) as err:
            a.evals.runs.create(ev.id, data_source={"type": "jsonl", "source": {"type": "file_id", "id": theirs.id}})
        assert err.value.param == "data_source.source.id"
        assert a.evals.retrieve(ev.id).name == "say"
