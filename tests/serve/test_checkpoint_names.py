"""A job's checkpoints have one name each: the one its "Checkpoint created" event gives, the one its checkpoint
object gives, and the one /v1/models serves, the last checkpoint's included (it serves the fine-tuned model's
weights). Driven by the openai SDK against a live server, as a user would."""

from __future__ import annotations

import re

import pytest

openai = pytest.importorskip("openai", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="uploads need python-multipart (the serve extra)")

from live_server import serving  # noqa: E402
from test_finetune import QUESTION, sdk, tiny_job, toy_jsonl, upload, wait_for  # noqa: E402

SNAPSHOT = re.compile(r"^Checkpoint created at step (\d+) with Snapshot ID: (\S+)$")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    with serving(models=[f"tiny={tiny_llama_dir}"], data_dir=tmp_path_factory.mktemp("serve-data")) as (url, _):
        yield url


def _names(client, job) -> tuple[dict[int, str], dict[int, str]]:
    """(step -> name in its event, step -> name in its checkpoint object)."""
    found = [SNAPSHOT.match(e.message) for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    events = {int(m.group(1)): m.group(2) for m in found if m}
    listed = {c.step_number: c.fine_tuned_model_checkpoint
              for c in client.fine_tuning.jobs.checkpoints.list(job.id).data}
    return events, listed


def _chat(client, model: str) -> str:
    reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_completion_tokens=6)
    return reply.choices[0].message.content


@pytest.mark.parametrize("method", ["lora", "full"])
def test_event_checkpoint_object_and_served_model_agree(server, method):
    client = sdk(server)
    train = upload(client, toy_jsonl(16, 3))
    extra = tiny_job(max_steps=6, save_every=3)
    extra["tunekit"]["method"] = method
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train.id, suffix=method, extra_body=extra)
    job = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
    assert job.status == "succeeded", job.error

    events, listed = _names(client, job)
    assert sorted(events) == [3, 6] and sorted(listed) == [3, 6]
    assert events == listed == {3: f"{job.fine_tuned_model}:ckpt-step-3", 6: f"{job.fine_tuned_model}:ckpt-step-6"}
    served = {m.id for m in client.models.list()}
    # the last checkpoint is the fine-tuned model: same weights, same greedy answer
    assert events[6] in served and _chat(client, events[6]) == _chat(client, job.fine_tuned_model)
    if method == "lora":  # earlier LoRA checkpoints are adapters on the shared base, each served
        assert events[3] in served and _chat(client, events[3]) is not None
    else:  # earlier full-weights checkpoints are not served (a whole model each): a 404 naming the model
        assert events[3] not in served
        with pytest.raises(openai.NotFoundError, match=re.escape(f"{events[3]}' does not exist")):
            _chat(client, events[3])
