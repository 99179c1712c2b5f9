"""A server started as the README starts it: relative paths, read once against the folder it was started from.

`tunekit serve base=models/tiny-chat --data-dir serve-data` names a model and a data dir relative to where it
runs; a fine-tuning job's worker runs `tunekit train` in the job's own folder. Every path handed on must name
the same files from there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("openai", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="uploads need python-multipart (the serve extra)")

from live_server import serving  # noqa: E402
from test_finetune import sdk, tiny_job, toy_jsonl, upload, wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_jobs_train_on_a_server_started_with_relative_paths(tmp_path, tiny_llama_dir, monkeypatch):
    shutil.copytree(tiny_llama_dir, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    with serving(models=["base=models/tiny"], data_dir=Path("serve-data")) as (url, app):
        monkeypatch.chdir(tmp_path / "models")  # nothing later may depend on the folder the server started in
        client = sdk(url)
        file = upload(client, toy_jsonl(12, 40))
        job = client.fine_tuning.jobs.create(model="base", training_file=file.id, hyperparameters={"n_epochs": 1},
                                             extra_body=tiny_job(max_steps=2))
        job = wait_for(client, job.id, ("succeeded", "failed"))
        assert job.status == "succeeded", job.error
        job_dir = tmp_path / "serve-data" / "jobs" / job.id
        config = yaml.safe_load((job_dir / "config.yaml").read_text())
        assert config["model"]["base"] == str((tmp_path / "models" / "tiny").resolve())
        assert config["data"]["train"] == str(job_dir / "train.jsonl")

        # continued fine-tuning from the fine-tuned model and from its checkpoint, on the same server
        ckpt = client.fine_tuning.jobs.checkpoints.list(job.id).data
        for model in [job.fine_tuned_model] + [c.fine_tuned_model_checkpoint for c in ckpt[:1]]:
            more = client.fine_tuning.jobs.create(model=model, training_file=file.id,
                                                  hyperparameters={"n_epochs": 1}, extra_body=tiny_job(max_steps=2))
            more = wait_for(client, more.id, ("succeeded", "failed"))
            assert more.status == "succeeded", (model, more.error)

        # a served model whose folder is gone since start-up: the create call says so, nothing is queued
        shutil.rmtree(tmp_path / "models" / "tiny")
        with pytest.raises(Exception) as refused:
            client.fine_tuning.jobs.create(model="base", training_file=file.id)
        assert getattr(refused.value, "status_code", None) == 400
        assert "no longer exists" in str(refused.value) and str(tmp_path / "models" / "tiny") in str(refused.value)


def _serve(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # a hub that refuses connections at once (the discard port), whatever network this machine has
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_ENDPOINT": "http://127.0.0.1:9",
                                                                             "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tunekit.cli", "serve", *args, "--port", "0"], cwd=cwd,
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("arg", ["models/tiny-chatt", "base=models/tiny-chatt", "./tiny-chat", "no such model!"])
def test_a_model_that_is_neither_a_folder_nor_a_reachable_hub_id_fails_at_once(arg, tmp_path):
    began = time.monotonic()
    done = _serve([arg], tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    message = " ".join(done.stderr.split())
    assert "no such model folder" in message and str(tmp_path) in message, message
    assert time.monotonic() - began < 30  # no minute of network retries
