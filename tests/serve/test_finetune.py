"""OpenAI's Files and fine-tuning API on `tunekit serve`, driven by the official openai SDK.

A live server (uvicorn on a free loopback port, a temporary --data-dir) serves the tiny Llama of conftest;
jobs train LoRA adapters on the toy "say WORD" task for a few steps in `tunekit train` subprocesses.
Clients validate every response strictly (`_strict_response_validation=True`) except where a job is
`paused`, a status OpenAI returns but the SDK's type lacks.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="uploads need python-multipart (the serve extra)")

from conftest import greedy  # noqa: E402
from live_server import free_port, serving  # noqa: E402
from toy_runs import WORDS  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "say apple"}]


def toy_jsonl(n: int, seed: int) -> bytes:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        word = rng.choice(WORDS)
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"say {word}"},
                                              {"role": "assistant", "content": f"{word} {word} {word}"}]}))
    return ("\n".join(lines) + "\n").encode()


def sdk(url: str, key: str = "anything", strict: bool = True) -> openai.OpenAI:
    # max_retries=0: the SDK retries 409 and 5xx, which would hide them
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120,
                         _strict_response_validation=strict)


def tiny_job(**train) -> dict:
    """`tunekit` config values (extra_body) for a job of a few seconds on the tiny model."""
    return {"tunekit": {"data.max_len": 64, "lora": {"r": 8, "alpha": 16},
                        "train": {"threads": 1, "micro_batch_size": 4, **train},
                        "eval": {"limit": 2, "max_new_tokens": 8, "baselines": ["base", "few-shot:2"]}}}


def wait_for(client, job_id: str, statuses: tuple[str, ...], timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"job still {job.status}: {job}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    data_dir = tmp_path_factory.mktemp("serve-data")
    with serving(models=[f"tiny={tiny_llama_dir}"], data_dir=data_dir) as (url, app):
        yield url, app, data_dir


def upload(client, content: bytes, name: str | None = "train.jsonl"):
    return client.files.create(file=(name, content) if name else io.BytesIO(content), purpose="fine-tune")


# --------------------------------------------------------------------------------------------------
# The cookbook flow


def test_cookbook_flow_end_to_end(server, tiny_llama_dir):
    url, app, data_dir = server
    client = sdk(url)
    train = upload(client, toy_jsonl(24, 0))
    valid = upload(client, toy_jsonl(10, 1), name=None)  # bare bytes arrive named "upload"
    assert (train.status, train.purpose, train.filename, valid.filename) == ("processed", "fine-tune",
                                                                            "train.jsonl", "upload")
    assert client.files.retrieve(train.id).bytes == len(toy_jsonl(24, 0))
    assert client.files.content(train.id).read() == toy_jsonl(24, 0)

    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=train.id, validation_file=valid.id, suffix="toy", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 100}}},
        metadata={"team": "a"}, extra_body=tiny_job(max_steps=12, save_every=4))
    assert job.status == "validating_files" and job.id.startswith("ftjob-") and job.error is None
    assert (job.hyperparameters.n_epochs, job.seed, job.metadata) == (3, 7, {"team": "a"})

    job = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny:local:toy:{job.id[6:14]}"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at and job.estimated_finish is None

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))  # pages of 2, newest first
    assert len({e.id for e in events}) == len(events)
    messages = [e.message for e in reversed(events)]
    assert messages[0] == f"Created fine-tuning job: {job.id}"
    assert messages[-2:] == [f"New fine-tuned model created: {job.fine_tuned_model}",
                             "The job has successfully completed"]
    metrics = [e.data for e in reversed(events) if e.type == "metrics"]
    assert [e.data["checkpoint_step"] for e in reversed(events) if e.message.startswith("Checkpoint created")] == [4, 8, 12]
    assert [m["step"] for m in metrics] == list(range(1, 13)) and all(m["total_steps"] == 12 for m in metrics)
    run_dir = data_dir / "jobs" / job.id / "run"
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_loss"] for m in metrics] == [r["train_loss"] for r in logged]
    assert [m["train_mean_token_accuracy"] for m in metrics] == [r["train_token_accuracy"] for r in logged]
    assert all(0 <= r["train_token_accuracy"] <= 1 for r in logged)
    assert metrics[-1]["valid_loss"] == logged[-1]["valid_loss"]

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [12, 8, 4]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-12"
    assert checkpoints[1].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-8"
    assert checkpoints[2].metrics.train_loss == logged[3]["train_loss"]

    served = {m.id for m in client.models.list()}
    assert {"tiny", job.fine_tuned_model, f"{job.fine_tuned_model}:ckpt-step-8"} <= served
    reply = client.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION, temperature=0,
                                           max_completion_tokens=12)
    tuned = greedy(run_dir, QUESTION, 12)[0]
    assert reply.choices[0].message.content == tuned
    assert tuned != greedy(tiny_llama_dir, QUESTION, 12)[0], "training did not change the answer"

    csv_file, report, html = (client.files.retrieve(f) for f in job.result_files)
    assert (csv_file.filename, csv_file.purpose, report.filename, html.filename) == (
        "step_metrics.csv", "fine-tune-results", "eval_report.md", "eval_report.html")
    assert client.files.content(html.id).text.startswith("<!doctype html>")
    rows = client.files.content(csv_file.id).text.splitlines()
    assert rows[0] == ("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy,full_valid_loss,"
                       "full_valid_mean_token_accuracy") and len(rows) == 13
    assert "few-shot" in client.files.content(report.id).text

    # continue fine-tuning from the tuned model (its adapter merged into the base, a new adapter on top)
    more = client.fine_tuning.jobs.create(model=job.fine_tuned_model, training_file=train.id, suffix="more",
                                          extra_body=tiny_job(max_steps=2))
    more = wait_for(client, more.id, ("succeeded", "failed", "cancelled"))
    assert more.status == "succeeded", more.error
    assert more.model == job.fine_tuned_model and more.fine_tuned_model.startswith("ft:tiny:local:more:")
    config = (data_dir / "jobs" / more.id / "config.yaml").read_text()
    assert f"base: {run_dir}" in config and "previous_adapter: merge" in config
    assert client.chat.completions.create(model=more.fine_tuned_model, messages=QUESTION,
                                          max_completion_tokens=4).choices[0].message.content is not None

    # ... or from one of its checkpoints: a run dir of the earlier config with that checkpoint's adapter
    ckpt_model = f"{job.fine_tuned_model}:ckpt-step-8"
    from_ckpt = client.fine_tuning.jobs.create(model=ckpt_model, training_file=train.id,
                                               extra_body=tiny_job(max_steps=1))
    from_ckpt = wait_for(client, from_ckpt.id, ("succeeded", "failed", "cancelled"))
    assert from_ckpt.status == "succeeded", from_ckpt.error
    snapshot = data_dir / "jobs" / from_ckpt.id / "base"
    assert (snapshot / "final" / "adapter_model.safetensors").read_bytes() == (
        run_dir / "checkpoints" / "step-000008" / "adapter_model.safetensors").read_bytes()
    ckpt_reply = client.chat.completions.create(model=ckpt_model, messages=QUESTION, temperature=0,
                                                max_completion_tokens=12)
    assert ckpt_reply.choices[0].message.content == greedy(snapshot, QUESTION, 12)[0]

    assert {j.id for j in client.fine_tuning.jobs.list(metadata={"team": "a"})} == {job.id}
    without = client.fine_tuning.jobs.list(extra_query={"metadata": "null"})  # jobs that have no metadata
    assert {j.id for j in without} == {more.id, from_ckpt.id}
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == [from_ckpt.id, more.id, job.id]  # paged


def test_auto_hyperparameters_are_resolved_and_echoed(server):
    url, _, _ = server
    client = sdk(url)
    train = upload(client, toy_jsonl(20, 3))
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train.id,
                                         hyperparameters={"n_epochs": "auto"}, extra_body=tiny_job(max_steps=1))
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == ("auto", "auto")
    job = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
    assert job.status == "succeeded", job.error
    # 20 examples: the cookbook rule gives min(25, ceil(100 / 20)) = 5 epochs; batch 16384 // 64 rows
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size,
            job.hyperparameters.learning_rate_multiplier) == (5, 256, 1.0)
    assert job.method.supervised.hyperparameters.n_epochs == 5


# --------------------------------------------------------------------------------------------------
# Bad input


def test_bad_data_fails_the_job_with_code_and_line(server):
    url, _, _ = server
    client = sdk(url)
    lines = toy_jsonl(12, 4).decode().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "hi"}'  # line 3: not JSON
    broken = upload(client, ("\n".join(lines) + "\n").encode())
    assert broken.status == "error" and "line 3" in broken.status_details
    job = client.fine_tuning.jobs.create(model="tiny", training_file=broken.id)
    job = wait_for(client, job.id, ("failed", "succeeded"))
    assert (job.status, job.error.code, job.error.param) == ("failed", "invalid_training_file", "training_file")
    assert "line 3" in job.error.message

    odd = upload(client, b'{"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "x"}]}\n')
    assert odd.status == "error" and odd.status_details  # never a 500, whatever the content

    few = upload(client, toy_jsonl(5, 5))
    job = wait_for(client, client.fine_tuning.jobs.create(model="tiny", training_file=few.id).id, ("failed",))
    assert job.error.code == "invalid_n_examples" and "has 5 example(s)" in job.error.message

    other = client.files.create(file=("notes.jsonl", toy_jsonl(12, 6)), purpose="assistants")
    job = wait_for(client, client.fine_tuning.jobs.create(model="tiny", training_file=other.id).id, ("failed",))
    assert (job.error.code, job.error.param) == ("invalid_file_purpose", "training_file")


def test_a_training_crash_fails_the_job_and_the_server_lives(server):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the crash is asking for CUDA on a machine without it")
    url, _, _ = server
    client = sdk(url)
    train = upload(client, toy_jsonl(12, 13))
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train.id,
                                         extra_body={"tunekit": {"train.device": "cuda", "train.max_steps": 1}})
    job = wait_for(client, job.id, ("failed", "succeeded"))
    # the training's own error (TUNEKIT_ERROR_FILE), its place as param, not the log's last lines
    assert (job.status, job.error.code, job.error.param) == ("failed", "training_failed", "train.device")
    assert job.error.message.startswith("training stopped: ") and "cuda" in job.error.message
    assert client.models.list().data  # still serving


def test_the_error_a_training_reports_is_read_and_a_crash_falls_back_to_the_log(tmp_path):
    """worker._reported_error: the JSON `tunekit.cli.fail` writes -> (message, param); no file or a torn one (a
    crash, a kill mid-write) -> None, and the job's error is then the log's last lines."""
    from tunekit.serve.worker import _reported_error

    path = tmp_path / "error.json"
    assert _reported_error(path) is None
    path.write_text('{"title": "cannot start training", "problems": [{"where": "train.device", "message": "no '
                    'cuda", "hint": "use cpu"}, {"where": "", "message": "second", "hint": null}]}')
    assert _reported_error(path) == ("cannot start training; train.device: no cuda; second", "train.device")
    path.write_text('{"title": null, "problems": [{"where"')
    assert _reported_error(path) is None


@pytest.mark.parametrize("kwargs, param", [
    (dict(model="nope"), "model"),
    (dict(training_file="file-missing"), "training_file"),
    (dict(validation_file="file-missing"), "validation_file"),
    (dict(method={"type": "ppo"}), "method.type"),
    (dict(hyperparameters={"n_epochs": 0}), "hyperparameters.n_epochs"),
    (dict(suffix="x" * 65), "suffix"),
    (dict(extra_body={"tunekit": {"lora.r": 0}}), "tunekit.lora.r"),
    (dict(extra_body={"tunekit": {"method": "dpo"}}), "tunekit.method"),
    (dict(extra_body={"tunekit": {"output": {"dir": "/tmp/x"}}}), "tunekit.output.dir"),
    (dict(extra_body={"tunekit": {"data": 5}}), "tunekit.data"),
    (dict(extra_body={"tunekit": {"train": {"max_steps": 0, "warmup_ratio": 2}}}), "tunekit.train.max_steps"),
])
def test_bad_create_requests_are_400_naming_the_param(server, kwargs, param):
    url, _, _ = server
    client = sdk(url)
    train = upload(client, toy_jsonl(12, 7))
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(**{"model": "tiny", "training_file": train.id, **kwargs})
    assert err.value.param == param, err.value.message


def test_every_tunekit_config_problem_is_reported(server):
    url, _, _ = server
    client = sdk(url)
    train = upload(client, toy_jsonl(12, 14))
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="tiny", training_file=train.id, extra_body={"tunekit": {
            "train": {"max_steps": 0, "warmup_ratio": 2}, "lora.rr": 4}})
    message = err.value.message
    assert "tunekit.train.max_steps" in message and "tunekit.train.warmup_ratio" in message
    assert "tunekit.lora.rr: unknown key 'rr'" in message and "did you mean 'r'?" in message


def test_unknown_ids_are_404_and_pagination_never_loops(server):
    url, _, _ = server
    client = sdk(url)
    for call in (lambda: client.files.retrieve("file-nope"), lambda: client.fine_tuning.jobs.retrieve("ftjob-nope"),
                 lambda: client.fine_tuning.jobs.list_events("ftjob-nope"), lambda: client.files.delete("file-nope")):
        with pytest.raises(openai.NotFoundError):
            call()
    ids = [upload(client, toy_jsonl(12, 10 + i)).id for i in range(3)]
    listed = [f.id for f in client.files.list(limit=1, order="asc", purpose="fine-tune")]
    assert listed[-3:] == ids and len(listed) == len(set(listed))
    page = client.files.list(after="file-unknown")
    assert page.data == [] and page.has_more is False
    assert client.files.delete(ids[0]).deleted is True
    assert ids[0] not in {f.id for f in client.files.list()}


def test_upload_size_limit(tmp_path, tiny_llama_dir):
    with serving(models=[f"tiny={tiny_llama_dir}"], data_dir=tmp_path, max_upload_bytes=2048) as (url, _):
        client = sdk(url)
        with pytest.raises(openai.APIStatusError) as err:
            upload(client, toy_jsonl(200, 0))
        assert err.value.status_code == 413
        assert upload(client, toy_jsonl(3, 0)).status == "processed"
        assert list(tmp_path.glob("blobs/.tmp-*")) == []
        import httpx

        def chunked():  # no Content-Length: the limit is enforced while the body streams in
            yield b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n'
            for _ in range(100):  # ~130 kB: past the limit plus the multipart allowance
                yield toy_jsonl(20, 0)
            yield b"\r\n--b--\r\n"

        reply = httpx.post(f"{url}/files", content=chunked(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
        with_bom = upload(client, b"\xef\xbb\xbf" + toy_jsonl(3, 0))  # UTF-8 with BOM, as Azure's docs ask
        assert with_bom.status == "processed" and client.files.content(with_bom.id).read() == toy_jsonl(3, 0)


# --------------------------------------------------------------------------------------------------
# Cancel, pause and resume


def _metrics(client, job_id: str) -> list[dict]:
    return [e.data for e in reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=100)))
            if e.type == "metrics"]


def test_cancel_stops_the_training_process(server):
    url, app, _ = server
    client = sdk(url)
    train = upload(client, toy_jsonl(24, 8))
    long = dict(model="tiny", training_file=train.id, hyperparameters={"n_epochs": 50, "batch_size": 1},
                extra_body=tiny_job())  # 1200 steps
    job = client.fine_tuning.jobs.create(**long)
    deadline = time.monotonic() + 120
    while (running := client.fine_tuning.jobs.retrieve(job.id)).estimated_finish is None:  # after a step
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert running.status == "running" and running.estimated_finish > running.created_at and _metrics(client, job.id)
    later = client.fine_tuning.jobs.create(**long)
    assert wait_for(client, later.id, ("queued", "running")).status == "queued"  # one worker: FIFO
    time.sleep(1.0)
    assert client.fine_tuning.jobs.retrieve(later.id).status == "queued"
    run = app.state.worker.runs[job.id]
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert run.proc.wait(timeout=30) is not None
    assert wait_for(client, later.id, ("running",), timeout=60).status == "running"  # next in line
    assert client.fine_tuning.jobs.cancel(later.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError) as err:  # 400, not 409: the SDK would retry a 409
        client.fine_tuning.jobs.cancel(job.id)
    assert "cancelled" in err.value.message
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.resume(job.id)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


def test_pause_and_resume_give_the_same_losses(server):
    url, app, _ = server
    client, loose = sdk(url), sdk(url, strict=False)  # "paused" is not in the SDK's status type
    train = upload(client, toy_jsonl(24, 9))
    body = dict(model="tiny", training_file=train.id, seed=3, hyperparameters={"batch_size": 4, "n_epochs": 3},
                extra_body=tiny_job(max_steps=10))
    reference = wait_for(client, client.fine_tuning.jobs.create(**body).id, ("succeeded", "failed"))
    assert reference.status == "succeeded", reference.error

    job = client.fine_tuning.jobs.create(**body)
    wait_for(client, job.id, ("running",))  # its process is loading: it stops after its first step or so
    deadline = time.monotonic() + 120
    paused = loose.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    while job.id in app.state.worker.runs:  # the process writes a checkpoint and ends
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert loose.fine_tuning.jobs.retrieve(job.id).status == "paused"
    stopped_at = len(_metrics(client, job.id))
    assert stopped_at < 10
    with pytest.raises(openai.BadRequestError):
        loose.fine_tuning.jobs.pause(job.id)
    assert loose.fine_tuning.jobs.resume(job.id).status == "queued"
    job = wait_for(client, job.id, ("succeeded", "failed"))
    assert job.status == "succeeded", job.error
    got, want = _metrics(client, job.id), _metrics(client, reference.id)
    assert [m["step"] for m in got] == list(range(1, 11))
    for a, b in zip(got, want, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5), (a, b)
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert f"Fine-tuning job paused at step {stopped_at}" in messages


# --------------------------------------------------------------------------------------------------
# Projects


def test_projects_cannot_see_each_others_objects(tmp_path, tiny_llama_dir):
    with serving(models=[f"tiny={tiny_llama_dir}"], data_dir=tmp_path, api_keys=["a:key-a", "b:key-b"]) as (url, _):
        a, b = sdk(url, "key-a"), sdk(url, "key-b")
        mine = upload(a, toy_jsonl(12, 0))
        job = a.fine_tuning.jobs.create(model="tiny", training_file=mine.id, extra_body=tiny_job(max_steps=1))
        with pytest.raises(openai.NotFoundError):
            b.files.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            b.fine_tuning.jobs.retrieve(job.id)
        with pytest.raises(openai.NotFoundError):
            b.files.content(mine.id)
        with pytest.raises(openai.NotFoundError):
            b.files.delete(mine.id)
        for refused in (lambda: b.fine_tuning.jobs.list_events(job.id), lambda: b.fine_tuning.jobs.cancel(job.id),
                        lambda: b.fine_tuning.jobs.checkpoints.list(job.id),
                        lambda: b.get(f"/files/{mine.id}/check", cast_to=object)):
            with pytest.raises(openai.NotFoundError):
                refused()
        assert b.files.list().data == [] and b.fine_tuning.jobs.list().data == []
        with pytest.raises(openai.BadRequestError) as err:
            b.fine_tuning.jobs.create(model="tiny", training_file=mine.id)
        assert err.value.param == "training_file"
        job = wait_for(a, job.id, ("succeeded", "failed"))
        assert job.status == "succeeded" and job.organization_id == "org-a"
        assert job.fine_tuned_model in {m.id for m in a.models.list()}
        assert job.fine_tuned_model not in {m.id for m in b.models.list()}
        with pytest.raises(openai.NotFoundError):
            b.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION)
        with pytest.raises(openai.BadRequestError) as err:
            b.fine_tuning.jobs.create(model=job.fine_tuned_model, training_file=upload(b, toy_jsonl(12, 1)).id)
        assert err.value.param == "model"
        with pytest.raises(openai.AuthenticationError):
            sdk(url, "wrong").files.list()

        # deleting a fine-tuned model: only its project can, and then nobody is served it
        with pytest.raises(openai.NotFoundError):
            b.models.delete(job.fine_tuned_model)
        with pytest.raises(openai.BadRequestError) as err:
            a.models.delete("tiny")
        assert err.value.param == "model"
        deleted = a.models.delete(job.fine_tuned_model)
        assert (deleted.id, deleted.deleted) == (job.fine_tuned_model, True)
        assert job.fine_tuned_model not in {m.id for m in a.models.list()}
        with pytest.raises(openai.NotFoundError):
            a.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION)
        assert a.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == job.fine_tuned_model  # the job stays


# --------------------------------------------------------------------------------------------------
# Restart


def _serve_process(port: int, data_dir: Path, model: Path, keys: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.Popen([sys.executable, "-m", "tunekit.cli", "serve", f"tiny={model}", "--port", str(port),
                             "--data-dir", str(data_dir), "--device", "cpu", "--threads", "1",
                             "--api-keys-file", str(keys)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _ready(url: str, proc: subprocess.Popen) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url.removesuffix("/v1") + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)


def _processes_with(arg: str) -> list[int]:
    """Pids of live processes with `arg` on their command line (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and arg.encode() in (entry / "cmdline").read_bytes().split(b"\0"):
                if (entry / "stat").read_text().split(") ", 1)[1][0] != "Z":  # not a zombie
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(sys.platform != "linux", reason="the training process dies with the server on Linux only")
def test_restart_mid_job_loses_nothing(tmp_path, tiny_llama_dir):
    """SIGKILL the server while a job trains: after a restart every file and job is there, the job continues
    from its last checkpoint, events are not repeated, and the losses equal an uninterrupted run's."""
    from tunekit.config import load_config
    from tunekit.train.loop import train

    data_dir, port, keys = tmp_path / "data", free_port(), tmp_path / "keys.txt"
    keys.write_text("# project:key\nteam:key-1\n")
    url = f"http://127.0.0.1:{port}/v1"
    proc = _serve_process(port, data_dir, tiny_llama_dir, keys)
    try:
        _ready(url, proc)
        client = sdk(url, "key-1")
        file = upload(client, toy_jsonl(24, 11))
        job = client.fine_tuning.jobs.create(model="tiny", training_file=file.id, seed=5,
                                             hyperparameters={"batch_size": 4, "n_epochs": 10},
                                             extra_body=tiny_job(max_steps=30, save_every=3))
        ckpt = data_dir / "jobs" / job.id / "run" / "checkpoints" / "step-000006"
        deadline = time.monotonic() + 180
        while not ckpt.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        config = str(data_dir / "jobs" / job.id / "config.yaml")
        assert _processes_with(config), "no training process found"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        while _processes_with(config):  # the training process dies with the server (PR_SET_PDEATHSIG)
            assert time.monotonic() < deadline, "the training process outlived the server"
            time.sleep(0.05)
        assert not (data_dir / "jobs" / job.id / "run" / "final").exists(), "the job ended before the kill"

        proc = _serve_process(port, data_dir, tiny_llama_dir, keys)
        _ready(url, proc)
        assert client.files.retrieve(file.id).status == "processed"
        job = wait_for(client, job.id, ("succeeded", "failed"))
        assert job.status == "succeeded", job.error
        assert job.organization_id == "org-team" and job.fine_tuned_model.startswith("ft:tiny:team::")
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=7))
        assert len({e.id for e in events}) == len(events)
        messages = [e.message for e in events]
        assert "The server restarted: the job continues from its last checkpoint" in messages
        assert messages.count("The job has successfully completed") == 1
        metrics = [e.data for e in reversed(events) if e.type == "metrics"]
        assert [m["step"] for m in metrics] == list(range(1, 31))
    finally:
        proc.kill()
        proc.wait()
    cfg = load_config(data_dir / "jobs" / job.id / "config.yaml", [f"output.dir={tmp_path / 'reference'}"])
    reference = [json.loads(x) for x in (train(cfg).run_dir / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(metrics, reference, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5), (a, b)


# --------------------------------------------------------------------------------------------------
# Integrations


def test_wandb_integration_logs_the_run(server, monkeypatch):
    """The job's training process logs to W&B (offline here: WANDB_MODE) with the project, name and tags given."""
    pytest.importorskip("wandb")
    from test_trackers import _wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")  # the training process inherits the server's environment
    monkeypatch.setenv("WANDB_SILENT", "true")
    url, _, data_dir = server
    client = sdk(url)
    train = upload(client, toy_jsonl(12, 12))
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=train.id, extra_body=tiny_job(max_steps=3),
        integrations=[{"type": "wandb", "wandb": {"project": "toy", "name": "first", "tags": ["sdk"]}}])
    assert job.integrations[0].wandb.project == "toy"
    job = wait_for(client, job.id, ("succeeded", "failed"))
    assert job.status == "succeeded", job.error
    run_dir = data_dir / "jobs" / job.id / "run"
    records = _wandb_records(run_dir)
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {s: h["train_loss"] for s, h in history.items()} == pytest.approx({r["step"]: r["train_loss"]
                                                                              for r in logged})
    config = next(r for r in records if r["type"] == "run")["run"]["config"]["update"]
    assert config["output"]["wandb"] == {"project": "toy", "entity": None, "name": "first",
                                         "tags": ["sdk", f"tunekit/{job.id}"], "mode": None}


def test_wandb_integration_that_cannot_work_is_a_warning_event_not_a_failed_job(server, monkeypatch, tmp_path):
    """W&B online with no API key and no server that answers: the job runs without it and says so in a
    warning event; a tracker switched off mid-run (a line in the run's tracker warnings) is an event too."""
    import socket

    from tunekit.serve.worker import _Run
    from tunekit.train import trackers

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed}")
    url, app, data_dir = server
    client = sdk(url)
    train = upload(client, toy_jsonl(12, 13))
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train.id, extra_body=tiny_job(max_steps=2),
                                         integrations=[{"type": "wandb", "wandb": {"project": "toy"}}])
    job = wait_for(client, job.id, ("succeeded", "failed"))
    assert job.status == "succeeded", job.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    (warned,) = [e for e in events if e.level == "warn"]
    assert "wandb integration cannot work" in warned.message and "no API key" in warned.message
    assert "wandb: null" in (data_dir / "jobs" / job.id / "config.yaml").read_text()

    # Mid-run: a tracker whose calls fail writes one warning line; the worker turns it into one event.
    run_dir = data_dir / "jobs" / job.id / "run"

    class Gone:
        def log_metrics(self, *args, **kwargs):
            raise ConnectionError("tracking server went away")

    tracking = trackers.Trackers(mlflow=Gone(), run_dir=run_dir, warn=lambda message: None)
    tracking.log({"step": 1, "train_loss": 1.0})
    tracking.log({"step": 2, "train_loss": 0.5})  # switched off: no second warning
    worker = app.state.worker
    for _ in range(2):  # read twice: still one event
        worker._read_tracker_warnings(_Run(job.id, None, run_dir, 0.0), app.state.store.job(None, job.id))
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    midrun = [e for e in events if e.level == "warn" and "went away" in e.message]
    assert len(midrun) == 1 and midrun[0].message.startswith("Integration mlflow: mlflow stopped working at step 1")


# --------------------------------------------------------------------------------------------------
# The example script


def test_openai_sdk_example_runs(server, tmp_path, capsys):
    import importlib.util

    url, app, data_dir = server
    spec = importlib.util.spec_from_file_location("finetune_example", REPO / "examples" / "openai-sdk" / "finetune.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    (tmp_path / "train.jsonl").write_bytes(toy_jsonl(16, 20))
    (tmp_path / "valid.jsonl").write_bytes(toy_jsonl(10, 21))
    name, answer = example.main(["--base-url", url, "--model", "tiny", "--train", str(tmp_path / "train.jsonl"),
                                 "--valid", str(tmp_path / "valid.jsonl"), "--epochs", "1",
                                 "--tunekit", json.dumps(tiny_job(max_steps=2)["tunekit"])])
    out = capsys.readouterr().out
    assert "Fine-tuning job started" in out and f"{name} says: {answer}" in out
    job = app.state.store.job_by_model(name)
    first = json.loads((tmp_path / "valid.jsonl").read_text().splitlines()[0])["messages"][:1]
    assert answer == greedy(data_dir / "jobs" / job["id"] / "run", first, 64)[0]


def test_readme_snippet_runs(server, tmp_path):
    """The README's fine-tuning snippet, pointed at the test server, the tiny model and a toy file."""
    import re

    url, _, _ = server
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Fine-tuning API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "train.jsonl").write_bytes(toy_jsonl(12, 30))
    for old, new in (("http://127.0.0.1:8000/v1", url), ('model="base"', 'model="tiny"'),
                     ("examples/quickstart/train.jsonl", str(tmp_path / "train.jsonl")), ("time.sleep(5)", "time.sleep(0.2)")):
        assert old in code
        code = code.replace(old, new)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["job"].status == "succeeded" and scope["job"].hyperparameters.n_epochs == 2
    assert scope["reply"].choices[0].message.role == "assistant"


def test_a_job_trains_on_several_processes_and_cancel_stops_them_all(tmp_path, tiny_llama_dir):
    """`train_processes: 2`: a job runs `tunekit train --nproc 2`; cancelling it ends every process."""
    data_dir = tmp_path / "data"
    with serving(models=[f"tiny={tiny_llama_dir}"], data_dir=data_dir, train_processes=2) as (url, app):
        client = sdk(url)
        train = upload(client, toy_jsonl(24, 3))
        job = client.fine_tuning.jobs.create(model="tiny", training_file=train.id,
                                             hyperparameters={"n_epochs": 3, "batch_size": 4},
                                             extra_body=tiny_job(max_steps=4))
        job = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
        assert job.status == "succeeded", job.error
        run_dir = data_dir / "jobs" / job.id / "run"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (summary["processes"], summary["strategy"], summary["steps"]) == (2, "ddp", 4)
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        assert sorted(e.data["step"] for e in events if e.type == "metrics") == [1, 2, 3, 4]

        long = client.fine_tuning.jobs.create(model="tiny", training_file=train.id,
                                              hyperparameters={"n_epochs": 50, "batch_size": 1}, extra_body=tiny_job())
        deadline = time.monotonic() + 120
        while client.fine_tuning.jobs.retrieve(long.id).estimated_finish is None:  # after a step
            assert time.monotonic() < deadline
            time.sleep(0.2)
        launcher = app.state.worker.runs[long.id].proc
        workers = [int(c) for t in Path(f"/proc/{launcher.pid}/task").iterdir()
                   for c in (t / "children").read_text().split()]
        assert len(workers) == 2
        # torchrun starts each worker in a session of its own, outside the job's process group.
        assert os.getpgid(launcher.pid) == launcher.pid not in [os.getpgid(pid) for pid in workers]
        client.fine_tuning.jobs.cancel(long.id)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid) for pid in workers):
            assert time.monotonic() < deadline, "a training process outlived its cancelled job"
            time.sleep(0.1)


def test_kill_reaches_processes_outside_the_jobs_group():
    """A job's process whose child started a session of its own (as torchrun's workers do) and does not die
    with its parent: the kill that cancel uses ends both."""
    from tunekit.serve.worker import _kill

    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
            "print(p.pid, flush=True); time.sleep(60)")
    job = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(job.stdout.readline())
    assert os.getpgid(child) != os.getpgid(job.pid)
    _kill(job)
    job.wait(timeout=10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and _proc_state(child) != "Z":
        assert time.monotonic() < deadline, "the child in its own session outlived the kill"
        time.sleep(0.05)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_a_preference_file_sent_to_a_supervised_job_is_refused_at_create(server):
    """A DPO file (OpenAI's preferred_output / non_preferred_output lines) is a valid upload, but a supervised
    job cannot train on it: 400 at create time naming the param and the line, and no job is made."""
    url, _, _ = server
    client = sdk(url)
    pair = {"input": {"messages": [{"role": "user", "content": "say maple"}]},
            "preferred_output": [{"role": "assistant", "content": "maple maple maple"}],
            "non_preferred_output": [{"role": "assistant", "content": "maple"}]}
    pairs = upload(client, b"\n".join(json.dumps(pair).encode() for _ in range(12)) + b"\n", "pairs.jsonl")
    chats = upload(client, toy_jsonl(12, 21))
    before = len(client.fine_tuning.jobs.list().data)
    for kwargs, param in ((dict(training_file=pairs.id), "training_file"),
                          (dict(training_file=chats.id, validation_file=pairs.id), "validation_file")):
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model="tiny", **kwargs)
        assert err.value.param == param and "line 1 is a preference pair" in err.value.message
    assert len(client.fine_tuning.jobs.list().data) == before
