"""`/v1/files`: upload, list, retrieve, delete, content (OpenAI's Files API).

An upload is streamed to a temporary file under the data dir, refused past `max_upload_bytes`, and stored
by the SHA-256 of its content (`Store.put_blob`); the client's file name is metadata only. A `fine-tune`
file is checked at once with `tunekit.data.check_file` (a leading UTF-8 BOM is accepted): its status becomes
`processed`, or `error` with `status_details` naming the first problems (line, field, fix).
"""

from __future__ import annotations

import asyncio
import codecs
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel

from tunekit.serve.errors import APIError
from tunekit.serve.store import Store, new_id, now, page, project_of

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


def store_of(request: Request) -> Store:
    store = request.app.state.store
    if store is None:
        raise APIError(400, "this server keeps no files or jobs: start it with --data-dir DIR",
                       code="no_data_dir")
    return store


def find_file(request: Request, file_id: str, param: str = "file_id", status: int = 404) -> dict:
    """The project's file `file_id`; 404 (or `status`: 400 when a request body names it) naming `param`."""
    row = store_of(request).file(project_of(request), file_id)
    if row is None:
        raise APIError(status, f"No such File object: {file_id}", param=param,
                       code="file_not_found" if status == 400 else None)
    return row


def check_fine_tune_file(path) -> tuple[str, str | None, int]:
    """(status, status_details, valid examples) of an uploaded fine-tune file."""
    from tunekit.data.check import check_file
    from tunekit.errors import TunekitError

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
