"""The server's state: one SQLite database (WAL) and a content-addressed folder of uploaded files.

    DATA_DIR/tunekit.db          files, jobs, events, checkpoints, evals, eval runs and output items,
                                 API keys (hashed), checkpoint permissions, schema_version
    DATA_DIR/blobs/SHA256        file contents, written to a temporary name, fsynced, then renamed
    DATA_DIR/jobs/JOB_ID/        a job's training config, data and run dir (see worker.py)

The schema is created and migrated on open (`MIGRATIONS`, recorded in `schema_version`). Every row belongs
to a project; lookups take the project, so another project's id reads as missing. Ids carry OpenAI's
prefixes; timestamps are integer seconds. Lists are ordered by `seq` (insertion order), which the API's
`after` cursors use, so paging never skips or repeats a row even when timestamps tie.

One connection guarded by a lock serves the request threads and the worker thread; JSON columns hold the
job fields that are only read back whole (hyperparameters, method, metadata, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import string
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from tunekit.fsio import fsync_dir

DEFAULT_PROJECT = "local"  # the project of every object when the server has no API keys

MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE files (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, project TEXT NOT NULL,
            created_at INTEGER NOT NULL, bytes INTEGER NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
            status TEXT NOT NULL, status_details TEXT, sha256 TEXT NOT NULL, examples INTEGER)""",
        "CREATE INDEX files_project ON files (project, seq)",
        """CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, project TEXT NOT NULL,
            created_at INTEGER NOT NULL, status TEXT NOT NULL, model TEXT NOT NULL, base TEXT NOT NULL,
            root_model TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT,
            seed INTEGER NOT NULL, metadata TEXT, integrations TEXT, hyperparameters TEXT NOT NULL,
            overrides TEXT NOT NULL, fine_tuned_model TEXT, finished_at INTEGER, trained_tokens INTEGER,
            result_files TEXT NOT NULL DEFAULT '[]', error TEXT, estimated_finish INTEGER,
            total_steps INTEGER)""",
        "CREATE INDEX jobs_project ON jobs (project, seq)",
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL,
            created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, type TEXT NOT NULL,
            data TEXT, key TEXT, UNIQUE (job_id, key))""",
        "CREATE INDEX events_job ON events (job_id, seq)",
        """CREATE TABLE checkpoints (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, job_id TEXT NOT NULL,
            created_at INTEGER NOT NULL, step INTEGER NOT NULL, metrics TEXT NOT NULL, path TEXT NOT NULL,
            UNIQUE (job_id, step))""",
    ],
    # DELETE /v1/models/{ft model}: the job stays, its model is no longer served
    2: ["ALTER TABLE jobs ADD COLUMN model_deleted_at INTEGER"],
    # the Evals API (serve/evals.py, serve/eval_runner.py): an eval's config and criteria as sent (JSON); a
    # run's counts are kept up to date with its output items (written together, see add_output_item)
    3: [
        """CREATE TABLE evals (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, project TEXT NOT NULL,
            created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL, name TEXT NOT NULL, metadata TEXT,
            data_source_config TEXT NOT NULL, testing_criteria TEXT NOT NULL)""",
        "CREATE INDEX evals_project ON evals (project, seq)",
        """CREATE TABLE eval_runs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, eval_id TEXT NOT NULL,
            project TEXT NOT NULL, created_at INTEGER NOT NULL, name TEXT NOT NULL, model TEXT NOT NULL,
            status TEXT NOT NULL, data_source TEXT NOT NULL, metadata TEXT, error TEXT, report_url TEXT NOT NULL,
            result_counts TEXT NOT NULL, per_model_usage TEXT NOT NULL,
            per_testing_criteria_results TEXT NOT NULL, finished_at INTEGER)""",
        "CREATE INDEX eval_runs_eval ON eval_runs (eval_id, seq)",
        """CREATE TABLE eval_output_items (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, run_id TEXT NOT NULL,
            eval_id TEXT NOT NULL, created_at INTEGER NOT NULL, status TEXT NOT NULL,
            datasource_item_id INTEGER NOT NULL, datasource_item TEXT NOT NULL, results TEXT NOT NULL,
            sample TEXT NOT NULL, usage TEXT NOT NULL, UNIQUE (run_id, datasource_item_id))""",
        "CREATE INDEX eval_output_items_run ON eval_output_items (run_id, seq)",
    ],
    # API keys kept here (serve/keys.py: `tunekit keys`): a salted hash of each, never the key; and checkpoint
    # permissions (serve/permissions.py): `project_id` may use the fine-tuned model or checkpoint `checkpoint`
    # of `project`
    4: [
        """CREATE TABLE api_keys (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, project TEXT NOT NULL,
            created_at INTEGER NOT NULL, salt TEXT NOT NULL, hash TEXT NOT NULL, last4 TEXT NOT NULL,
            revoked_at INTEGER)""",
        """CREATE TABLE checkpoint_permissions (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, checkpoint TEXT NOT NULL,
            project TEXT NOT NULL, project_id TEXT NOT NULL, created_at INTEGER NOT NULL,
            UNIQUE (checkpoint, project_id))""",
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)
_JSON_COLUMNS = {"metadata", "integrations", "hyperparameters", "overrides", "result_files", "error", "data",
                 "metrics", "data_source_config", "testing_criteria", "data_source", "result_counts",
                 "per_model_usage", "per_testing_criteria_results", "datasource_item", "results", "sample", "usage"}
_ALNUM = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    """`prefix` + n random letters and digits (`file-`, `ftjob-`, `ftevent-`, `ftckpt_`)."""
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(n))


def now() -> int:
    return int(time.time())


class Store:
    """The database under `data_dir` (created and migrated on open)."""

    def __init__(self, data_dir: Path):
        self.dir = Path(data_dir).expanduser().absolute()  # job folders are handed to processes run elsewhere
        (self.dir / "blobs").mkdir(parents=True, exist_ok=True)
        (self.dir / "jobs").mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.dir / "tunekit.db", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed row survives a power cut
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self._db.execute("SELECT max(version) FROM schema_version").fetchone()
            current = row[0] or 0
            if current > SCHEMA_VERSION:
                raise RuntimeError(f"{self.dir / 'tunekit.db'} has schema version {current}; this tunekit knows "
                                   f"up to {SCHEMA_VERSION}: upgrade tunekit")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in MIGRATIONS[version]:
                        self._db.execute(statement)
                    self._db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- helpers

    def _rows(self, sql: str, args: Iterable = ()) -> list[dict]:
        with self._lock:
            return [_decode(r) for r in self._db.execute(sql, tuple(args)).fetchall()]

    def _one(self, sql: str, args: Iterable = ()) -> dict | None:
        rows = self._rows(sql, args)
        return rows[0] if rows else None

    def _exec(self, sql: str, args: Iterable = ()) -> int:
        with self._lock:
            return self._db.execute(sql, tuple(args)).rowcount

    def _insert(self, table: str, row: dict, *, ignore: bool = False) -> bool:
        cols = list(row)
        values = [json.dumps(v) if c in _JSON_COLUMNS and v is not None else v for c, v in row.items()]
        sql = (f"INSERT {'OR IGNORE ' if ignore else ''}INTO {table} ({', '.join(cols)}) "
               f"VALUES ({', '.join('?' * len(cols))})")
        return self._exec(sql, values) > 0

    def _update(self, table: str, id: str, fields: dict, *, when_status: Iterable[str] | None = None) -> bool:
        """Set `fields` on row `id`; with `when_status`, only if its status is one of those (returns whether)."""
        sets = ", ".join(f"{c} = ?" for c in fields)
        values = [json.dumps(v) if c in _JSON_COLUMNS and v is not None else v for c, v in fields.items()]
        sql = f"UPDATE {table} SET {sets} WHERE id = ?"
        args = [*values, id]
        if when_status is not None:
            statuses = list(when_status)
            sql += f" AND status IN ({', '.join('?' * len(statuses))})"
            args += statuses
        return self._exec(sql, args) > 0

    # ---- file contents

    def blob_path(self, sha256: str) -> Path:
        return self.dir / "blobs" / sha256

    def put_blob(self, source: Path) -> tuple[str, int]:
        """Move the finished upload at `source` (a temporary file under DATA_DIR) into the blob store:
        (sha256, bytes). The content is fsynced and renamed into place, so a blob is whole or absent."""
        digest, size = hashlib.sha256(), 0
        with open(source, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            os.fsync(fh.fileno())
        sha = digest.hexdigest()
        os.replace(source, self.blob_path(sha))
        fsync_dir(self.dir / "blobs")
        return sha, size

    def upload_tmp(self) -> Path:
        """A fresh temporary path on the blob store's file system (for `put_blob`)."""
        return self.dir / "blobs" / f".tmp-{secrets.token_hex(8)}"

    # ---- files

    def add_file(self, row: dict) -> None:
        self._insert("files", row)

    def file(self, project: str, id: str) -> dict | None:
        return self._one("SELECT * FROM files WHERE project = ? AND id = ?", (project, id))

    def files(self, project: str, *, purpose: str | None = None, ascending: bool = False) -> list[dict]:
        sql = "SELECT * FROM files WHERE project = ?" + (" AND purpose = ?" if purpose is not None else "")
        order = "ASC" if ascending else "DESC"
        return self._rows(f"{sql} ORDER BY seq {order}", (project, purpose) if purpose is not None else (project,))

    def set_file(self, id: str, **fields) -> None:
        self._update("files", id, fields)

    def delete_file(self, project: str, id: str) -> bool:
        """Remove the row; the content goes too when no other file has the same bytes."""
        row = self.file(project, id)
        if row is None:
            return False
        with self._lock:
            self._exec("DELETE FROM files WHERE id = ?", (id,))
            if self._one("SELECT 1 FROM files WHERE sha256 = ?", (row["sha256"],)) is None:
                self.blob_path(row["sha256"]).unlink(missing_ok=True)
        return True

    # ---- jobs

    def add_job(self, row: dict) -> None:
        self._insert("jobs", row)

    def job(self, project: str | None, id: str) -> dict | None:
        if project is None:  # the worker: every project
            return self._one("SELECT * FROM jobs WHERE id = ?", (id,))
        return self._one("SELECT * FROM jobs WHERE project = ? AND id = ?", (project, id))

    def jobs(self, project: str | None = None, *, status: Iterable[str] | None = None,
             ascending: bool = False) -> list[dict]:
        where, args = [], []
        if project is not None:
            where.append("project = ?")
            args.append(project)
        if status is not None:
            statuses = list(status)
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args += statuses
        sql = "SELECT * FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
        return self._rows(f"{sql} ORDER BY seq {'ASC' if ascending else 'DESC'}", args)

    def job_by_model(self, name: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE fine_tuned_model = ?", (name,))

    def set_job(self, id: str, *, when_status: Iterable[str] | None = None, **fields) -> bool:
        return self._update("jobs", id, fields, when_status=when_status)

    # ---- events

    def add_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                  data: dict | None = None, key: str | None = None, created_at: int | None = None) -> bool:
        """Append an event; one with a `key` already used for this job is not added again (returns False)."""
        return self._insert("events", {
            "id": new_id("ftevent-"), "job_id": job_id, "created_at": created_at or now(), "level": level,
            "message": message, "type": type, "data": data, "key": key}, ignore=key is not None)

    def events(self, job_id: str) -> list[dict]:
        """Newest first."""
        return self._rows("SELECT * FROM events WHERE job_id = ? ORDER BY seq DESC", (job_id,))

    # ---- checkpoints

    def add_checkpoint(self, job_id: str, step: int, metrics: dict, path: Path) -> bool:
        return self._insert("checkpoints", {
            "id": new_id("ftckpt_"), "job_id": job_id, "created_at": now(), "step": step, "metrics": metrics,
            "path": str(path)}, ignore=True)

    def checkpoints(self, job_id: str) -> list[dict]:
        """Highest step first."""
        return self._rows("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY step DESC", (job_id,))

    def drop_checkpoint(self, id: str) -> None:
        self._exec("DELETE FROM checkpoints WHERE id = ?", (id,))

    # ---- evals, their runs and output items (oldest first: the Evals API lists ascending by default)

    def add_eval(self, row: dict) -> None:
        self._insert("evals", row)

    def eval(self, project: str, id: str) -> dict | None:
        return self._one("SELECT * FROM evals WHERE project = ? AND id = ?", (project, id))

    def evals(self, project: str) -> list[dict]:
        return self._rows("SELECT * FROM evals WHERE project = ? ORDER BY seq", (project,))

    def set_eval(self, id: str, **fields) -> None:
        self._update("evals", id, fields)

    def delete_eval(self, id: str) -> None:
        """The eval, its runs and their output items, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM eval_output_items WHERE eval_id = ?", (id,))
                self._db.execute("DELETE FROM eval_runs WHERE eval_id = ?", (id,))
                self._db.execute("DELETE FROM evals WHERE id = ?", (id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def add_eval_run(self, row: dict) -> None:
        self._insert("eval_runs", row)

    def eval_run(self, project: str, eval_id: str, id: str) -> dict | None:
        return self._one("SELECT * FROM eval_runs WHERE project = ? AND eval_id = ? AND id = ?",
                         (project, eval_id, id))

    def eval_runs(self, eval_id: str | None = None, *, status: Iterable[str] | None = None) -> list[dict]:
        where, args = [], []
        if eval_id is not None:
            where.append("eval_id = ?")
            args.append(eval_id)
        if status is not None:
            statuses = list(status)
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args += statuses
        sql = "SELECT * FROM eval_runs" + (f" WHERE {' AND '.join(where)}" if where else "")
        return self._rows(f"{sql} ORDER BY seq", args)

    def set_eval_run(self, id: str, *, when_status: Iterable[str] | None = None, **fields) -> bool:
        return self._update("eval_runs", id, fields, when_status=when_status)

    def delete_eval_run(self, id: str) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM eval_output_items WHERE run_id = ?", (id,))
                self._db.execute("DELETE FROM eval_runs WHERE id = ?", (id,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def add_output_item(self, row: dict, run_fields: dict) -> bool:
        """Insert an output item and set `run_fields` (its run's counts with this item) in one transaction,
        only while the run is `in_progress`; an item already written for that row is not added again.
        Returns whether the item was written."""
        cols = list(row)
        values = [json.dumps(v) if c in _JSON_COLUMNS and v is not None else v for c, v in row.items()]
        sets = ", ".join(f"{c} = ?" for c in run_fields)
        run_values = [json.dumps(v) if c in _JSON_COLUMNS and v is not None else v for c, v in run_fields.items()]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                changed = self._db.execute(f"UPDATE eval_runs SET {sets} WHERE id = ? AND status = 'in_progress'",
                                           (*run_values, row["run_id"])).rowcount
                added = changed and self._db.execute(
                    f"INSERT OR IGNORE INTO eval_output_items ({', '.join(cols)}) "
                    f"VALUES ({', '.join('?' * len(cols))})", values).rowcount
                self._db.execute("COMMIT" if added else "ROLLBACK")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return bool(added)

    def output_item(self, run_id: str, id: str) -> dict | None:
        return self._one("SELECT * FROM eval_output_items WHERE run_id = ? AND id = ?", (run_id, id))

    def output_items(self, run_id: str, *, status: str | None = None) -> list[dict]:
        """In row order."""
        sql = "SELECT * FROM eval_output_items WHERE run_id = ?" + (" AND status = ?" if status else "")
        return self._rows(sql + " ORDER BY datasource_item_id", (run_id, status) if status else (run_id,))

    # ---- API keys (serve/keys.py makes and checks them; only their salted hashes are here)

    def add_key(self, row: dict) -> None:
        self._insert("api_keys", row)

    def key(self, id: str) -> dict | None:
        return self._one("SELECT * FROM api_keys WHERE id = ?", (id,))

    def keys(self) -> list[dict]:
        """Oldest first."""
        return self._rows("SELECT * FROM api_keys ORDER BY seq")

    def has_keys(self) -> bool:
        """Whether any key was ever made here (revoked ones count: revoking the last key must not open the
        server to requests without one)."""
        return self._one("SELECT 1 AS x FROM api_keys LIMIT 1") is not None

    def revoke_key(self, id: str) -> bool:
        """Mark key `id` revoked; False when there is no such key or it was revoked already."""
        return self._exec("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now(), id)) > 0

    # ---- checkpoint permissions (oldest first)

    def add_permissions(self, rows: list[dict]) -> None:
        """All of them or, when one is there already (UNIQUE checkpoint, project_id), none."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    self._db.execute(f"INSERT INTO checkpoint_permissions ({', '.join(row)}) "
                                     f"VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def permissions(self, checkpoint: str) -> list[dict]:
        return self._rows("SELECT * FROM checkpoint_permissions WHERE checkpoint = ? ORDER BY seq", (checkpoint,))

    def delete_permission(self, checkpoint: str, id: str) -> bool:
        return self._exec("DELETE FROM checkpoint_permissions WHERE checkpoint = ? AND id = ?", (checkpoint, id)) > 0

    def shared_models(self) -> dict[str, frozenset[str]]:
        """project -> the fine-tuned models and checkpoints of other projects it was given permission to use."""
        out: dict[str, set[str]] = {}
        for row in self._rows("SELECT checkpoint, project_id FROM checkpoint_permissions"):
            out.setdefault(row["project_id"], set()).add(row["checkpoint"])
        return {project: frozenset(names) for project, names in out.items()}


def stored_keys_exist(data_dir: Path) -> bool:
    """Whether DATA_DIR's database holds API keys, read without creating or migrating anything (the check
    before a server binds a non-loopback address)."""
    path = Path(data_dir).expanduser() / "tunekit.db"
    if not path.is_file():
        return False
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'api_keys'").fetchone() is None:
            return False
        return db.execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None
    finally:
        db.close()


def _decode(row: sqlite3.Row) -> dict:
    out = dict(row)
    for key in _JSON_COLUMNS & out.keys():
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return out


def page(rows: list[dict], after: str | None, limit: int) -> tuple[list[dict], bool]:
    """(rows after the row with id `after`, at most `limit`; whether more follow). `rows` are in list order.

    An `after` that names no row gives an empty page (never the first page again: a client following
    cursors must not loop)."""
    if after is not None:
        index = next((i for i, r in enumerate(rows) if r["id"] == after), None)
        rows = [] if index is None else rows[index + 1:]
    return rows[:limit], len(rows) > limit
