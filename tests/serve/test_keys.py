"""API keys in the server's database: `tunekit keys create/list/revoke` while a server runs, driven by the
openai SDK as a user would. A new key works at once, a revoked one is a 401 at once, keys given on the command
line keep working beside them, and each key's project sees only its own files and jobs."""

from __future__ import annotations

import sqlite3

import pytest

openai = pytest.importorskip("openai", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="uploads need python-multipart (the serve extra)")

from live_server import serving  # noqa: E402
from test_finetune import QUESTION, sdk, tiny_job, toy_jsonl, upload  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from tunekit.cli import app as cli  # noqa: E402


def keys(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr with its lines joined: the console wraps them) of `tunekit keys ARGS`."""
    result = CliRunner().invoke(cli, ["keys", *args])
    return result.exit_code, result.stdout, " ".join(result.stderr.split())


def create(project: str, data_dir) -> str:
    code, out, err = keys("create", "--project", project, "--data-dir", str(data_dir))
    assert code == 0, err
    return out.strip()


def listing(data_dir) -> dict[str, list[str]]:
    """key id -> its row's columns after the id (project, created date, created time, key, revoked...)."""
    code, out, err = keys("list", "--data-dir", str(data_dir))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "PROJECT", "CREATED", "KEY", "REVOKED"]
    return {line.split()[0]: line.split()[1:] for line in lines[1:]}


def test_cli_keys_work_at_once_and_a_revoked_key_is_refused_at_once(tmp_path, tiny_llama_dir):
    with serving(models=[f"tiny={tiny_llama_dir}"], data_dir=tmp_path, api_keys=["ops:listed-key"]) as (url, _):
        listed = sdk(url, "listed-key")
        assert listed.models.list().data  # the --api-key key works before and after database keys exist

        key_a, key_b = create("a", tmp_path), create("b", tmp_path)
        assert key_a.startswith("tk-") and key_a != key_b
        rows = listing(tmp_path)
        ids = {row[0]: key_id for key_id, row in rows.items()}  # project -> key id
        assert set(ids) == {"a", "b"} and all(k.startswith("key_") for k in rows)
        assert rows[ids["a"]][3:] == ["tk-…" + key_a[-4:], "no"]  # last 4 characters, not revoked

        a, b = sdk(url, key_a), sdk(url, key_b)
        mine = upload(a, toy_jsonl(12, 0))
        job = a.fine_tuning.jobs.create(model="tiny", training_file=mine.id, metadata={"team": "x", "run": "1"},
                                        extra_body=tiny_job(max_steps=1))
        assert job.organization_id == "org-a"
        assert a.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        # project scoping: b sees none of a's files and jobs
        assert [f.id for f in a.files.list()] == [mine.id] and b.files.list().data == []
        with pytest.raises(openai.NotFoundError):
            b.files.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            b.fine_tuning.jobs.retrieve(job.id)
        assert b.fine_tuning.jobs.list().data == [] and b.fine_tuning.jobs.list(metadata={"team": "x"}).data == []
        with pytest.raises(openai.BadRequestError) as err:
            b.fine_tuning.jobs.create(model="tiny", training_file=mine.id)
        assert err.value.param == "training_file"
        # metadata filters: every pair given must match
        assert [j.id for j in a.fine_tuning.jobs.list(metadata={"team": "x", "run": "1"})] == [job.id]
        assert a.fine_tuning.jobs.list(metadata={"team": "x", "run": "2"}).data == []
        assert listed.files.list().data == []  # the listed key's project "ops" is a third one

        # a key with the right id and a wrong secret, or not a key at all: 401
        for wrong in (key_b[:-1] + ("A" if key_b[-1] != "A" else "B"), "tk-short", "anything"):
            with pytest.raises(openai.AuthenticationError) as err:
                sdk(url, wrong).models.list()
            assert err.value.code == "invalid_api_key"

        code, out, _ = keys("revoke", ids["a"], "--data-dir", str(tmp_path))
        assert code == 0 and "revoked" in out
        with pytest.raises(openai.AuthenticationError) as err:  # the next request, same server
            a.chat.completions.create(model="tiny", messages=QUESTION, max_completion_tokens=2)
        assert err.value.code == "invalid_api_key" and ids["a"] in err.value.message
        with pytest.raises(openai.AuthenticationError):
            a.files.list()
        assert b.chat.completions.create(model="tiny", messages=QUESTION, max_completion_tokens=2).choices
        assert listed.models.list().data
        rows = listing(tmp_path)
        assert rows[ids["a"]][-1] != "no" and rows[ids["b"]][-1] == "no"  # a: the revocation's date

    code, _, err = keys("revoke", "key_nope", "--data-dir", str(tmp_path))
    assert code == 1 and "key_nope" in err and ids["a"] in err  # names the keys there are
    code, _, err = keys("create", "--project", "a:b", "--data-dir", str(tmp_path))
    assert code == 1 and "project name" in err
    code, _, err = keys("list", "--data-dir", str(tmp_path / "elsewhere"))
    assert code == 1 and "does not exist" in err


def test_a_database_key_turns_on_keys_for_a_server_started_without_any(tmp_path, tiny_llama_dir):
    from tunekit.errors import TunekitError
    from tunekit.serve.app import ServeSettings, check_exposure

    exposed = ServeSettings(host="0.0.0.0", data_dir=tmp_path)
    with serving(models=[f"tiny={tiny_llama_dir}"], data_dir=tmp_path) as (url, _):
        assert sdk(url, "anything").models.list().data  # loopback, no keys: any bearer, project "local"
        with pytest.raises(TunekitError, match="no API key"):
            check_exposure(exposed)
        key = create("team", tmp_path)
        with pytest.raises(openai.AuthenticationError):
            sdk(url, "anything").models.list()
        client = sdk(url, key)
        assert client.files.list().data == []
        file = upload(client, toy_jsonl(12, 3))
        # Azure's client sends the key as `api-key`: the same key, the same project
        azure = openai.AzureOpenAI(azure_endpoint=url.removesuffix("/v1"), api_key=key, api_version="2024-10-21",
                                   max_retries=0)
        assert [f.id for f in azure.files.list()] == [file.id]
    check_exposure(exposed)  # a key in the database: a non-loopback address may be bound
    keys("revoke", listing(tmp_path).popitem()[0], "--data-dir", str(tmp_path))
    check_exposure(exposed)  # a revoked key still means "keys are required", never "open"


def test_only_a_salted_hash_is_stored_and_a_version_3_database_is_migrated(tmp_path):
    from tunekit.serve.keys import StoredKeys, create_key
    from tunekit.serve.store import MIGRATIONS, Store

    db = sqlite3.connect(tmp_path / "tunekit.db")
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version in (1, 2, 3):
        for statement in MIGRATIONS[version]:
            db.execute(statement)
        db.execute("INSERT INTO schema_version VALUES (?)", (version,))
    db.execute("INSERT INTO files (id, project, created_at, bytes, filename, purpose, status, sha256) "
               "VALUES ('file-1', 'p', 0, 1, 'x', 'fine-tune', 'processed', 'abc')")
    db.commit()
    db.close()
    store = Store(tmp_path)
    assert store.file("p", "file-1")["filename"] == "x" and store.keys() == [] and not store.has_keys()
    (row1, key1), (_, key2) = create_key(store, "p"), create_key(store, "p")
    stored = store.keys()
    assert stored[0]["salt"] != stored[1]["salt"]  # a salt per key
    secret1 = key1.split("-", 2)[2]
    for value in stored[0].values():
        assert secret1 not in str(value)
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("tunekit.db*"))  # with the WAL, if one is left
    assert secret1.encode() not in raw and key2.split("-", 2)[2].encode() not in raw

    store = Store(tmp_path)
    checker = StoredKeys(store)
    assert checker.check(key1).project == "p" and checker.check(key1).project == "p"  # the second from memory
    assert checker.check(key2[:-1] + ("x" if key2[-1] != "x" else "y")).project is None
    store.revoke_key(row1["id"])
    assert checker.check(key1).revoked == row1["id"] and checker.check(key1).project is None
    store.close()
