"""Reinforcement jobs in the fine-tuning API (`method.type: "reinforcement"`), driven by the official openai SDK.

A live server (tests/serve/test_finetune.py's setup) serves the tiny Llama of conftest; jobs train LoRA adapters
with `objective: grpo` on toy prompts ("say WORD", the line's `answer` is WORD) graded by OpenAI graders, for a
couple of steps with 2 completions of 4 tokens per prompt.
"""

from __future__ import annotations

import csv
import io
import json
import random

import pytest
import yaml

openai = pytest.importorskip("openai", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="uploads need python-multipart (the serve extra)")

from conftest import greedy  # noqa: E402
from live_server import serving  # noqa: E402
from test_finetune import QUESTION, sdk, toy_jsonl, upload, wait_for  # noqa: E402
from test_jobs_dpo import logged, pairs_jsonl  # noqa: E402
from toy_runs import WORDS  # noqa: E402

from tunekit.serve.worker import RFT_METRICS  # noqa: E402

DONE = ("succeeded", "failed", "cancelled")
GRADER = {"type": "string_check", "name": "says the word", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "operation": "like"}


def prompts_jsonl(n: int, seed: int) -> bytes:
    """OpenAI's RFT lines: a prompt ending with the user turn, and the field the grader reads."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        word = rng.choice(WORDS)
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"say {word}"}], "answer": word}))
    return ("\n".join(lines) + "\n").encode()


def tiny(**grpo) -> dict:
    """`tunekit` config values (extra_body) for a reinforcement job of a few seconds on the tiny model."""
    return {"tunekit": {"data.max_len": 64, "lora": {"r": 8, "alpha": 16},
                        "train": {"threads": 1, "micro_batch_size": 4, "max_steps": 2, "save_every": 2},
                        "grpo": {"max_new_tokens": 4, **grpo}}}


def rft(grader: dict = GRADER, **hyperparameters) -> dict:
    return {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hyperparameters}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    data_dir = tmp_path_factory.mktemp("serve-data")
    with serving(models=[f"tiny={tiny_llama_dir}"], data_dir=data_dir) as (url, app):
        yield url, app, data_dir


def jobs_count(url: str) -> int:
    """The project's jobs, read without strict validation (a multi grader's map fails the SDK's type)."""
    return len(sdk(url, strict=False).fine_tuning.jobs.list(limit=1000).data)




@pytest.fixture(scope="module")
def prompts(server):
    client = sdk(server[0])
    train, valid = upload(client, prompts_jsonl(12, 0), "prompts.jsonl"), upload(client, prompts_jsonl(3, 1), "v.jsonl")
    assert (train.status, valid.status) == ("processed", "processed"), (train.status_details, valid.status_details)
    return train, valid


# --------------------------------------------------------------------------------------------------
# A reinforcement job


ASKED = {"n_epochs": "auto", "batch_size": 2, "learning_rate_multiplier": "auto", "compute_multiplier": 0.5,
         "eval_interval": 1}


@pytest.fixture(scope="module")
def rft_job(server, prompts):
    """(the job as created, as finished): a string_check reward, 2 steps of 2 prompts x 2 completions."""
    client = sdk(server[0])
    train, valid = prompts
    created = client.fine_tuning.jobs.create(model="tiny", training_file=train.id, validation_file=valid.id,
                                             suffix="rft", method=rft(**ASKED), extra_body=tiny())
    return created, wait_for(client, created.id, DONE)


def test_reinforcement_job_end_to_end(server, rft_job):
    """A string_check reward trains to succeeded (strict SDK throughout); the job echoes method reinforcement
    with the grader as sent and the seven hyperparameters resolved; config.yaml is objective: grpo with the
    grader inline and the mapped values; the metrics events, a checkpoint and step_metrics.csv carry the reward
    metrics of metrics.jsonl under OpenAI's RFT keys; the model answers chat as its weights do."""
    url, _, data_dir = server
    client = sdk(url)
    job, done = rft_job
    assert job.method.type == "reinforcement" and job.method.supervised is None and job.method.dpo is None
    assert job.method.reinforcement.grader.to_dict() == GRADER
    assert job.method.reinforcement.hyperparameters.to_dict() == {  # "auto" until resolved
        **ASKED, "eval_samples": "auto", "reasoning_effort": "default"}

    job = done
    assert job.status == "succeeded", job.error
    # 12 prompts: the cookbook rule gives ceil(100 / 12) = 9 epochs; group_size 4 x 0.5 = 2
    resolved = {"n_epochs": 9, "batch_size": 2, "learning_rate_multiplier": 1.0, "compute_multiplier": 0.5,
                "eval_interval": 1, "eval_samples": 1, "reasoning_effort": "default"}
    method = job.method.to_dict()
    assert method == {"type": "reinforcement", "reinforcement": {"grader": GRADER, "hyperparameters": resolved,
                                                                 "response_format": None}}
    assert job.hyperparameters.to_dict() == {"n_epochs": 9, "batch_size": 2, "learning_rate_multiplier": 1.0}
    print("echoed method:", json.dumps(method))

    run_dir = data_dir / "jobs" / job.id / "run"
    import yaml

    config = yaml.safe_load((data_dir / "jobs" / job.id / "config.yaml").read_text())
    assert (config["objective"], config["method"], config["grpo"]["grader"]) == ("grpo", "lora", GRADER)
    assert (config["grpo"]["group_size"], config["grpo"]["max_new_tokens"]) == (2, 4)
    assert (config["train"]["batch_size"], config["train"]["epochs"], config["train"]["eval_every"]) == (2, 9, 1)
    assert config["eval"]["enabled"] is False
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2

    rows = logged(data_dir, job.id)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0 <= r["reward_mean"] <= 1 and r["valid_reward_mean"] is not None for r in rows)
    events = list(reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100))))
    metrics = [e for e in events if e.type == "metrics"]
    assert [m.data["step"] for m in metrics] == [1, 2] and all(m.data["total_steps"] == 2 for m in metrics)
    for event, row in zip(metrics, rows, strict=True):
        assert {k: event.data[k] for k in RFT_METRICS} == {k: row.get(v) for k, v in RFT_METRICS.items()}
        assert event.data["train_mean_reward"] == row["reward_mean"]
        assert event.data["full_valid_mean_reward"] == row["valid_reward_mean"]
        assert event.data["scores"] == {
            "train_reward_mean": row["reward_mean"], "valid_reward_mean": row["valid_reward_mean"],
            "graders": [{"name": "says the word", "type": "string_check", "train_reward_mean": row["reward_mean"],
                         "valid_reward_mean": row["valid_reward_mean"]}]}
        assert f"train mean reward={row['reward_mean']:.4f}" in event.message
        assert f"full validation mean reward={row['valid_reward_mean']:.4f}" in event.message
    assert "full_valid_loss" not in metrics[0].data

    csv_id, *others = job.result_files
    assert client.files.retrieve(csv_id).filename == "step_metrics.csv" and others == []  # no evaluation report
    table = list(csv.DictReader(io.StringIO(client.files.content(csv_id).text)))
    assert list(table[0]) == ["step", *RFT_METRICS]
    for line, row in zip(table, rows, strict=True):
        assert {k: float(v) if v != "" else None for k, v in line.items()} == {
            "step": row["step"], **{k: row.get(v) for k, v in RFT_METRICS.items()}}

    (checkpoint,) = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoint.step_number == 2
    assert checkpoint.metrics.to_dict()["train_mean_reward"] == rows[1]["reward_mean"]
    reply = client.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION, temperature=0,
                                           max_completion_tokens=8)
    assert reply.choices[0].message.content == greedy(run_dir, QUESTION, 8)[0]


def test_sampled_completions_are_listed_with_their_grades(server, rft_job):
    """GET /v1/fine_tuning/jobs/{id}/rollouts (a tunekit extension): the completions of each logged step's first
    prompt as the grader read them, with reward and advantage, newest step first; another kind of job is a 400,
    another project's or an unknown job a 404."""
    url, _, data_dir = server
    client = sdk(url)
    job = rft_job[1]
    listed = client.get(f"/fine_tuning/jobs/{job.id}/rollouts", cast_to=object, options={"params": {"limit": 3}})
    written = [json.loads(x) for x in (data_dir / "jobs" / job.id / "run" / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in written] == [1, 1, 2, 2]  # 2 steps x group 2 (compute_multiplier 0.5)
    newest = [r for r in written if r["step"] == 2] + [r for r in written if r["step"] == 1]
    assert listed["has_more"] is True
    assert [{k: v for k, v in r.items() if k != "object"} for r in listed["data"]] == newest[:3]
    for r in written:
        assert r["reward"] == (1.0 if r["prompt"].split()[-1] in r["completion"] else 0.0)
    with pytest.raises(openai.NotFoundError):
        client.get("/fine_tuning/jobs/ftjob-nope/rollouts", cast_to=object)


def test_dashboard_draws_the_reward_chart(server, rft_job):
    """The job's page in a real browser: a Rewards chart with the train mean reward of each step and the
    validation mean reward at each validation step (dots), the values of the metrics events."""
    dashboard = pytest.importorskip("test_dashboard")
    if not __import__("os").path.exists(dashboard.CHROMIUM):
        pytest.skip(f"no chromium at {dashboard.CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright (the dev extra)")
    url, _, _ = server
    job = rft_job[1]
    assert job.status == "succeeded", job.error
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=dashboard.CHROMIUM, headless=True)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{url.removesuffix('/v1')}/#/jobs/{job.id}")
        page.wait_for_function("document.querySelector('#reward-chart polyline[data-key=train_mean_reward]')"
                               "?.dataset.points === '2'", timeout=60_000)
        drawn = {key: page.get_attribute(f"#reward-chart polyline[data-key={key}]", "data-points")
                 for key in ("train_mean_reward", "full_valid_mean_reward")}
        dots = page.locator("#reward-chart circle.dot.valid").count()
        header = page.inner_text("main .muted >> nth=0")
        page.wait_for_selector("#rollouts tbody tr", timeout=30_000)
        sampled = [[c.strip() for c in row.split("\t")] for row in
                   page.locator("#rollouts tbody tr").all_inner_texts()]
        browser.close()
    assert drawn == {"train_mean_reward": "2", "full_valid_mean_reward": "2"} and dots == 2
    assert "reinforcement, grader says the word" in header and errors == []
    _, _, data_dir = server
    written = [json.loads(x) for x in (data_dir / "jobs" / job.id / "run" / "rollouts.jsonl").read_text().splitlines()]
    newest = [r for r in written if r["step"] == 2] + [r for r in written if r["step"] == 1]
    assert [(int(r[0]), r[1], r[2], float(r[3])) for r in sampled] == \
        [(r["step"], r["prompt"], r["completion"], round(r["reward"], 3)) for r in newest]


def test_a_model_grader_is_judged_by_a_served_model_and_a_grader_failing_everywhere_fails_the_job(server, prompts):
    """A score_model reward whose `model` is a served model: the job's config maps it in grpo.judges to that
    model's path (its judge answers in the training process). The tiny random judge's replies are no score, so
    every grade fails: the job fails at its first generation (8 prompts x 4) with the grader's message, not after an epoch of
    zero rewards."""
    url, _, data_dir = server
    client = sdk(url)
    judge = {"type": "score_model", "name": "judge", "model": "tiny", "range": [0, 1],
             "input": [{"role": "user", "content": "Score 0 to 1: {{sample.output_text}}"}]}
    created = client.fine_tuning.jobs.create(model="tiny", training_file=prompts[0].id, method=rft(judge),
                                             extra_body=tiny())
    done = wait_for(client, created.id, DONE)
    config = yaml.safe_load((data_dir / "jobs" / created.id / "run" / "config.yaml").read_text())
    assert config["grpo"]["judges"] == {"tiny": str(server[1].state.models["tiny"].path)}
    assert done.status == "failed", done
    assert done.error.message.startswith("training stopped: grpo.grader: the grader failed on every one of the 32 "
                                         "completions sampled at step 1: the judge's reply has no numeric result")
    assert done.error.param == "grpo.grader" and done.error.code == "training_failed"


# --------------------------------------------------------------------------------------------------
# Bad input: 400 at create, naming the field, and no job made


BAD = [
    (rft({"type": "string_check", "name": "x", "input": "{{sample.output_text}}", "operation": "eq"}), {},
     "method.reinforcement.grader.reference", "missing: a string_check grader needs reference"),
    (rft({**GRADER, "reference": "{{item.label}}"}), {}, "method.reinforcement.grader.reference", "label"),
    (rft({**GRADER, "operation": "contains"}), {}, "method.reinforcement.grader.operation", "unknown operation"),
    (rft({"type": "score_model", "name": "judge", "model": "gpt-4o-2024-08-06",
          "input": [{"role": "user", "content": "hi"}]}), {},
     "method.reinforcement.grader.model", "the judge model 'gpt-4o-2024-08-06' is not served here (models: "),
    (rft({"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": {
        "type": "label_model", "name": "a", "model": "nope", "input": [{"role": "user", "content": "x?"}],
        "labels": ["x"], "passing_labels": ["x"]}}}),
     {}, "method.reinforcement.grader.graders.a.model", "the judge model 'nope' is not served here"),
    (rft({"type": "label_model", "name": "a", "model": "tiny", "input": [], "labels": ["x"], "passing_labels": ["x"]}),
     {}, "method.reinforcement.grader.type", "label_model"),
    (rft(), {"grpo.judges": {"tiny": "/tmp"}}, "tunekit.grpo.judges.tiny", "is set by the job itself"),
    ({"type": "reinforcement", "reinforcement": {}}, {}, "method.reinforcement.grader", ""),
    ({"type": "reinforcement"}, {}, "method.reinforcement", "needs method.reinforcement with its grader"),
    (rft(compute_multiplier=0), {}, "method.reinforcement.hyperparameters.compute_multiplier",
     'give "auto" or a number > 1e-05 and <= 10; got 0'),
    (rft(compute_multiplier=11), {}, "method.reinforcement.hyperparameters.compute_multiplier", "got 11"),
    (rft(reasoning_effort="auto"), {}, "method.reinforcement.hyperparameters.reasoning_effort", 'no "auto"'),
    (rft(eval_interval=0), {}, "method.reinforcement.hyperparameters.eval_interval", "an integer from 1"),
    (rft(n_epochs=51), {}, "method.reinforcement.hyperparameters.n_epochs", "an integer from 1 to 50"),
    (rft(beta=0.1), {}, "method.reinforcement.hyperparameters.beta", ""),
    ({**rft(), "dpo": {}}, {}, "method.dpo", "give the hyperparameters as method.reinforcement.hyperparameters"),
    ({"type": "reinforcement", "reinforcement": {"grader": GRADER, "response_format": {"type": "json_schema"}}}, {},
     "method.reinforcement.response_format", "not supported by this server yet"),
    (rft(compute_multiplier=2), {"grpo.group_size": 4}, "tunekit.grpo.group_size", "set the same thing"),
    (rft(eval_interval=2), {"train.eval_every": 3}, "tunekit.train.eval_every", "set the same thing"),
    (rft(), {"grpo.grader": GRADER}, "tunekit.grpo.grader.type", "is set by the job itself"),
    (rft(), {"grpo.max_new_tokens": 64, "data.max_len": 64}, "tunekit.grpo.max_new_tokens", "leave no room"),
    (rft(), {"method": "full"}, "tunekit.grpo.beta", "use method: lora"),
    ({"type": "ppo"}, {}, "method.type", 'must be "supervised", "dpo" or "reinforcement"'),
]


@pytest.mark.parametrize("method, values, param, says", BAD, ids=[f"{i}-{p}" for i, (_, _, p, _) in enumerate(BAD)])
def test_bad_reinforcement_requests_are_400_naming_the_field(server, prompts, method, values, param, says):
    url, _, _ = server
    client = sdk(url)
    before = jobs_count(url)
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="tiny", training_file=prompts[0].id, method=method,
                                       extra_body={"tunekit": values})
    assert err.value.param == param and says in err.value.message, err.value.message
    assert err.value.body["type"] == "invalid_request_error"
    assert jobs_count(url) == before


def test_a_file_of_another_kind_is_refused_at_create(server, prompts):
    """Chat examples or preference pairs for a reinforcement job, prompts for a supervised or DPO job (or a
    supervised job's tunekit.grpo values): 400 naming the file's param and its first record's line, before any
    job exists. A prompt file with a line that
    is not a prompt is an upload in status error naming that line."""
    url, _, _ = server
    client = sdk(url)
    train, _ = prompts
    chats, pairs = upload(client, toy_jsonl(12, 6), "chat.jsonl"), upload(client, pairs_jsonl(12, 5), "pairs.jsonl")
    before = jobs_count(url)
    for kwargs, param, says in (
            (dict(training_file=chats.id, method=rft()), "training_file",
             "line 1 is a chat example (messages), but a reinforcement job trains on prompts"),
            (dict(training_file=pairs.id, method=rft()), "training_file", "line 1 is a preference example"),
            (dict(training_file=train.id, validation_file=chats.id, method=rft()), "validation_file",
             "line 1 is a chat example"),
            (dict(training_file=train.id), "training_file", "line 1 is a reinforcement prompt (messages ending with "
                                                            "the user turn to answer, no reply), but a supervised job"),
            (dict(training_file=train.id, method={"type": "dpo"}), "training_file",
             "line 1 is a reinforcement example"),
            (dict(training_file=chats.id, extra_body={"tunekit": {"grpo.group_size": 2}}), "tunekit.grpo",
             "apply to reinforcement jobs only")):
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model="tiny", **kwargs)
        assert err.value.param == param and says in err.value.message, err.value.message
    assert jobs_count(url) == before

    mixed = prompts_jsonl(11, 7) + json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}]}).encode() + b"\n"
    bad = upload(client, mixed, "mixed.jsonl")
    assert bad.status == "error"
    assert bad.status_details == ("1 problem(s): line 12: not a reinforcement prompt (the file's first line is one): "
                                  "the last message is 'assistant': a prompt ends with the turn the model answers "
                                  "(user or developer)")


def test_multi_grader_job_reports_each_sub_grader(server, prompts):
    """A multi grader: the events' scores.graders and the CSV carry each sub-grader's reward mean, which
    combine into the step's reward by calculate_output. The job echoes the grader as sent, `graders` a map as
    OpenAI's API takes it; the SDK types `graders` as one grader, so this test reads the job without strict
    validation (the other tests count jobs the same way)."""
    url, _, data_dir = server
    client = sdk(url, strict=False)
    train, valid = prompts
    grader = {"type": "multi", "name": "both", "calculate_output": "0.25 * word + 0.75 * short",
              "graders": {"word": GRADER, "short": {"type": "text_similarity", "name": "short",
                                                    "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
                                                    "evaluation_metric": "fuzzy_match"}}}
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train.id, validation_file=valid.id,
                                         method=rft(grader, batch_size=2),
                                         extra_body=tiny(group_size=2, **{"max_new_tokens": 3}))
    job = wait_for(client, job.id, DONE)
    assert job.status == "succeeded", job.error
    assert job.method.reinforcement.hyperparameters.compute_multiplier == 0.5  # from tunekit's group_size 2
    assert job.method.reinforcement.to_dict()["grader"] == grader
    rows = logged(data_dir, job.id)
    metrics = [e for e in reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100))) if e.type == "metrics"]
    for event, row in zip(metrics, rows, strict=True):
        assert row["reward_mean"] == pytest.approx(0.25 * row["reward/word"] + 0.75 * row["reward/short"])
        assert event.data["scores"]["graders"] == [
            {"name": "says the word", "type": "string_check", "train_reward_mean": row["reward/word"],
             "valid_reward_mean": row.get("valid_reward/word")},
            {"name": "short", "type": "text_similarity", "train_reward_mean": row["reward/short"],
             "valid_reward_mean": row.get("valid_reward/short")}]
        assert event.data["train_reward_mean/short"] == row["reward/short"]
    table = list(csv.DictReader(io.StringIO(client.files.content(job.result_files[0]).text)))
    assert list(table[0])[-4:] == ["train_reward_mean/word", "valid_reward_mean/word", "train_reward_mean/short",
                                   "valid_reward_mean/short"]
    assert [float(r["train_reward_mean/word"]) for r in table] == [r["reward/word"] for r in rows]
