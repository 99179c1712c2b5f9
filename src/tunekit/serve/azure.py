"""Azure OpenAI's client, unchanged: `AzureOpenAI(azure_endpoint="http://127.0.0.1:8000", api_key=..., api_version=...)`.

The `openai` SDK's Azure client sends the same requests as the plain one, under other paths and headers:

    /openai/files?api-version=V                                 -> /v1/files            (every other path alike)
    /openai/deployments/{deployment}/chat/completions?api-version=V -> /v1/chat/completions, model = the deployment
    /openai/v1/...  (Azure's newer v1 surface, plain `OpenAI(base_url=.../openai/v1/)`)   -> /v1/...
    header `api-key: KEY`                                        -> `Authorization: Bearer KEY`

`AzurePaths` (a plain ASGI middleware, outside the app's guard) rewrites the path before anything else sees it,
so the one set of routes serves both clients and the guard's API keys, projects and size limits apply unchanged.
`api-version` is required on `/openai/...` (not on `/openai/v1/...`), as Azure requires it: missing -> 404
"Resource not found", not a date from 2023-10-01 (Azure's first fine-tuning API version) on -> 400
"API version not supported". Any later date, `-preview` or not, is accepted.

Deployments: a deployment is a name for a served model. Every model a project may use (the server's own models
by name, its fine-tuned `ft:` models and checkpoints) is a deployment of the same name without any step.
Azure's "deploy the fine-tuned model" call (a PUT on the management API,
`/subscriptions/{s}/resourceGroups/{g}/providers/Microsoft.CognitiveServices/accounts/{a}/deployments/{name}`,
body `{"properties": {"model": {"name": MODEL}}}`) names a served model with a name of the caller's choosing:
sent to this server (same path, host changed) it is `PUT /v1/deployments/{name}`; also GET, DELETE, and GET
`/v1/deployments` to list. A deployment belongs to the project of the key that made it; with a data dir the
deployments are kept in DATA_DIR/deployments.json across restarts.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from tunekit.serve.errors import APIError

router = APIRouter()

FIRST_VERSION = "2023-10-01"  # Azure's first data-plane API version with fine-tuning (2023-10-01-preview)
_VERSION = re.compile(r"(\d{4}-\d{2}-\d{2})(-preview)?")
_MANAGEMENT = re.compile(r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.CognitiveServices/"
                         r"accounts/[^/]+/deployments(/[^/]+)?/?", re.IGNORECASE)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,63}")  # Azure's deployment names: 2-64 characters


def version_problem(query: bytes) -> APIError | None:
    """The error Azure answers for the request's `api-version` (None: accepted)."""
    values = parse_qs(query.decode("latin-1"), keep_blank_values=True).get("api-version")
    if not values:
        return APIError(404, "Resource not found: Azure OpenAI paths (/openai/...) need the api-version query "
                             "parameter", param="api-version", code="404",
                        hint="AzureOpenAI(api_version='2024-10-21') sends it; or use /openai/v1/ or /v1/")
    match = _VERSION.fullmatch(values[-1])
    if match is None or match.group(1) < FIRST_VERSION:
        return APIError(400, f"API version not supported: {values[-1]!r}", param="api-version", code="BadRequest",
                        hint=f"give a dated version from {FIRST_VERSION} on, e.g. 2024-10-21 or 2025-04-01-preview")
    return None


class AzurePaths:
    """ASGI middleware: Azure's paths and `api-key` header onto the app's `/v1` routes (module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        new = None
        state = scope.setdefault("state", {})
        if path.startswith("/openai/v1/") or path == "/openai/v1":
            new = path[len("/openai"):]
        elif path.startswith("/openai/"):
            error = version_problem(scope.get("query_string", b""))
            if error is not None:
                return await _reply(error, send)
            rest = path[len("/openai"):]
            parts = rest.split("/", 3)  # "", "deployments", NAME, REST
            if len(parts) == 4 and parts[1] == "deployments":
                state["deployment"] = parts[2]  # chat's model is the path's deployment, not the body's
                rest = "/" + parts[3]
            new = "/v1" + rest
        else:
            match = _MANAGEMENT.fullmatch(path)
            if match is not None:  # Azure's control plane, this host: the "deploy" step of Azure's tutorials
                state["azure_resource"] = path.rstrip("/")
                new = "/v1/deployments" + (match.group(1) or "")
        if new is None:
            return await self.app(scope, receive, send)
        headers = list(scope.get("headers") or [])
        names = {k.lower() for k, _ in headers}
        if b"authorization" not in names:
            headers += [(b"authorization", b"Bearer " + v) for k, v in headers if k.lower() == b"api-key"][:1]
        scope = {**scope, "path": new, "raw_path": new.encode(), "headers": headers}
        return await self.app(scope, receive, send)


async def _reply(error: APIError, send) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------------------------
# Deployments: names for served models, per project


class Deployments:
    """project -> {deployment name -> model name}; written to `path` (JSON) after every change when given."""

    def __init__(self, path: Path | None):
        self.path, self.lock = path, threading.Lock()
        self.names: dict[str, dict[str, str]] = {}
        if path is not None and path.exists():
            self.names = json.loads(path.read_text(encoding="utf-8"))

    def get(self, project: str, name: str) -> str | None:
        return self.names.get(project, {}).get(name)

    def of(self, project: str) -> dict[str, str]:
        return dict(self.names.get(project, {}))

    def set(self, project: str, name: str, model: str | None) -> None:
        with self.lock:
            mine = self.names.setdefault(project, {})
            if model is None:
                mine.pop(name, None)
            else:
                mine[name] = model
            if self.path is not None:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.names, indent=1), encoding="utf-8")
                tmp.replace(self.path)


def resolve(state, project: str, name: str, models: dict) -> str | None:
    """The served model `name` stands for in `project`: itself, or the model a deployment of that name names."""
    if name in models:
        return name
    deployments = getattr(state, "deployments", None)
    target = deployments.get(project, name) if deployments is not None else None
    return target if target in models else None


def deployment_not_found(name: str, project: str, state, models: dict) -> APIError:
    """Azure's 404 for a deployment that does not exist, naming the ones that do."""
    deployments = getattr(state, "deployments", None)
    made = deployments.of(project) if deployments is not None else {}
    target = made.get(name)
    if target is not None:
        return APIError(404, f"The API deployment {name!r} names the model {target!r}, which is no longer served",
                        code="DeploymentNotFound", hint=f"deploy a served model under {name!r} again")
    known = ", ".join(sorted(models) + sorted(made)) or "none"
    return APIError(404, f"The API deployment {name!r} does not exist (deployments: {known})",
                    code="DeploymentNotFound",
                    hint="every served model and ft: model is a deployment of its own name; "
                         "PUT .../deployments/NAME names one differently")


class _ModelRef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    format: str = "OpenAI"
    version: str = "1"


class _Properties(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: _ModelRef


class DeploymentBody(BaseModel):
    """Azure's management-API body: `{"sku": {...}, "properties": {"model": {"format", "name", "version"}}}`."""

    model_config = ConfigDict(extra="ignore")
    sku: dict = Field(default_factory=lambda: {"name": "standard", "capacity": 1})
    properties: _Properties


def _resource(request: Request, name: str, model: str) -> dict:
    """A deployment in Azure's management-API shape (what Azure's PUT/GET return)."""
    return {"id": request.scope.get("state", {}).get("azure_resource") or f"/v1/deployments/{name}", "name": name,
            "type": "Microsoft.CognitiveServices/accounts/deployments",
            "sku": {"name": "standard", "capacity": 1},
            "properties": {"model": {"format": "OpenAI", "name": model, "version": "1"},
                           "provisioningState": "Succeeded"}}


def _state(request: Request):
    from tunekit.serve.deps import project_of, visible_models

    project = project_of(request)
    return request.app.state.deployments, project, visible_models(request.app.state, project)


@router.get("/v1/deployments")
def list_deployments(request: Request) -> dict:
    deployments, project, _ = _state(request)
    return {"value": [_resource(request, n, m) for n, m in sorted(deployments.of(project).items())]}


@router.put("/v1/deployments/{name}")
def create_deployment(name: str, body: DeploymentBody, request: Request) -> dict:
    deployments, project, models = _state(request)
    if _NAME.fullmatch(name) is None:
        raise APIError(400, f"deployment name {name!r} is not 2-64 letters, digits, '.', '_' or '-'",
                       param="name", code="InvalidResourceName")
    if name in models:
        raise APIError(400, f"{name!r} is already a served model's name, and so a deployment of that model",
                       param="name", code="InvalidResourceName", hint="pick another deployment name")
    model = body.properties.model.name
    if resolve(request.app.state, project, model, models) != model:
        known = ", ".join(sorted(models)) or "none"
        raise APIError(400, f"The model {model!r} is not served here (served: {known})",
                       param="properties.model.name", code="DeploymentModelNotSupported")
    deployments.set(project, name, model)
    return _resource(request, name, model)


@router.get("/v1/deployments/{name}")
def get_deployment(name: str, request: Request) -> dict:
    deployments, project, models = _state(request)
    model = deployments.get(project, name)
    if model is None:
        raise deployment_not_found(name, project, request.app.state, models)
    return _resource(request, name, model)


@router.delete("/v1/deployments/{name}")
def delete_deployment(name: str, request: Request) -> dict:
    """Forget the name; the model stays served (as on Azure, where deleting a deployment keeps the model)."""
    deployments, project, models = _state(request)
    if deployments.get(project, name) is None:
        raise deployment_not_found(name, project, request.app.state, models)
    deployments.set(project, name, None)
    return {"id": name, "object": "deployment", "deleted": True}
