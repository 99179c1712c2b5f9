"""DPO jobs in the fine-tuning API (`method.type: "dpo"`), driven by the official openai SDK.

A live server (tests/serve/test_finetune.py's setup: uvicorn on a free loopback port, a temporary --data-dir)
serves the tiny Llama of conftest; jobs train LoRA adapters with `objective: dpo` on toy preference pairs ("say
WORD": the reply that repeats WORD is preferred to one that repeats another word) for a few steps.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random

import pytest

openai = pytest.importorskip("openai", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="uploads need python-multipart (the serve extra)")

from conftest import greedy  # noqa: E402
from live_server import serving  # noqa: E402
from test_finetune import QUESTION, sdk, toy_jsonl, upload, wait_for  # noqa: E402
from toy_runs import WORDS  # noqa: E402

DONE = ("succeeded", "failed", "cancelled")
# The request, verbatim
AUTO_DPO = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": "auto", "batch_size": "auto",
                                                       "learning_rate_multiplier": "auto"}}}


def pairs_jsonl(n: int, seed: int) -> bytes:
    """OpenAI's DPO lines: the reply repeating the user's word is preferred to one repeating another word."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        word, other = rng.sample(WORDS, 2)
        lines.append(json.dumps({"input": {"messages": [{"role": "user", "content": f"say {word}"}]},
                                 "preferred_output": [{"role": "assistant", "content": f"{word} {word} {word}"}],
                                 "non_preferred_output": [{"role": "assistant", "content": f"{other} {other} {other}"}]}))
    return ("\n".join(lines) + "\n").encode()


def tiny(**train) -> dict:
    """`tunekit` config values (extra_body) for a DPO job of a few seconds on the tiny model."""
    return {"tunekit": {"data.max_len": 64, "lora": {"r": 8, "alpha": 16},
                        "train": {"threads": 1, "micro_batch_size": 4, **train}}}


def logged(data_dir, job_id: str) -> list[dict]:
    path = data_dir / "jobs" / job_id / "run" / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    data_dir = tmp_path_factory.mktemp("serve-data")
    with serving(models=[f"tiny={tiny_llama_dir}"], data_dir=data_dir) as (url, app):
        yield url, app, data_dir


# --------------------------------------------------------------------------------------------------
# A DPO job


def test_dpo_job_end_to_end(server):
    """The issue's request trains to succeeded; the job echoes method dpo with every hyperparameter resolved
    (strict SDK); events, checkpoints and the result CSV carry the reward metrics; the model and a checkpoint
    answer chat as transformers' greedy decoding of their weights does."""
    url, _, data_dir = server
    client = sdk(url)
    train, valid = upload(client, pairs_jsonl(16, 0), "pairs.jsonl"), upload(client, pairs_jsonl(10, 1), "valid.jsonl")
    assert (train.status, valid.status) == ("processed", "processed")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train.id, validation_file=valid.id,
                                         suffix="dpo", method=AUTO_DPO, extra_body=tiny(max_steps=3, save_every=2))
    assert job.method.type == "dpo" and job.method.supervised is None
    assert job.method.dpo.hyperparameters.to_dict() == AUTO_DPO["dpo"]["hyperparameters"]  # "auto" until resolved

    job = wait_for(client, job.id, DONE)
    assert job.status == "succeeded", job.error
    # 16 pairs: the cookbook rule gives ceil(100 / 16) = 7 epochs; batch: 16384 tokens // (2 x 64) per row of pairs
    resolved = {"beta": 0.1, "batch_size": 128, "learning_rate_multiplier": 1.0, "n_epochs": 7}
    assert job.method.to_dict() == {"type": "dpo", "dpo": {"hyperparameters": resolved}}
    assert job.hyperparameters.to_dict() == {k: v for k, v in resolved.items() if k != "beta"}
    print("echoed method:", json.dumps(job.method.to_dict()))
    config = (data_dir / "jobs" / job.id / "config.yaml").read_text()
    assert "objective: dpo" in config and "beta: 0.1" in config and "lr: 5.0e-06" in config
    summary = json.loads((data_dir / "jobs" / job.id / "run" / "summary.json").read_text())
    assert (summary["objective"], summary["reference"], summary["steps"]) == ("dpo", "adapter-off", 3)

    rows = logged(data_dir, job.id)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    events = list(reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100))))
    metrics = [e for e in events if e.type == "metrics"]
    assert [m.data["step"] for m in metrics] == [1, 2, 3] and all(m.data["total_steps"] == 3 for m in metrics)
    for event, row in zip(metrics, rows, strict=True):
        assert {k: event.data[k] for k in ("train_loss", "train_reward_accuracy", "train_reward_margin",
                                           "train_chosen_reward", "train_rejected_reward")} == {
            "train_loss": row["train_loss"], "train_reward_accuracy": row["reward_accuracy"],
            "train_reward_margin": row["reward_margin"], "train_chosen_reward": row["reward_chosen"],
            "train_rejected_reward": row["reward_rejected"]}
        assert "reward accuracy=" in event.message
    last = metrics[-1].data  # the validation pairs are scored at the last step
    assert (last["valid_loss"], last["valid_reward_accuracy"], last["valid_reward_margin"]) == (
        rows[-1]["valid_loss"], rows[-1]["valid_reward_accuracy"], rows[-1]["valid_reward_margin"])
    assert metrics[0].data["valid_reward_accuracy"] is None

    # The CSV, and the evaluation after training: the validation pairs scored by the tuned model and its base.
    csv_id, *reports = job.result_files
    assert client.files.retrieve(csv_id).filename == "step_metrics.csv"
    assert sorted(client.files.retrieve(r).filename for r in reports) == ["eval_report.html", "eval_report.md"]
    results = json.loads((data_dir / "jobs" / job.id / "run" / "eval" / "results.json").read_text())
    assert results["settings"]["kind"] == "preference" and results["n_examples"] == 10
    assert [c["name"] for c in results["candidates"]] == ["fine-tuned", "base"]
    assert "preference accuracy" in client.files.content(reports[0]).text + client.files.content(reports[1]).text
    table = list(csv.DictReader(io.StringIO(client.files.content(csv_id).text)))
    assert list(table[0]) == ["step", "train_loss", "train_reward_accuracy", "train_reward_margin",
                              "train_chosen_reward", "train_rejected_reward", "valid_loss", "valid_reward_accuracy",
                              "valid_reward_margin", "valid_chosen_reward", "valid_rejected_reward"]
    assert [float(r["train_reward_margin"]) for r in table] == [r["reward_margin"] for r in rows]
    assert table[0]["valid_loss"] == "" and float(table[-1]["valid_reward_accuracy"]) == rows[-1]["valid_reward_accuracy"]

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    step2 = next(c for c in checkpoints if c.step_number == 2)
    assert step2.metrics.train_loss == rows[1]["train_loss"]
    assert step2.metrics.to_dict()["train_reward_accuracy"] == rows[1]["reward_accuracy"]
    served = {m.id for m in client.models.list()}
    assert {job.fine_tuned_model, step2.fine_tuned_model_checkpoint} <= served
    run_dir = data_dir / "jobs" / job.id / "run"
    for model, weights in ((job.fine_tuned_model, run_dir), (step2.fine_tuned_model_checkpoint,
                                                            run_dir / "checkpoints" / "step-000002")):
        reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                               max_completion_tokens=8)
        assert reply.choices[0].message.content == greedy(weights, QUESTION, 8)[0]


def test_dpo_job_on_an_sft_model(server):
    """SFT, then DPO on its ft: model: the SFT adapter merged into the base, a new adapter trained with DPO
    against it (the reference: that adapter switched off); explicit hyperparameters, given in both places."""
    url, _, data_dir = server
    client = sdk(url)
    sft = client.fine_tuning.jobs.create(model="tiny", training_file=upload(client, toy_jsonl(12, 2)).id,
                                         extra_body={"tunekit": {**tiny(max_steps=2)["tunekit"]}})
    sft = wait_for(client, sft.id, DONE)
    assert sft.status == "succeeded", sft.error
    hp = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 100}
    job = client.fine_tuning.jobs.create(
        model=sft.fine_tuned_model, training_file=upload(client, pairs_jsonl(12, 3)).id, hyperparameters=hp,
        method={"type": "dpo", "dpo": {"hyperparameters": {**hp, "beta": 0.5}}},
        extra_body=tiny(max_steps=4, scheduler="constant"))
    job = wait_for(client, job.id, DONE)
    assert job.status == "succeeded", job.error
    assert job.method.dpo.hyperparameters.to_dict() == {**hp, "learning_rate_multiplier": 100.0, "beta": 0.5}
    config = (data_dir / "jobs" / job.id / "config.yaml").read_text()
    assert f"base: {data_dir / 'jobs' / sft.id / 'run'}" in config and "previous_adapter: merge" in config
    summary = json.loads((data_dir / "jobs" / job.id / "run" / "summary.json").read_text())
    assert summary["reference"] == "adapter-off"
    rows = logged(data_dir, job.id)
    assert rows[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at step 1
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["reward_margin"] > 0  # it learned
    assert job.fine_tuned_model in {m.id for m in client.models.list()}
    assert client.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION,
                                          max_completion_tokens=4).choices[0].message.content is not None


# --------------------------------------------------------------------------------------------------
# Bad input: 400 at create, naming the field, and no job made


BAD_METHODS = [
    (dict(method={"type": "rlhf"}), "method.type", 'must be "supervised", "dpo" or "reinforcement"'),
    (dict(method={"type": "RFT"}), "method.type", "got 'RFT'"),
    (dict(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}), "method.dpo.hyperparameters.beta",
     'give "auto" or a number > 0 and <= 2; got 0'),
    (dict(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 2.5}}}), "method.dpo.hyperparameters.beta",
     "got 2.5"),
    (dict(method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 0}}}),
     "method.dpo.hyperparameters.n_epochs", 'give "auto" or an integer from 1 to 50'),
    (dict(method={"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 2}}}), "method.supervised",
     "give the hyperparameters as method.dpo.hyperparameters"),
    (dict(method={"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.1}}}), "method.dpo",
     'or set method.type "dpo"'),
    (dict(method={"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}),
     "method.supervised.hyperparameters.beta", "beta is a DPO hyperparameter"),
    (dict(method={"type": "dpo"}, hyperparameters={"beta": 0.1}), "hyperparameters.beta",
     "give it as method.dpo.hyperparameters.beta"),
    (dict(method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2}}}, hyperparameters={"n_epochs": 3}),
     "hyperparameters.n_epochs", "disagrees with method.dpo.hyperparameters.n_epochs"),
    (dict(method={"type": "dpo"}, extra_body={"tunekit": {"objective": "sft"}}), "tunekit.objective",
     "is set by the job itself"),
    (dict(method={"type": "dpo"}, extra_body={"tunekit": {"dpo.beta": 0.3}}), "tunekit.dpo.beta",
     "is set by the job itself"),
    (dict(method={"type": "dpo"}, extra_body={"tunekit": {"eval.scorer": "scorer:score"}}), "tunekit.eval.scorer",
     "a scorer reads generated replies"),
    (dict(method={"type": "dpo"}, extra_body={"tunekit": {"dpo": {"loss": "ipo", "label_smoothing": 0.1}}}),
     "tunekit.dpo.label_smoothing", "label smoothing is defined for loss sigmoid and simpo"),
    (dict(method={"type": "dpo"}, extra_body={"tunekit": {"dpo.loss": "kto"}}), "tunekit.dpo.loss", "sigmoid"),
]


@pytest.mark.parametrize("kwargs, param, says", BAD_METHODS, ids=[p for _, p, _ in BAD_METHODS])
def test_bad_method_objects_are_400_naming_the_field(server, kwargs, param, says):
    url, _, _ = server
    client = sdk(url)
    pairs = upload(client, pairs_jsonl(12, 4))
    before = len(client.fine_tuning.jobs.list(limit=1000).data)
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(**{"model": "tiny", "training_file": pairs.id, **kwargs})
    assert err.value.param == param and says in err.value.message, err.value.message
    assert err.value.body["type"] == "invalid_request_error"
    assert len(client.fine_tuning.jobs.list(limit=1000).data) == before


def test_a_file_of_the_other_method_is_refused_at_create(server):
    """Chat data to a DPO job, preference pairs to a supervised one (or a supervised job's tunekit.dpo values):
    400 naming the file's param and its first record's line, before any job exists."""
    url, _, _ = server
    client = sdk(url)
    pairs, chats = upload(client, pairs_jsonl(12, 5), "pairs.jsonl"), upload(client, toy_jsonl(12, 6))
    before = len(client.fine_tuning.jobs.list(limit=1000).data)
    dpo = {"type": "dpo"}
    for kwargs, param, says in (
            (dict(training_file=chats.id, method=dpo), "training_file", "line 1 is a chat example (messages), but "
                                                                        "a DPO job trains on preference pairs"),
            (dict(training_file=pairs.id, validation_file=chats.id, method=dpo), "validation_file",
             "line 1 is a chat example"),
            (dict(training_file=pairs.id), "training_file", "line 1 is a preference pair"),
            (dict(training_file=pairs.id, method={"type": "supervised"}), "training_file", 'set method {"type": "dpo"}'),
            (dict(training_file=chats.id, extra_body={"tunekit": {"dpo.loss": "ipo"}}), "tunekit.dpo",
             "apply to DPO jobs only")):
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model="tiny", **kwargs)
        assert err.value.param == param and says in err.value.message, err.value.message
    assert len(client.fine_tuning.jobs.list(limit=1000).data) == before
