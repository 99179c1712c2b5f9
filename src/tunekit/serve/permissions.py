"""`/v1/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions`: create, list, delete.

A permission lets another project use a fine-tuned model or checkpoint (`ft:...` or `ft:...:ckpt-step-N`, the
name exactly: a permission for the model does not cover its checkpoints): chat with it, list it in /v1/models,
train a job from it, sample from it in an eval (deps.visible_models). Only the model's own project manages
its permissions; a `project_id` is a tunekit project name (the `PROJECT` of a key), as OpenAI's is a `proj_` id.

Errors: a name that is not a fine-tuned model served here, or that is another project's and not shared with the
caller, is a 404 (another project's object does not exist for a request); one shared with the caller but not
its own is a 403 (it may use it, not share it further or see who else may); a project given twice, one that
has the permission already, or the model's own project is a 400 naming `project_ids[i]` (not a 409, which the
SDK retries); an unknown permission id is a 404.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from tunekit.serve.deps import project_of, store_of, visible_models
from tunekit.serve.errors import APIError
from tunekit.serve.keys import PROJECT
from tunekit.serve.store import new_id, now, page

router = APIRouter()

PATH = "/v1/fine_tuning/checkpoints/{fine_tuned_model_checkpoint:path}/permissions"


class CreatePermissions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project_ids: Annotated[list[str], Field(min_length=1, max_length=100)]


class Permission(BaseModel):
    id: str
    object: Literal["checkpoint.permission"] = "checkpoint.permission"
    created_at: int
    project_id: str


class PermissionPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[Permission]
    first_id: str | None
    last_id: str | None
    has_more: bool


class PermissionDeleted(BaseModel):
    id: str
    object: Literal["checkpoint.permission"] = "checkpoint.permission"
    deleted: bool


def _owned(request: Request, name: str) -> str:
    """The request's project, when it owns the served fine-tuned model or checkpoint `name`; else 404 or 403."""
    state, project = request.app.state, project_of(request)
    store_of(request)  # 400 without a data dir: there are no fine-tuned models then
    owner = state.model_owner.get(name)
    if owner is None or (owner != project and name not in visible_models(state, project)):
        raise APIError(404, f"No fine-tuned model or checkpoint {name!r} is served to this project",
                       param="fine_tuned_model_checkpoint", code="model_not_found",
                       hint="give a `fine_tuned_model` of a job or a `fine_tuned_model_checkpoint` of its "
                            "checkpoints")
    if owner != project:
        raise APIError(403, f"{name!r} belongs to another project, which shared it with this one: only its own "
                            "project can give or list permissions for it", param="fine_tuned_model_checkpoint",
                       code="permission_denied")
    return project


def _json(row: dict) -> dict:
    return {"id": row["id"], "object": "checkpoint.permission", "created_at": row["created_at"],
            "project_id": row["project_id"]}


def _page(rows: list[dict], more: bool) -> dict:
    data = [_json(r) for r in rows]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


def _refresh(request: Request) -> None:
    """Give the app's model visibility (deps.visible_models) the store's permissions."""
    request.app.state.shared_with = store_of(request).shared_models()


@router.post(PATH, response_model=PermissionPage)
def create_permissions(request: Request, fine_tuned_model_checkpoint: str, body: CreatePermissions) -> dict:
    name = fine_tuned_model_checkpoint
    owner = _owned(request, name)
    store = store_of(request)
    have = {r["project_id"] for r in store.permissions(name)}
    for i, project_id in enumerate(body.project_ids):
        where = f"project_ids[{i}]"
        problem = ("is not a project name (1-64 letters, digits, '.', '_' or '-')" if not PROJECT.fullmatch(project_id)
                   else "owns the model already" if project_id == owner
                   else "has this permission already" if project_id in have
                   else "is given twice" if project_id in body.project_ids[:i] else None)
        if problem is not None:
            raise APIError(400, f"{where}: {project_id!r} {problem}", param=where, code="invalid_project_id")
    created = now()
    rows = [{"id": new_id("cp_"), "checkpoint": name, "project": owner, "project_id": p, "created_at": created}
            for p in body.project_ids]
    store.add_permissions(rows)
    _refresh(request)
    return _page(rows, False)


@router.get(PATH, response_model=PermissionPage)
def list_permissions(request: Request, fine_tuned_model_checkpoint: str, project_id: str | None = None,
                     after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 10,
                     order: Literal["ascending", "descending"] = "descending") -> dict:
    _owned(request, fine_tuned_model_checkpoint)
    rows = store_of(request).permissions(fine_tuned_model_checkpoint)  # oldest first
    if project_id is not None:
        rows = [r for r in rows if r["project_id"] == project_id]
    rows, more = page(rows if order == "ascending" else rows[::-1], after, limit)
    return _page(rows, more)


@router.delete(PATH + "/{permission_id}", response_model=PermissionDeleted)
def delete_permission(request: Request, fine_tuned_model_checkpoint: str, permission_id: str) -> dict:
    _owned(request, fine_tuned_model_checkpoint)
    if not store_of(request).delete_permission(fine_tuned_model_checkpoint, permission_id):
        raise APIError(404, f"No permission {permission_id!r} for {fine_tuned_model_checkpoint!r}",
                       param="permission_id", code="not_found")
    _refresh(request)
    return {"id": permission_id, "object": "checkpoint.permission", "deleted": True}
