"""The SQLite store: schema version, migrations on open, content-addressed blobs, cursor pages."""

from __future__ import annotations

import sqlite3

import pytest

from tunekit.serve.store import MIGRATIONS, SCHEMA_VERSION, Store, page


def test_schema_is_created_once_and_a_newer_one_is_refused(tmp_path):
    store = Store(tmp_path)
    store.add_event("ftjob-1", "hello", key="k")
    store.close()
    store = Store(tmp_path)  # reopening migrates nothing and keeps the rows
    assert [e["message"] for e in store.events("ftjob-1")] == ["hello"]
    assert not store.add_event("ftjob-1", "again", key="k")  # a keyed event is added once
    store.close()
    db = sqlite3.connect(tmp_path / "tunekit.db")
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="upgrade tunekit"):
        Store(tmp_path)


def test_blobs_are_stored_by_content_and_removed_with_their_last_file(tmp_path):
    store = Store(tmp_path)
    ids = []
    for i in range(2):
        tmp = store.upload_tmp()
        tmp.write_bytes(b'{"a": 1}\n')
        sha, size = store.put_blob(tmp)
        assert not tmp.exists() and size == 9
        ids.append(f"file-{i}")
        store.add_file({"id": ids[-1], "project": "p", "created_at": 0, "bytes": size, "filename": "../../x",
                        "purpose": "fine-tune", "status": "processed", "sha256": sha})
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == [sha]
    assert store.file("other", ids[0]) is None  # another project's id reads as missing
    store.delete_file("p", ids[0])
    assert store.blob_path(sha).exists()
    store.delete_file("p", ids[1])
    assert not store.blob_path(sha).exists()


def test_pages_follow_the_cursor_and_an_unknown_cursor_ends_the_listing():
    rows = [{"id": str(i)} for i in range(5)]
    assert page(rows, None, 2) == (rows[:2], True)
    assert page(rows, "1", 2) == (rows[2:4], True)
    assert page(rows, "3", 2) == (rows[4:], False)
    assert page(rows, "nope", 2) == ([], False)


def test_a_version_1_database_is_migrated_with_its_rows(tmp_path):
    db = sqlite3.connect(tmp_path / "tunekit.db")
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for statement in MIGRATIONS[1]:
        db.execute(statement)
    db.execute("INSERT INTO schema_version VALUES (1)")
    db.execute("INSERT INTO jobs (id, project, created_at, status, model, base, root_model, training_file, seed, "
               "hyperparameters, overrides) VALUES ('ftjob-1', 'p', 0, 'succeeded', 'm', 'b', 'm', 'file-1', 0, "
               "'{}', '{}')")
    db.commit()
    db.close()
    store = Store(tmp_path)
    job = store.job("p", "ftjob-1")
    assert job["status"] == "succeeded" and job["model_deleted_at"] is None
    assert SCHEMA_VERSION == 4 and store.evals("p") == []  # 3 added the Evals API tables, 4 keys and permissions
