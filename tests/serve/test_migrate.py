"""`tunekit migrate`: a tunekit server plays the OpenAI account (it speaks the same API), its jobs and files are
migrated to a folder of run configs and to another tunekit server, and trained there.

The source (a live server with an API key, a temporary data dir) serves the tiny Llama of conftest under OpenAI's
name `gpt-4o-mini-2024-07-18` and as `babbage-002`; its jobs train for one step. The command runs in this process
(typer's CliRunner) and talks to the servers over HTTP with the openai SDK, as a user's would. An OpenAI-shaped
stub (a few canned JSON answers) plays what a tunekit server cannot: a job whose reward is a model grader, a
legacy job without `method`.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

openai = pytest.importorskip("openai", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="uploads need python-multipart (the serve extra)")

from live_server import free_port, serving  # noqa: E402
from test_finetune import sdk, toy_jsonl, upload, wait_for  # noqa: E402
from test_jobs_dpo import AUTO_DPO, pairs_jsonl  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from tunekit.cli import app  # noqa: E402
from tunekit.config import config_from_dict, load_config  # noqa: E402
from tunekit.migrate import STATE_FILE, migrate  # noqa: E402
from tunekit.train import hyper  # noqa: E402

MINI = "gpt-4o-mini-2024-07-18"
SOURCE_KEY, DEST_KEY = "source-key", "dest-key"
DONE = ("succeeded", "failed", "cancelled")
SOURCE_TINY = {"tunekit": {"data.max_len": 64, "lora": {"r": 8, "alpha": 16}, "eval.enabled": False,
                           "train": {"threads": 1, "micro_batch_size": 4, "max_steps": 1}}}
# the same small run for every migrated job (the source's `tunekit` values are not in OpenAI's job object)
TINY = ["--set", "data.max_len=64", "--set", "lora.r=8", "--set", "lora.alpha=16", "--set", "eval.enabled=false",
        "--set", "train.threads=1", "--set", "train.micro_batch_size=4", "--set", "train.max_steps=2"]


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["migrate", *map(str, args)], env={"COLUMNS": "200"})
    # every outcome is a clean exit: no exception escapes, no traceback is printed
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_llama_dir):
    """The account: a supervised job (train + validation files, every hyperparameter, suffix, seed, metadata), a
    DPO job ("auto" hyperparameters, resolved by the source), a job on a model no --model-map names, all trained;
    and a job that failed before its "auto" hyperparameters were resolved (its file was uploaded with another
    purpose)."""
    data_dir = tmp_path_factory.mktemp("source-data")
    with serving(models=[f"{MINI}={tiny_llama_dir}", f"babbage-002={tiny_llama_dir}"], data_dir=data_dir,
                 api_keys=[SOURCE_KEY], workers=3) as (url, _):
        client = sdk(url, SOURCE_KEY)
        train, valid = upload(client, toy_jsonl(24, 0)), upload(client, toy_jsonl(10, 1), "valid.jsonl")
        pairs = upload(client, pairs_jsonl(16, 0), "pairs.jsonl")
        other = client.files.create(file=("other.jsonl", toy_jsonl(12, 2)), purpose="assistants")
        sft = client.fine_tuning.jobs.create(
            model=MINI, training_file=train.id, validation_file=valid.id, suffix="toy", seed=7, metadata={"team": "a"},
            method={"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2}}}, extra_body=SOURCE_TINY)
        dpo = client.fine_tuning.jobs.create(model=MINI, training_file=pairs.id, method=AUTO_DPO, seed=3,
                                             extra_body=SOURCE_TINY)
        unmapped = client.fine_tuning.jobs.create(model="babbage-002", training_file=train.id, extra_body=SOURCE_TINY)
        failed = client.fine_tuning.jobs.create(model=MINI, training_file=other.id, seed=11)
        jobs = {name: wait_for(client, job.id, DONE) for name, job in
                (("sft", sft), ("dpo", dpo), ("unmapped", unmapped), ("failed", failed))}
        assert [jobs[n].status for n in ("sft", "dpo", "unmapped")] == ["succeeded"] * 3, jobs
        assert jobs["failed"].status == "failed" and jobs["failed"].error.code == "invalid_file_purpose"
        assert jobs["failed"].hyperparameters.n_epochs == "auto"  # never resolved
        content = {f.id: client.files.content(f.id).read() for f in (train, valid, pairs, other)}
        yield {"url": url, "client": client, "jobs": jobs, "content": content, "tiny": tiny_llama_dir}


@pytest.fixture(scope="module")
def dest(tmp_path_factory, tiny_llama_dir):
    """Another tunekit server, with a key, serving the tiny Llama as `tiny`."""
    data_dir = tmp_path_factory.mktemp("dest-data")
    with serving(models=[f"tiny={tiny_llama_dir}"], data_dir=data_dir, api_keys=[DEST_KEY], workers=3) as (url, _):
        yield {"url": url, "client": sdk(url, DEST_KEY), "data_dir": data_dir}


def from_source(source, *args):
    return ("--from-base-url", source["url"], "--api-key", SOURCE_KEY, *args)


def content_requests(caplog) -> list[str]:
    """The source's log lines of file downloads (GET /v1/files/ID/content)."""
    return [r.getMessage() for r in caplog.records if r.name == "tunekit.serve" and "/content" in r.getMessage()]


def test_dry_run_prints_the_plan_and_writes_nothing(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = source["jobs"]
    code, out = cli(*from_source(source, "--model-map", f"{MINI}={source['tiny']}", "--to", tmp_path / "out", *TINY))
    assert code == 0, out
    assert list(tmp_path.iterdir()) == []  # no destination folder, no state, nothing beside
    carried, left = out.split("not carried")
    assert f"{jobs['sft'].id}  supervised  {MINI} -> {source['tiny']}  (succeeded at the source)" in carried
    assert "hyperparameters: n_epochs 2, batch_size 4, learning_rate_multiplier 2.0\n" in carried
    assert "seed 7; suffix toy; metadata team=a" in carried
    assert "training: " in carried and "24 lines, 24 examples" in carried and "10 lines, 10 examples" in carried
    assert "16 lines, 16 pairs" in carried
    assert "tokens per epoch (x 2 epochs:" in carried  # counted with the base's tokenizer
    assert f"{jobs['dpo'].id}  dpo" in carried and f"-> would be {tmp_path / 'out'}/{jobs['dpo'].id}/" in carried
    assert f"{jobs['unmapped'].id}  supervised  babbage-002" in left
    assert "its model babbage-002 is not mapped to an open base model" in left
    assert "hint: add --model-map babbage-002=BASE" in left
    assert f"{jobs['failed'].id}" in left and "it failed at the source" in left
    assert f"give --job {jobs['failed'].id}" in left
    assert "dry run: nothing was written or started; add --run" in out


def test_run_to_a_folder_then_train_and_run_again(source, tmp_path, caplog):
    from tunekit.train.loop import train

    caplog.set_level(logging.INFO, logger="tunekit.serve")
    jobs, content, out_dir = source["jobs"], source["content"], tmp_path / "out"
    args = from_source(source, "--model-map", f"{MINI}={source['tiny']}", "--to", out_dir, "--run", *TINY)
    code, out = cli(*args)
    assert code == 0, out
    sft, dpo = jobs["sft"], jobs["dpo"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([STATE_FILE, "files", sft.id, dpo.id])
    assert sorted(p.name for p in (out_dir / sft.id).iterdir()) == ["config.yaml", "job.json", "train.jsonl",
                                                                    "valid.jsonl"]
    assert sorted(p.name for p in (out_dir / dpo.id).iterdir()) == ["config.yaml", "job.json", "train.jsonl"]
    # the same data, byte for byte
    assert (out_dir / sft.id / "train.jsonl").read_bytes() == content[sft.training_file]
    assert (out_dir / sft.id / "valid.jsonl").read_bytes() == content[sft.validation_file]
    assert (out_dir / dpo.id / "train.jsonl").read_bytes() == content[dpo.training_file]
    assert len(content_requests(caplog)) == 3  # train, valid, pairs: each once
    state = json.loads((out_dir / STATE_FILE).read_text())
    assert set(state["files"]) == {sft.training_file, sft.validation_file, dpo.training_file}
    assert state["folders"] == {sft.id: sft.id, dpo.id: dpo.id}

    # the method, resolved hyperparameters and seed as the source trained them; the --set values
    cfg = load_config(out_dir / sft.id / "config.yaml")
    assert (cfg.objective, cfg.method, cfg.model.base) == ("sft", "lora", str(source["tiny"]))
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.seed) == (2, 4, 7)
    assert cfg.train.lr == pytest.approx(hyper.auto_lr("lora") * 2)
    assert (cfg.train.max_steps, cfg.data.max_len, cfg.lora.r, cfg.eval.enabled) == (2, 64, 8, False)
    assert cfg.data.train == out_dir / sft.id / "train.jsonl" and cfg.output.dir == out_dir / sft.id / "run"
    resolved = dpo.method.dpo.hyperparameters
    cfg_dpo = load_config(out_dir / dpo.id / "config.yaml")
    assert (cfg_dpo.objective, cfg_dpo.dpo.beta, cfg_dpo.train.epochs, cfg_dpo.train.batch_size) == (
        "dpo", resolved.beta, resolved.n_epochs, resolved.batch_size)
    assert cfg_dpo.train.lr == pytest.approx(hyper.auto_lr("lora", "dpo") * resolved.learning_rate_multiplier)
    job = json.loads((out_dir / sft.id / "job.json").read_text())
    assert job["source"]["id"] == sft.id
    assert {k: job["request"][k] for k in ("model", "suffix", "seed", "metadata")} == {
        "model": str(source["tiny"]), "suffix": "toy", "seed": 7, "metadata": {"team": "a"}}

    # `tunekit train` ready: the config trains as written
    result = train(load_config(out_dir / sft.id / "config.yaml"))
    assert result.run_dir == out_dir / sft.id / "run" and (result.run_dir / "final").is_dir()
    assert json.loads((result.run_dir / "summary.json").read_text())["steps"] == 2

    # run again: nothing fetched, no job folder rewritten
    before = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*") if p.is_file() and "run" not in p.parts}
    caplog.clear()
    code, out = cli(*args)
    assert code == 0, out
    assert content_requests(caplog) == []
    assert "3 used by carried jobs; 0 fetched (0 bytes), 3 already here" in out
    assert out.count("(done earlier)") == 2
    assert {p: p.stat().st_mtime_ns for p in before} == before

    # a job folder deleted since is written again, from the files kept
    shutil.rmtree(out_dir / dpo.id)
    code, out = cli(*args)
    assert code == 0, out
    assert content_requests(caplog) == [] and out.count("(done earlier)") == 1
    assert (out_dir / dpo.id / "train.jsonl").read_bytes() == content[dpo.training_file]


def test_an_interrupted_run_carries_on_where_it_stopped(source, tmp_path, caplog):
    """Stopped after its first download (the state saved, nothing else written), a migration run again fetches
    only the files it lacks and writes the job folders; no temporary file is left behind."""
    caplog.set_level(logging.INFO, logger="tunekit.serve")
    jobs, out_dir = source["jobs"], tmp_path / "out"

    def stop_after_first_fetch(message: str) -> None:
        if message.startswith("fetched"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        migrate(source=source["url"], api_key=SOURCE_KEY, model_map=[f"{MINI}={source['tiny']}"], to=str(out_dir),
                values=TINY[1::2], run=True, log=stop_after_first_fetch)
    state = json.loads((out_dir / STATE_FILE).read_text())
    assert len(state["files"]) == 1 and state["folders"] == {}
    assert sorted(p.name for p in out_dir.rglob("*")) == sorted([STATE_FILE, "files", *(
        Path(f["path"]).name for f in state["files"].values())])
    caplog.clear()
    code, out = cli(*from_source(source, "--model-map", f"{MINI}={source['tiny']}", "--to", out_dir, "--run", *TINY))
    assert code == 0, out
    assert len(content_requests(caplog)) == 2 and "2 fetched" in out and "1 already here" in out
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([STATE_FILE, "files", jobs["sft"].id, jobs["dpo"].id])
    assert not [p for p in out_dir.rglob("*") if ".tmp" in p.name]


def normalized(cfg) -> dict:
    """A run config without where its files are (a folder's and a server's job differ only there)."""
    dumped = cfg.model_dump(mode="json")
    dumped["data"].update(train=None, validation=None)
    dumped["output"].update(dir=None)
    return dumped


def test_run_to_a_server_trains_what_the_folder_config_says(source, dest, tmp_path):
    """The jobs are created on the destination through the SDK, with the same bytes and the same request; the
    config it trains each with equals the folder destination's config of that job, also for a job whose
    hyperparameters were never resolved at the source ("auto": the folder resolves them as the server does)."""
    jobs, client = source["jobs"], dest["client"]
    chosen = [jobs[n].id for n in ("sft", "dpo", "failed")]
    common = from_source(source, "--model-map", f"{MINI}=tiny", *TINY, *(x for j in chosen for x in ("--job", j)))
    args = (*common, "--to", dest["url"], "--to-api-key", DEST_KEY, "--state-dir", tmp_path / "state", "--run")
    code, out = cli(*args)
    assert code == 0, out
    state = json.loads((tmp_path / "state" / STATE_FILE).read_text())
    created = state["servers"][dest["url"]]["jobs"]
    assert sorted(created) == sorted(chosen)
    for name in ("sft", "dpo", "failed"):
        src, job = jobs[name], client.fine_tuning.jobs.retrieve(created[jobs[name].id])
        assert (job.model, job.seed, job.metadata, job.method.type) == ("tiny", src.seed, src.metadata,
                                                                        src.method.type)
        assert job.user_provided_suffix == src.user_provided_suffix
        assert client.files.content(job.training_file).read() == source["content"][src.training_file]
        if src.validation_file:
            assert client.files.content(job.validation_file).read() == source["content"][src.validation_file]
        kind = src.method.type
        sent = getattr(job.method, kind).hyperparameters.to_dict()
        if name != "failed":  # resolved at the source: carried as numbers
            assert sent == getattr(src.method, kind).hyperparameters.to_dict()

    # the folder destination's configs of the same jobs (a dry run: nothing written) equal the server's
    plan = migrate(source=source["url"], api_key=SOURCE_KEY, model_map=[f"{MINI}={source['tiny']}"],
                   to=str(tmp_path / "folder"), values=TINY[1::2], jobs=chosen)
    assert not (tmp_path / "folder").exists() and all(p.carried for p in plan.jobs)
    for name in ("sft", "dpo", "failed"):
        job = wait_for(client, created[jobs[name].id], DONE)
        assert job.status == "succeeded", job.error
        on_server = load_config(dest["data_dir"] / "jobs" / job.id / "config.yaml", check_files=False)
        folder = config_from_dict(next(p for p in plan.jobs if p.id == jobs[name].id).config, check_files=False)
        assert normalized(folder) == normalized(on_server), name
    failed = next(p for p in plan.jobs if p.id == jobs["failed"].id)
    assert failed.auto == ["n_epochs", "batch_size", "learning_rate_multiplier"]  # never resolved at the source
    assert failed.hyperparameters["n_epochs"] == hyper.auto_epochs(12)  # resolved here as there

    # run again: nothing uploaded, no job created twice
    n_files, n_jobs = len(list(client.files.list())), len(list(client.fine_tuning.jobs.list()))
    code, out = cli(*args)
    assert code == 0, out
    assert out.count("(done earlier)") == 3
    assert (len(list(client.files.list())), len(list(client.fine_tuning.jobs.list()))) == (n_files, n_jobs)


def test_bad_input_and_unreachable_sources_are_clear_errors(source, dest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mapped = ("--model-map", f"{MINI}={source['tiny']}")
    code, out = cli("--from-base-url", source["url"], "--api-key", "wrong", *mapped, "--run")
    assert code == 1 and "--api-key" in out and "refused the API key (401 on fine-tuning jobs" in out

    code, out = cli("--from-base-url", f"http://127.0.0.1:{free_port()}/v1", "--api-key", "k", *mapped, "--run")
    assert code == 1 and "--from-base-url" in out and "cannot reach" in out

    code, out = cli("--from-base-url", source["url"].removesuffix("/v1"), "--api-key", SOURCE_KEY, *mapped)
    assert code == 1 and "has no fine-tuning jobs (404" in out and "ending in /v1" in out

    # every problem of the arguments at once, each with its option
    code, out = cli(*from_source(source, "--model-map", MINI, "--model-map", "babbage-002=no/such/dir/",
                                 "--set", "=3", "--to-api-key", "k", "--run"))
    assert code == 1 and f"'{MINI}' is not SOURCE_MODEL=BASE" in out and "no such model folder" in out
    assert "--set" in out and "--to-api-key" in out
    # a --set value the jobs API refuses (the server sets train.lr from the job's hyperparameters)
    code, out = cli(*from_source(source, *mapped, "--set", "train.lr=0.1", "--run"))
    assert code == 1 and "--set" in out and "tunekit.train.lr is set by the job itself" in out
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, out = cli(*from_source(source, *mapped, "--to", tmp_path / "busy", "--run"))
    assert code == 1 and "--to" in out and "not a migration folder" in out
    # a destination server that does not serve the mapped base: refused before anything is uploaded
    n_files = len(list(dest["client"].files.list()))
    code, out = cli(*from_source(source, "--model-map", f"{MINI}=gpt-4o", "--to", dest["url"], "--to-api-key",
                                 DEST_KEY, "--run"))
    assert code == 1 and f"{MINI}=gpt-4o: {dest['url']} serves no model 'gpt-4o' (it serves: " in out
    code, out = cli(*from_source(source, "--model-map", f"{MINI}=tiny", "--to", dest["url"], "--to-api-key", "bad"))
    assert code == 1 and "--to-api-key" in out and "refused the API key" in out
    assert len(list(dest["client"].files.list())) == n_files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # nothing written by any of them


# --------------------------------------------------------------------------------------------------
# OpenAI's shapes a tunekit server does not make


RFT_JOB = {"id": "ftjob-rft", "object": "fine_tuning.job", "created_at": 1, "status": "succeeded", "model": "o4-mini",
           "training_file": "file-prompts", "validation_file": None, "seed": 1, "hyperparameters": None,
           "method": {"type": "reinforcement", "reinforcement": {
               "grader": {"type": "score_model", "name": "judge", "model": "gpt-4o",
                          "input": [{"role": "user", "content": "Score {{sample.output_text}}"}]},
               "hyperparameters": {"n_epochs": 1, "batch_size": 8}}}}
LEGACY_JOB = {"id": "ftjob-old", "object": "fine_tuning.job", "created_at": 1, "status": "succeeded",
              "model": "gpt-3.5-turbo-0125", "training_file": "file-chat", "validation_file": None, "seed": 5,
              "hyperparameters": {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 2,
                                  "prompt_loss_weight": 0.01}}


class _OpenAIStub(BaseHTTPRequestHandler):
    """A few of OpenAI's answers, as its API gives them (docs: /work/shared/reference/openai-api.md)."""

    content = {"file-prompts": b"".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}],
                                                    "answer": str(i)}).encode() + b"\n" for i in range(12)),
               "file-chat": toy_jsonl(12, 3)}

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/v1/fine_tuning/jobs":
            body = {"object": "list", "data": [RFT_JOB, LEGACY_JOB], "has_more": False}
        elif path == "/v1/files":
            body = {"object": "list", "has_more": False, "data": [
                {"id": k, "object": "file", "bytes": len(v), "created_at": 1, "filename": f"{k}.jsonl",
                 "purpose": "fine-tune", "status": "processed"} for k, v in self.content.items()]}
        elif path.endswith("/content"):
            data = self.content[path.split("/")[-2]]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        else:
            body = {"error": {"message": "not here", "type": "invalid_request_error", "param": None, "code": None}}
        data = json.dumps(body).encode()
        self.send_response(200 if "error" not in body else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_jobs_a_model_graders_judge_is_mapped_a_legacy_job_is_carried(tmp_path, tiny_llama_dir):
    """A reinforcement job whose reward is a score_model grader judged by gpt-4o stays behind until --model-map
    maps the judge too; then its config names the judge's folder in grpo.judges and the grader names it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OpenAIStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    source = f"http://127.0.0.1:{server.server_address[1]}/v1"
    bases = [f"o4-mini={tiny_llama_dir}", f"gpt-3.5-turbo-0125={tiny_llama_dir}"]
    try:
        plan = migrate(source=source, api_key="sk-test", model_map=bases, to=str(tmp_path / "out"))
        judged = migrate(source=source, api_key="sk-test", model_map=[*bases, f"gpt-4o={tiny_llama_dir}"],
                         to=str(tmp_path / "judged"), run=True)
    finally:
        server.shutdown()
    rft, legacy = plan.jobs
    assert not rft.carried and not (tmp_path / "out").exists()
    assert rft.not_carried[0].where == "--model-map" and "'gpt-4o'" in rft.not_carried[0].message
    assert "--model-map gpt-4o=JUDGE" in rft.not_carried[0].hint
    rft = judged.jobs[0]
    assert rft.carried, rft.not_carried
    config = yaml.safe_load((tmp_path / "judged" / "ftjob-rft" / "config.yaml").read_text())
    assert config["objective"] == "grpo" and config["grpo"]["grader"]["model"] == str(tiny_llama_dir)
    assert config["grpo"]["judges"] == {str(tiny_llama_dir): str(tiny_llama_dir)}
    # a job from before `method`: its top-level hyperparameters, as a supervised job's
    assert legacy.carried and legacy.method == "supervised"
    assert {k: legacy.hyperparameters[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")} == {
        "n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 2.0}
    assert legacy.notes == ["hyperparameter prompt_loss_weight=0.01 has no tunekit setting: left out"]
    assert legacy.config["train"]["seed"] == 5 and legacy.config["model"]["base"] == str(tiny_llama_dir)
