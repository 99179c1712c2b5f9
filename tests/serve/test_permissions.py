"""Checkpoint permissions (`client.fine_tuning.checkpoints.permissions`): project a shares its fine-tuned model
with project b, which may then chat with it and train from it, until a deletes the permission. Driven by the
openai SDK (strict response validation) against a live server with a key per project."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="uploads need python-multipart (the serve extra)")

from live_server import serving  # noqa: E402
from test_finetune import QUESTION, sdk, tiny_job, toy_jsonl, upload, wait_for  # noqa: E402

DONE = ("succeeded", "failed", "cancelled")
# `permissions.retrieve` is the SDK's deprecated name for the same GET as `list`: both are what scripts call
pytestmark = pytest.mark.filterwarnings("ignore:Retrieve is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    keys = ["a:key-a", "b:key-b", "c:key-c"]
    with serving(models=[f"tiny={tiny_llama_dir}"], data_dir=tmp_path_factory.mktemp("serve-data"),
                 api_keys=keys) as (url, _):
        yield url


def chat(client, model: str):
    return client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_completion_tokens=4)


def test_a_permission_lets_another_project_chat_and_train_until_it_is_deleted(server):
    a, b, c = sdk(server, "key-a"), sdk(server, "key-b"), sdk(server, "key-c")
    job = a.fine_tuning.jobs.create(model="tiny", training_file=upload(a, toy_jsonl(12, 0)).id, suffix="shared",
                                    extra_body=tiny_job(max_steps=2, save_every=1))
    job = wait_for(a, job.id, DONE)
    assert job.status == "succeeded", job.error
    model, ckpt = job.fine_tuned_model, f"{job.fine_tuned_model}:ckpt-step-1"
    b_file = upload(b, toy_jsonl(12, 1)).id
    permissions = a.fine_tuning.checkpoints.permissions

    # before: b has no such model, and cannot share it
    with pytest.raises(openai.NotFoundError) as err:
        chat(b, model)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        b.fine_tuning.jobs.create(model=model, training_file=b_file)
    assert err.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        b.fine_tuning.checkpoints.permissions.create(model, project_ids=["b"])
    with pytest.raises(openai.NotFoundError):  # not a model here at all
        permissions.create(f"{model}:ckpt-step-99", project_ids=["b"])
    with pytest.raises(openai.NotFoundError):
        permissions.retrieve("ft:tiny:a:nope:12345678")

    created = permissions.create(model, project_ids=["b", "c"])
    assert [p.project_id for p in created.data] == ["b", "c"]
    assert all(p.object == "checkpoint.permission" and p.id.startswith("cp_") for p in created.data)
    perm_b, perm_c = created.data

    # b may use it: chat (the same answer a gets), /v1/models, a job trained from it
    assert chat(b, model).choices[0].message.content == chat(a, model).choices[0].message.content
    assert model in {m.id for m in b.models.list()} and ckpt not in {m.id for m in b.models.list()}
    with pytest.raises(openai.NotFoundError):  # the name given, exactly: not the model's checkpoints
        chat(b, ckpt)
    trained = b.fine_tuning.jobs.create(model=model, training_file=b_file, extra_body=tiny_job(max_steps=1))
    assert trained.model == model and trained.organization_id == "org-b"
    # ... but not share it further, see its permissions or delete it: 403
    with pytest.raises(openai.PermissionDeniedError):
        b.fine_tuning.checkpoints.permissions.create(model, project_ids=["d"])
    with pytest.raises(openai.PermissionDeniedError):
        b.fine_tuning.checkpoints.permissions.retrieve(model)
    with pytest.raises(openai.PermissionDeniedError):
        b.fine_tuning.checkpoints.permissions.delete(perm_b.id, fine_tuned_model_checkpoint=model)
    with pytest.raises(openai.PermissionDeniedError):
        b.models.delete(model)

    # listing: newest first by default, ascending on request, by project, pages that follow last_id
    assert [p.project_id for p in permissions.retrieve(model).data] == ["c", "b"]
    assert [p.project_id for p in permissions.list(model, order="ascending")] == ["b", "c"]
    assert [p.id for p in permissions.list(model, project_id="c")] == [perm_c.id]
    first = permissions.retrieve(model, limit=1)
    assert (first.has_more, first.first_id, first.last_id) == (True, perm_c.id, perm_c.id)
    assert [p.id for p in permissions.list(model, limit=1)] == [perm_c.id, perm_b.id]  # the SDK pages

    # a checkpoint is shared by its own name
    permissions.create(ckpt, project_ids=["b"])
    assert chat(b, ckpt).choices

    trained = wait_for(b, trained.id, DONE)
    assert trained.status == "succeeded", trained.error
    assert trained.fine_tuned_model.startswith("ft:tiny:b::")  # b's model, on a's model's base
    assert chat(b, trained.fine_tuned_model).choices
    assert trained.fine_tuned_model not in {m.id for m in a.models.list()}

    deleted = permissions.delete(perm_b.id, fine_tuned_model_checkpoint=model)
    assert (deleted.id, deleted.object, deleted.deleted) == (perm_b.id, "checkpoint.permission", True)
    with pytest.raises(openai.NotFoundError) as err:
        chat(b, model)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        b.fine_tuning.jobs.create(model=model, training_file=b_file)
    assert err.value.param == "model"
    assert chat(b, ckpt).choices  # its own permission stays
    assert chat(c, model).choices  # c's permission stays
    with pytest.raises(openai.NotFoundError):  # gone already
        permissions.delete(perm_b.id, fine_tuned_model_checkpoint=model)
    with pytest.raises(openai.NotFoundError):  # another checkpoint's permission
        permissions.delete(perm_c.id, fine_tuned_model_checkpoint=ckpt)
    assert [p.project_id for p in permissions.retrieve(model).data] == ["c"]

    # bad input is a 400 naming the project id, and nothing is created
    for ids, param in ((["c"], "project_ids[0]"), (["a"], "project_ids[0]"), (["d", "d"], "project_ids[1]"),
                       (["x:y"], "project_ids[0]"), ([], "project_ids")):
        with pytest.raises(openai.BadRequestError) as err:
            permissions.create(model, project_ids=ids)
        assert err.value.param == param, err.value.message
    with pytest.raises(openai.BadRequestError):
        permissions.create(model, project_ids=["d"], extra_body={"other": 1})
    assert [p.project_id for p in permissions.retrieve(model).data] == ["c"]


def test_suffix_rules_and_user_provided_suffix(server):
    """OpenAI's suffix: 1-64 characters (here letters, digits, '.', '_', '-': a ':' would break the `ft:` name),
    echoed as `user_provided_suffix` (null when none was given)."""
    client = sdk(server, "key-c")
    train = upload(client, toy_jsonl(12, 2)).id
    for bad in ("x" * 65, "", "a:b", "a b", "é"):
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model="tiny", training_file=train, suffix=bad)
        assert err.value.param == "suffix", bad
    longest = client.fine_tuning.jobs.create(model="tiny", training_file=train, suffix="A.b_c-" + "x" * 58)
    plain = client.fine_tuning.jobs.create(model="tiny", training_file=train)
    for job in (longest, plain):
        client.fine_tuning.jobs.cancel(job.id)
    assert client.fine_tuning.jobs.retrieve(longest.id).user_provided_suffix == "A.b_c-" + "x" * 58
    assert client.fine_tuning.jobs.retrieve(plain.id).user_provided_suffix is None
