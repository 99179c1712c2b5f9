"""Azure OpenAI's client, unchanged, on `tunekit serve` (src/tunekit/serve/azure.py, docs/migrating.md).

`openai.AzureOpenAI(azure_endpoint=..., api_key=..., api_version=...)` drives a live server that serves the shipped
tiny model (models/tiny-chat) under the name Azure's tutorial fine-tunes, `gpt-4o-mini-2024-07-18`, with an API
key (so the `api-key` header is checked, not just passed). Responses are validated strictly.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="uploads need python-multipart (the serve extra)")
requests = pytest.importorskip("requests", reason="Azure's deploy step is a plain REST call (requests)")

from live_server import serving  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "models" / "tiny-chat"
BASE = "gpt-4o-mini-2024-07-18"  # what Azure's tutorial fine-tunes: here the tiny model served under that name
KEY = "azure-key"
WORDS = ["apple", "river", "cloud", "stone", "green", "music"]


def toy_file(path: Path, n: int, seed: int) -> Path:
    """A chat JSONL of the toy "say WORD" task, written UTF-8 with a BOM as Azure's docs ask."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        word = rng.choice(WORDS)
        lines.append(json.dumps({"messages": [
            {"role": "system", "content": "You repeat words."},
            {"role": "user", "content": f"say {word}"},
            {"role": "assistant", "content": f"{word} {word} {word}"}]}))
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def azure(root: str, version: str = "2024-10-21", **kwargs) -> openai.AzureOpenAI:
    # max_retries=0: the SDK retries 409 and 5xx, which would hide them
    return openai.AzureOpenAI(azure_endpoint=root, api_key=kwargs.pop("api_key", KEY), api_version=version,
                              max_retries=0, timeout=120, _strict_response_validation=True, **kwargs)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("azure-data")
    with serving(models=[f"{BASE}={TINY}"], data_dir=data_dir, api_keys=[KEY, "other:other-key"]) as (url, app):
        yield url.removesuffix("/v1"), app, data_dir


def test_azure_tutorial_runs_unchanged(server, tmp_path):
    """Azure's "Customize a model with fine-tuning" Python sequence: only the endpoint, key and data changed;
    `extra_body` keeps the job to a few seconds (a tunekit config, ignored by Azure)."""
    root, _, data_dir = server
    client = azure(root)
    training_file_name = toy_file(tmp_path / "training_set.jsonl", 24, 0)
    validation_file_name = toy_file(tmp_path / "validation_set.jsonl", 10, 1)

    training_response = client.files.create(file=open(training_file_name, "rb"), purpose="fine-tune")
    training_file_id = training_response.id
    validation_response = client.files.create(file=open(validation_file_name, "rb"), purpose="fine-tune")
    validation_file_id = validation_response.id
    assert (training_response.status, training_response.filename) == ("processed", "training_set.jsonl")

    response = client.fine_tuning.jobs.create(
        training_file=training_file_id, validation_file=validation_file_id, model=BASE, seed=105,
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 100},  # the legacy form
        extra_body={"tunekit": {"data.max_len": 64, "lora": {"r": 8, "alpha": 16},
                                "train": {"threads": 1, "micro_batch_size": 4, "max_steps": 8, "save_every": 4},
                                "eval": {"limit": 1, "max_new_tokens": 4}}})
    job_id = response.id
    assert (response.status, response.model, response.seed) == ("validating_files", BASE, 105)
    assert (response.hyperparameters.n_epochs, response.method.supervised.hyperparameters.batch_size) == (2, 4)

    status = response.status
    deadline = time.monotonic() + 300
    while status not in ["succeeded", "failed"]:  # the tutorial's loop (it sleeps 10 s)
        assert time.monotonic() < deadline, response
        time.sleep(0.5)
        response = client.fine_tuning.jobs.retrieve(job_id)
        status = response.status
    assert status == "succeeded", response.error
    fine_tuned_model = response.fine_tuned_model
    assert fine_tuned_model == f"ft:{BASE}:default::{job_id[6:14]}"

    response = client.fine_tuning.jobs.list_events(fine_tuning_job_id=job_id, limit=10)
    events = response.data
    assert len(events) == 10 and response.has_more
    assert events[0].message == "The job has successfully completed"
    assert json.loads(response.model_dump_json(indent=2))["data"][0]["object"] == "fine_tuning.job.event"

    total = next(e.data["total_steps"] for e in events if e.type == "metrics")

    response = client.fine_tuning.jobs.checkpoints.list(job_id)
    assert [c.step_number for c in response.data] == [total, 4]  # every 4 steps, and the last
    assert response.data[0].fine_tuned_model_checkpoint == f"{fine_tuned_model}:ckpt-step-{total}"

    # "Deploy the fine-tuned model": the tutorial's REST call to Azure's management API, sent to this host
    token, subscription, resource_group, resource_name = KEY, "sub-1", "rg-1", "res-1"
    model_deployment_name = "gpt-4o-mini-ft"
    deploy_params = {"api-version": "2024-10-01"}
    deploy_headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    deploy_data = {"sku": {"name": "standard", "capacity": 1},
                   "properties": {"model": {"format": "OpenAI", "name": fine_tuned_model, "version": "1"}}}
    request_url = (f"{root}/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/"
                   f"Microsoft.CognitiveServices/accounts/{resource_name}/deployments/{model_deployment_name}")
    r = requests.put(request_url, params=deploy_params, headers=deploy_headers, data=json.dumps(deploy_data))
    assert r.status_code == 200, r.text
    deployed = r.json()
    assert (deployed["name"], deployed["properties"]["provisioningState"]) == (model_deployment_name, "Succeeded")
    assert deployed["properties"]["model"]["name"] == fine_tuned_model
    assert deployed["id"] == request_url.removeprefix(root)

    messages = [{"role": "system", "content": "You repeat words."}, {"role": "user", "content": "say apple"}]
    response = client.chat.completions.create(model=model_deployment_name, messages=messages, temperature=0,
                                              max_tokens=12)
    assert response.model == fine_tuned_model  # as Azure, the reply names the deployed model
    # the same answer as the fine-tuned model by its own id (a deployment of its own name), and as OpenAI's client
    by_id = client.chat.completions.create(model=fine_tuned_model, messages=messages, temperature=0, max_tokens=12)
    plain = openai.OpenAI(base_url=f"{root}/v1", api_key=KEY, _strict_response_validation=True)
    by_openai = plain.chat.completions.create(model=fine_tuned_model, messages=messages, temperature=0,
                                              max_tokens=12)
    base = plain.chat.completions.create(model=BASE, messages=messages, temperature=0, max_tokens=12)
    answer = response.choices[0].message.content
    assert answer == by_id.choices[0].message.content == by_openai.choices[0].message.content
    assert answer != base.choices[0].message.content, "the deployment answered as the base model"

    # the deployment is listed (management API) and survives a restart (DATA_DIR/deployments.json)
    listing = requests.get(request_url.rsplit("/", 1)[0], params=deploy_params, headers=deploy_headers).json()
    assert [d["name"] for d in listing["value"]] == [model_deployment_name]
    assert json.loads((data_dir / "deployments.json").read_text()) == {
        "default": {model_deployment_name: fine_tuned_model}}

    # another project's key sees neither the fine-tuned model nor the deployment
    other = azure(root, api_key="other-key")
    with pytest.raises(openai.NotFoundError) as info:
        other.chat.completions.create(model=model_deployment_name, messages=messages)
    assert info.value.code == "DeploymentNotFound" and fine_tuned_model not in info.value.message

    # deleting the deployment keeps the model
    assert requests.delete(request_url, params=deploy_params, headers=deploy_headers).json()["deleted"] is True
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model=model_deployment_name, messages=messages)
    assert info.value.code == "DeploymentNotFound"
    assert client.chat.completions.create(model=fine_tuned_model, messages=messages, temperature=0,
                                          max_tokens=12).choices[0].message.content == answer


def test_api_version_rules(server):
    root, _, _ = server
    messages = [{"role": "user", "content": "say apple"}]
    for version in ["2024-10-21", "2025-04-01-preview", "2024-02-01", "2030-01-01"]:  # newer ones too
        assert BASE in [m.id for m in azure(root, version).models.list()]
    for version in ["2022-12-01", "banana", "2024-10-21-beta", ""]:
        with pytest.raises(openai.BadRequestError) as info:
            azure(root, version).files.list()
        assert info.value.param == "api-version" and "API version not supported" in info.value.message
    # no api-version at all (an OpenAI client pointed at /openai): Azure's 404
    bare = openai.OpenAI(base_url=f"{root}/openai", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        bare.fine_tuning.jobs.list()
    assert "Resource not found" in info.value.message and info.value.param == "api-version"
    # Azure's v1 surface: a plain OpenAI client on /openai/v1/, no api-version
    v1 = openai.OpenAI(base_url=f"{root}/openai/v1/", api_key=KEY, max_retries=0, _strict_response_validation=True)
    reply = v1.chat.completions.create(model=BASE, messages=messages, max_tokens=2)
    assert reply.model == BASE and reply.usage.completion_tokens >= 1


def test_keys_and_deployments_refused_as_the_client_expects(server):
    root, _, _ = server
    messages = [{"role": "user", "content": "say apple"}]
    with pytest.raises(openai.AuthenticationError):
        azure(root, api_key="wrong").files.list()
    # an Entra ID (AAD) token arrives as Authorization: Bearer; the server's key is accepted there too
    token_client = openai.AzureOpenAI(azure_endpoint=root, azure_ad_token=KEY, api_version="2024-10-21",
                                      max_retries=0)
    assert token_client.files.list().data is not None
    with pytest.raises(openai.AuthenticationError):
        openai.AzureOpenAI(azure_endpoint=root, azure_ad_token="wrong", api_version="2024-10-21",
                           max_retries=0).files.list()

    client = azure(root)
    for name in ["gpt-35-turbo", "no-such-deployment"]:
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model=name, messages=messages)
        assert info.value.status_code == 404 and info.value.code == "DeploymentNotFound"
        assert repr(name) in info.value.message and BASE in info.value.message  # names what is there
    # a client made for one deployment (azure_deployment=) still reaches the files and jobs paths
    pinned = openai.AzureOpenAI(azure_endpoint=root, azure_deployment=BASE, api_key=KEY, api_version="2024-10-21",
                                max_retries=0, _strict_response_validation=True)
    assert pinned.chat.completions.create(model="ignored-by-azure", messages=messages, max_tokens=2).model == BASE
    assert pinned.fine_tuning.jobs.list().data is not None

    url = f"{root}/subscriptions/s/resourceGroups/g/providers/Microsoft.CognitiveServices/accounts/a/deployments"
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"properties": {"model": {"name": BASE}}}
    # a deployment of the base model under a name scripts use: found by Azure's and OpenAI's clients alike
    assert requests.put(f"{url}/gpt-4o-mini", json=body, headers=headers).status_code == 200
    assert client.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=2).model == BASE
    plain = openai.OpenAI(base_url=f"{root}/v1", api_key=KEY, max_retries=0)
    assert plain.chat.completions.create(model="gpt-4o-mini", messages=messages, max_tokens=2).model == BASE
    refused = {
        "unknown model": (f"{url}/x1", {"properties": {"model": {"name": "gpt-4"}}}, 400, "DeploymentModelNotSupported"),
        "a served name": (f"{url}/{BASE}", body, 400, "InvalidResourceName"),
        "bad name": (f"{url}/-x", body, 400, "InvalidResourceName"),
        "no model": (f"{url}/x2", {"sku": {}}, 400, None),
    }
    for why, (where, payload, status, code) in refused.items():
        r = requests.put(where, json=payload, headers=headers)
        assert r.status_code == status, (why, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, why
        assert code is None or r.json()["error"]["code"] == code, (why, r.text)
    assert requests.put(f"{url}/x3", json=body).status_code == 401  # no key
    r = requests.get(f"{url}/missing", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "DeploymentNotFound"
    assert requests.delete(f"{url}/gpt-4o-mini", headers=headers).status_code == 200


def test_deployments_are_kept_across_restarts(tmp_path):
    data_dir = tmp_path / "data"
    body = {"properties": {"model": {"name": BASE}}}
    with serving(models=[f"{BASE}={TINY}"], data_dir=data_dir) as (url, _):
        root = url.removesuffix("/v1")
        r = requests.put(f"{root}/openai/deployments/my-model?api-version=2024-10-21", json=body)
        assert r.status_code == 200, r.text
    with serving(models=[f"{BASE}={TINY}"], data_dir=data_dir) as (url, _):
        client = azure(url.removesuffix("/v1"), api_key="any")  # no keys: loopback, any key, project "local"
        reply = client.chat.completions.create(model="my-model", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2)
        assert reply.model == BASE
    assert json.loads((data_dir / "deployments.json").read_text()) == {"local": {"my-model": BASE}}
