"""`/v1/files`: upload, list, retrieve, delete, content (OpenAI's Files API).

An upload is streamed to a temporary file under the data dir, refused past `max_upload_bytes`, and stored
by the SHA-256 of its content (`Store.put_blob`); the client's file name is metadata only. A `fine-tune`
file is checked at once with `tunekit.data.check_file` (a leading UTF-8 BOM is accepted): its status becomes
`processed`, or `error` with `status_details` naming the first problems (line, field, fix). A file whose first
record is a reinforcement prompt (chat messages ending with the user or developer turn the model answers, no
reply: OpenAI's RFT lines) is checked as a prompt file instead: every line must be such a prompt.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel

from tunekit.serve.deps import find_model, project_of, store_of
from tunekit.serve.errors import APIError
from tunekit.serve.store import new_id, now, page

router = APIRouter()
log = logging.getLogger("tunekit.serve")

UPLOAD_PURPOSES = ("fine-tune", "assistants", "batch", "vision", "user_data", "evals")
DETAIL_PROBLEMS = 3  # problems named in status_details


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


def file_json(row: dict) -> dict:
    return FileObject(id=row["id"], bytes=row["bytes"], created_at=row["created_at"], filename=row["filename"],
                      purpose=row["purpose"], status=row["status"],
                      status_details=row["status_details"]).model_dump()


def find_file(request: Request, file_id: str, param: str = "file_id", status: int = 404) -> dict:
    """The project's file `file_id`; 404 (or `status`: 400 when a request body names it) naming `param`."""
    row = store_of(request).file(project_of(request), file_id)
    if row is None:
        raise APIError(status, f"No such File object: {file_id}", param=param,
                       code="file_not_found" if status == 400 else None)
    return row


def first_format(path) -> tuple[int, str] | None:
    """(line, format) of a fine-tune file's first record tunekit recognises (chat, completion, text, preference,
    or reinforcement: a chat whose last message is the user or developer turn the model answers), None when it
    has none."""
    from tunekit.data.formats import detect_format, read_jsonl, reinforcement_problem
    from tunekit.errors import TunekitError

    try:
        for line in read_jsonl(path):
            fmt = detect_format(line.record)
            if fmt == "chat" and reinforcement_problem(line.record) is None:
                return line.number, "reinforcement"
            if fmt is not None:
                return line.number, fmt
    except (OSError, TunekitError):
        return None
    return None


def item_keys(path, lines: int = 100) -> set[str] | None:
    """The top-level keys that each of the first `lines` records of a prompt file has: the `{{item.KEY}}` a
    grader may read (None when the file has no JSON object in them)."""
    from tunekit.data.formats import read_jsonl
    from tunekit.errors import TunekitError

    keys: set[str] | None = None
    try:
        for line in read_jsonl(path):
            if line.number > lines:
                break
            if isinstance(line.record, dict):
                keys = set(line.record) if keys is None else keys & set(line.record)
    except (OSError, TunekitError):
        return None
    return keys


def _check_prompt_file(path) -> tuple[str, str | None, int]:
    """(status, status_details, prompts) of a reinforcement prompt file: each line a JSON object whose messages
    pass the chat rules (a missing assistant reply aside) and end with the turn the model answers."""
    from tunekit.data.formats import read_jsonl, reinforcement_problem, validate_record
    from tunekit.errors import TunekitError

    problems, prompts = [], 0
    try:
        for line in read_jsonl(path):
            if line.record is None:
                problems += [f"line {line.number}: {i.message}" for i in line.issues if i.severity == "error"]
                continue
            why = reinforcement_problem(line.record)
            issues = [i for i in validate_record(_developer_as_system(line.record), "chat")
                      if i.severity == "error" and i.code != "example_missing_assistant_message"]
            if why is not None:
                problems.append(f"line {line.number}: not a reinforcement prompt (the file's first line is one): "
                                f"{why}")
            problems += [f"line {line.number}{' ' + i.path if i.path else ''}: {i.message} ({i.code})"
                         for i in issues]
            prompts += why is None and not issues
    except TunekitError as exc:
        return "error", "; ".join(p.message for p in exc.problems), 0
    if not problems:
        return "processed", None, prompts
    more = f"; and {len(problems) - DETAIL_PROBLEMS} more" if len(problems) > DETAIL_PROBLEMS else ""
    return "error", f"{len(problems)} problem(s): {'; '.join(problems[:DETAIL_PROBLEMS])}{more}", prompts


def _developer_as_system(record):
    """A prompt with its developer turns as system turns (objective: grpo renders them so), for the chat rules."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return record
    return {**record, "messages": [{**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer"
                                   else m for m in record["messages"]]}


def check_fine_tune_file(path) -> tuple[str, str | None, int]:
    """(status, status_details, valid examples) of an uploaded fine-tune file (a prompt file: its prompts)."""
    from tunekit.data.check import check_file
    from tunekit.errors import TunekitError

    found = first_format(path)
    if found is not None and found[1] == "reinforcement":
        return _check_prompt_file(path)
    try:
        report = check_file(path, fmt="auto")
    except TunekitError as exc:
        return "error", "; ".join(p.message for p in exc.problems), 0
    except Exception as exc:  # a checker bug on odd content (e.g. a list as a role, before main's fa2eee1)
        log.exception("checking an uploaded file failed")
        return "error", f"the file could not be checked: {type(exc).__name__}: {exc}", 0
    errors = [p for p in report.problems if p.severity == "error"]
    if not errors:
        return "processed", None, report.examples
    named = "; ".join(f"line {p.line}{' ' + p.path if p.path else ''}: {p.message} ({p.code})"
                      if p.line is not None else f"{p.message} ({p.code})" for p in errors[:DETAIL_PROBLEMS])
    more = f"; and {report.errors - DETAIL_PROBLEMS} more" if report.errors > DETAIL_PROBLEMS else ""
    return "error", f"{report.errors} problem(s): {named}{more}", report.examples


@router.post("/v1/files", response_model=FileObject)
async def upload_file(request: Request, file: Annotated[UploadFile, File()],
                      purpose: Annotated[str, Form()]) -> dict:
    store = store_of(request)
    if purpose not in UPLOAD_PURPOSES:
        raise APIError(400, f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}; got {purpose!r}", param="purpose")
    limit = request.app.state.settings.max_upload_bytes
    tmp = store.upload_tmp()
    size, first = 0, True
    try:
        with open(tmp, "wb") as out:
            while chunk := await file.read(1 << 20):
                if first and chunk.startswith(codecs.BOM_UTF8):  # some tools write UTF-8 with a BOM
                    chunk = chunk[len(codecs.BOM_UTF8):]
                first = False
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"the file is larger than {limit} bytes", param="file",
                                   code="file_too_large")
                out.write(chunk)
        if size == 0:
            raise APIError(400, "the file is empty", param="file")
        sha, size = await asyncio.to_thread(store.put_blob, tmp)
    finally:
        tmp.unlink(missing_ok=True)
    status, details, examples = "processed", None, None
    if purpose == "fine-tune":
        status, details, examples = await asyncio.to_thread(check_fine_tune_file, store.blob_path(sha))
    name = (file.filename or "upload").replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload"
    row = {"id": new_id("file-"), "project": project_of(request), "created_at": now(), "bytes": size,
           "filename": name, "purpose": purpose, "status": status, "status_details": details, "sha256": sha,
           "examples": examples}
    store.add_file(row)
    return file_json(row)


@router.get("/v1/files", response_model=FileList)
def list_files(request: Request, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
               order: Literal["asc", "desc"] = "desc", purpose: str | None = None) -> dict:
    rows = store_of(request).files(project_of(request), purpose=purpose, ascending=order == "asc")
    rows, more = page(rows, after, limit)
    data = [file_json(r) for r in rows]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


@router.get("/v1/files/{file_id}", response_model=FileObject)
def retrieve_file(request: Request, file_id: str) -> dict:
    return file_json(find_file(request, file_id))


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
def delete_file(request: Request, file_id: str) -> dict:
    find_file(request, file_id)
    store_of(request).delete_file(project_of(request), file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/v1/files/{file_id}/content", response_class=Response)
def file_content(request: Request, file_id: str) -> Response:
    """The bytes as uploaded (result files: plain CSV / Markdown, not base64)."""
    row = find_file(request, file_id)
    path = store_of(request).blob_path(row["sha256"])
    media = "text/csv" if row["filename"].endswith(".csv") else "application/octet-stream"
    return FileResponse(path, media_type=media)  # streamed from disk


# --------------------------------------------------------------------------------------------------
# tunekit extensions (no OpenAI equivalent; the dashboard's Data page uses them)

PREVIEW_MAX = 20  # examples one preview request may ask for


def _tokenizer_of(request: Request, model: str | None):
    """The tokenizer of a served model visible to this project (None when no model is asked for)."""
    if model is None or model == "":
        return None
    return find_model(request, model).tokenizer


@router.get("/v1/files/{file_id}/check")
async def check_file_report(request: Request, file_id: str, model: str | None = None,
                            max_len: Annotated[int | None, Query(ge=1, le=10_000_000)] = None) -> dict:
    """tunekit extension: `tunekit data check --json` of an uploaded file (every problem with its line, JSON
    path and hint, counts per code, length statistics and the epoch estimate). With `model` (a served model)
    the statistics are in that model's tokens, rendered with its chat template exactly as training does."""
    row = find_file(request, file_id)
    tokenizer = _tokenizer_of(request, model)
    path = store_of(request).blob_path(row["sha256"])
    report = await asyncio.to_thread(_check_report, path, tokenizer, max_len)
    report["path"] = row["filename"]
    for problem in report["problems"]:
        problem["file"] = row["filename"]
    report["file_id"], report["model"] = file_id, model
    return report


def _check_report(path, tokenizer, max_len: int | None) -> dict:
    from tunekit.data.check import check_file
    from tunekit.errors import TunekitError

    # Rendered in this process (no process pool inside the server: the CLI's check renders on every core, which
    # costs a pool start-up that a dashboard click should not wait for), through the rendered-data cache: the
    # first report with a model writes the entry, later ones read it (keyed by contents and tokenizer, as
    # training looks it up).
    try:
        return check_file(path, tokenizer=tokenizer, max_len=max_len, num_workers=1).to_dict()
    except TunekitError as exc:  # the file cannot be opened at all
        raise APIError(400, "; ".join(p.message for p in exc.problems), param="file_id") from None


@router.get("/v1/files/{file_id}/preview")
async def preview_file(request: Request, file_id: str, model: str,
                       n: Annotated[int, Query(ge=1, le=PREVIEW_MAX)] = 3) -> dict:
    """tunekit extension: the first `n` valid examples rendered with `model`'s chat template, as runs of text
    that are trained or not, as `tunekit data preview` shows them: `{"data": [{"line", "tokens", "trained",
    "sequences": [[{"trained": bool, "text": str}, ...], ...]}], "skipped": invalid lines passed over}`; an
    example its template cannot render has `"error"` instead of sequences. A preference pair has two sequences
    (prompt + preferred reply, prompt + non-preferred reply) and `"titles"` naming them."""
    row = find_file(request, file_id)
    tokenizer = _tokenizer_of(request, model)
    path = store_of(request).blob_path(row["sha256"])
    return await asyncio.to_thread(_preview, path, tokenizer, n)


def _preview(path, tokenizer, n: int) -> dict:
    from tunekit.data.formats import read_jsonl, validate_in_file
    from tunekit.data.preference import pair_sequences, preference_form, render_pair
    from tunekit.data.preview import decoded_runs
    from tunekit.data.render import render_example
    from tunekit.errors import TunekitError

    data, skipped, fmt = [], 0, None
    for line in read_jsonl(path):
        if len(data) >= n:
            break
        if line.record is None:
            skipped += bool(line.issues)
            continue
        used, issues = validate_in_file(line.record, fmt)
        if any(i.severity == "error" for i in issues + line.issues):
            skipped += 1
            continue
        fmt = fmt or used
        item: dict = {"line": line.number}
        try:
            if preference_form(line.record):  # a pair: prompt + each reply, the replies' tokens trained
                sequences = list(pair_sequences(render_pair(line.record, tokenizer)))
                item["titles"] = ["preferred reply", "non-preferred reply"]
            else:
                sequences = render_example(line.record, tokenizer)
        except TunekitError as exc:
            item["error"] = "; ".join(p.message + (f" ({p.hint})" if p.hint else "") for p in exc.problems)
            data.append(item)
            continue
        item["sequences"] = [[{"trained": trained, "text": text} for trained, text in pieces]
                             for pieces in decoded_runs(sequences, tokenizer)]  # as `tunekit data preview`
        item["tokens"] = sum(len(s) for s in sequences)
        item["trained"] = sum(s.num_trained for s in sequences)
        data.append(item)
    return {"object": "list", "data": data, "skipped": skipped}
