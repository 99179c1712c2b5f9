"""The server as a library: `create_app(settings)` loads the models and returns the FastAPI app.

    from tunekit.serve.app import ServeSettings, create_app
    app = create_app(ServeSettings(models=["tiny=models/tiny-chat"]))
    uvicorn.run(app, host="127.0.0.1", port=8000)

The dashboard (ui/) is served at `/`: static pages that call the same `/v1` API.

Around every request (`_Guard`, a plain ASGI middleware so it also sees streamed replies end): API keys on `/v1` (when
any are configured; each key belongs to a project: `PROJECT:KEY`, or a key made by `tunekit keys create` in the
data dir's database, read on each request: keys.py), the request-body size limit, and one log line (method,
path, status, latency, tokens).

With `data_dir`, the app also serves OpenAI's Files and fine-tuning API (files.py, jobs.py): state in a SQLite
store (store.py), jobs trained by `workers` subprocesses at a time (worker.py), fine-tuned models served here
as soon as they are trained, visible to their project only; and the Evals API (evals.py, runs executed by
eval_runner.py). The grader endpoints (graders.py) need no data dir; Python graders run in one sandbox per app.
Checkpoint permissions (permissions.py) let a project use another project's fine-tuned model or checkpoint.
Azure OpenAI's client works unchanged (azure.py): its `/openai/...` paths, `api-version` and `api-key` header
are mapped onto the same `/v1` routes, and its deployments are names for served models.
Errors of any kind leave in OpenAI's shape (`errors.APIError`); a bug gives a 500 with its message, logged
with its traceback.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from tunekit.errors import Problem, TunekitError
from tunekit.generate.engine import Engine
from tunekit.generate.models import Served, load_models, parse_model_arg
from tunekit.serve.azure import AzurePaths, Deployments
from tunekit.serve.azure import router as azure_router
from tunekit.serve.chat import router as chat_router
from tunekit.serve.errors import APIError
from tunekit.serve.evals import router as evals_router
from tunekit.serve.files import router as files_router
from tunekit.serve.graders import router as graders_router
from tunekit.serve.jobs import router as jobs_router
from tunekit.serve.keys import StoredKeys
from tunekit.serve.permissions import router as permissions_router
from tunekit.serve.store import DEFAULT_PROJECT, Store, stored_keys_exist
from tunekit.serve.ui import add_dashboard

log = logging.getLogger("tunekit.serve")


class ServeSettings(BaseModel):
    """Everything `tunekit serve` takes; defaults are the command's."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=list)  # MODEL arguments: dir, hub id, run dir or NAME=PATH
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # KEY or PROJECT:KEY (a KEY alone belongs to the project "default"); beside the keys of the data dir's
    # database (`tunekit keys`, keys.py). None of either: loopback only, any bearer accepted, everything in the
    # project "local"
    api_keys: list[str] = Field(default_factory=list)
    data_dir: Path | None = None  # files, fine-tuning jobs and their runs (None: no /v1/files, /v1/fine_tuning)
    workers: int = Field(1, ge=1)  # fine-tuning jobs trained at once, each in its own process
    # processes each fine-tuning job trains on (`tunekit train --nproc`: one per GPU; DDP for LoRA, FSDP2 for full)
    train_processes: int = Field(1, ge=1)
    max_upload_bytes: int = Field(512 * 2**20, ge=1024)  # one uploaded file (OpenAI's limit: 512 MB)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_adapters: int = Field(4, ge=1)  # adapters kept attached per base; the least recently used go
    # requests arriving this close together start as one batch (later ones join the running batch between steps)
    batch_window_ms: float = Field(2.0, ge=0)
    max_batch: int = Field(32, ge=1)  # rows (choices) per batch
    # keys and values of earlier prompts kept for prompts that start the same way (0: none)
    prefix_cache_mib: int = Field(256, ge=0)
    max_body_bytes: int = Field(4 * 2**20, ge=1024)
    # torch CPU threads while serving; None: all cores but one, which the HTTP side needs (on a 2-core
    # machine 2 torch threads made single requests ~5x slower than 1: docs/benchmarks.md)
    threads: int | None = Field(None, ge=1)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        """Made absolute when the settings are made (at start-up, against the folder the server was started
        from): job folders, their configs and the worker's processes then name the same files from anywhere."""
        return None if value is None else value.expanduser().absolute()


def parse_key(text: str) -> tuple[bytes, str]:
    """`PROJECT:KEY` -> (KEY, PROJECT); a key without a colon belongs to the project "default"."""
    project, sep, key = text.partition(":")
    return (key.encode(), project) if sep and project and key else (text.encode(), "default")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: ServeSettings) -> None:
    """Refuse to listen beyond this machine without an API key (given, or in the data dir's database)."""
    if settings.api_keys or is_loopback(settings.host):
        return
    if settings.data_dir is not None and stored_keys_exist(settings.data_dir):
        return
    raise TunekitError(Problem(
        "--host", f"{settings.host} is reachable from other machines and no API key is set",
        "pass --api-key KEY (or set TUNEKIT_API_KEYS=KEY1,KEY2), make one with `tunekit keys create --project P "
        "--data-dir DIR` and serve with that --data-dir, or bind 127.0.0.1"))


def create_app(settings: ServeSettings, models: dict[str, Served] | None = None) -> FastAPI:
    """The app; `models` (from `inference.load_models`) are loaded from `settings.models` when not given.

    Local model paths in `settings.models` are read against the working directory, once, here."""
    from tunekit.model import resolve_device

    check_exposure(settings)
    device = resolve_device(settings.device)
    if models is None:
        models = load_models([parse_model_arg(m) for m in settings.models], device)
    engine = Engine(window_s=settings.batch_window_ms / 1000.0, max_batch=settings.max_batch,
                    max_adapters=settings.max_adapters, prefix_cache_bytes=settings.prefix_cache_mib * 2**20)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import os

        import torch

        from tunekit.eval.graders import PythonSandbox

        torch.set_num_threads(settings.threads or max(1, (os.cpu_count() or 2) - 1))
        engine.start()
        app.state.sandbox = PythonSandbox(workers=2)  # python graders: graders/run and eval criteria
        if worker is not None:
            worker.start()  # serves the fine-tuned models first: eval runs may sample from them
            app.state.eval_runner.start()
        try:
            yield
        finally:
            if worker is not None:
                app.state.eval_runner.stop()  # before the engine and the store: it writes what it generated
                worker.stop()
                app.state.store.close()
            app.state.sandbox.close()
            engine.stop()

    app = FastAPI(title="tunekit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.settings, app.state.models, app.state.engine = settings, models, engine
    app.state.device, app.state.model_owner = device, {}  # model_owner: fine-tuned model -> its project
    app.state.store = Store(settings.data_dir) if settings.data_dir is not None else None
    # project -> other projects' fine-tuned models it may use (permissions.py keeps this in step with the store)
    app.state.shared_with = app.state.store.shared_models() if app.state.store is not None else {}
    worker = app.state.eval_runner = app.state.sandbox = None
    if app.state.store is not None:
        from tunekit.serve.eval_runner import EvalRunner
        from tunekit.serve.worker import Worker

        worker = Worker(app.state, workers=settings.workers, processes=settings.train_processes)
        app.state.eval_runner = EvalRunner(app.state)
    app.state.worker = worker
    # Azure deployments: names for served models (azure.py), kept under the data dir when there is one
    app.state.deployments = Deployments(settings.data_dir / "deployments.json" if settings.data_dir else None)
    app.include_router(chat_router)
    app.include_router(azure_router)
    app.include_router(files_router)
    app.include_router(jobs_router)
    app.include_router(permissions_router)
    app.include_router(graders_router)
    app.include_router(evals_router)
    add_dashboard(app)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "models": list(models)}

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return api_error_response(APIError.from_validation(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        limit = request.scope.get("state", {}).get("too_large")
        if limit is not None:  # the body passed the size limit while a multipart form was parsed
            return api_error_response(APIError(413, f"the request body is larger than {limit} bytes",
                                               code="request_too_large"))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return api_error_response(APIError(exc.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return api_error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                           type="server_error", code="server_error"))

    app.add_middleware(_Guard, settings=settings,
                       stored=StoredKeys(app.state.store) if app.state.store is not None else None)
    app.add_middleware(AzurePaths)  # outermost: Azure's /openai/... paths become /v1/... before the guard
    return app


def api_error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class _Guard:
    """ASGI middleware: API keys on /v1, body size limit, one log line per request."""

    def __init__(self, app, settings: ServeSettings, stored: StoredKeys | None = None):
        self.app, self.settings, self.stored = app, settings, stored
        self.keys = [parse_key(k) for k in settings.api_keys]  # (key bytes, project)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        began = time.perf_counter()
        status = {"code": 0}
        state = scope.setdefault("state", {})

        def log_line(note: str = "") -> None:
            status["logged"] = True
            tokens = state.get("tokens")
            log.info("%s %s %d %.0fms%s%s", scope["method"], scope["path"], status["code"],
                     (time.perf_counter() - began) * 1000, f" tokens={tokens}" if tokens is not None else "", note)

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log_line()  # before the last bytes go, so a client never sees the line late
            await send(message)

        headers = dict(scope.get("headers") or [])
        error = await self._refusal(scope, headers)
        if error is not None:
            return await self._reply(error, logged_send)

        limit, seen = self._limit(scope), {"bytes": 0}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > limit:
                    state["too_large"] = limit  # a form parser turns the error into a 400: see http_error
                    raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
            return message

        try:
            await self.app(scope, limited_receive, logged_send)
        finally:
            if not status.get("logged"):
                log_line(" (ended early: the client went away or the server stopped)")

    def _limit(self, scope) -> int:
        """Bytes a request body may have: uploads get max_upload_bytes (plus room for the multipart framing)."""
        if scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/files":
            return self.settings.max_upload_bytes + 2**16
        return self.settings.max_body_bytes

    async def _refusal(self, scope, headers: dict) -> APIError | None:
        scope["state"]["project"] = DEFAULT_PROJECT
        if scope["path"].startswith("/v1"):
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            project = None
            for key, owner in self.keys:  # every key compared: the time taken does not tell which matched
                if hmac.compare_digest(token, key):
                    project = owner
            stored = None
            if project is None and self.stored is not None:  # the database, off the event loop
                stored = await anyio.to_thread.run_sync(self.stored.check, token.decode("latin-1"))
                project = stored.project
            if project is None and stored is not None and stored.revoked:
                return APIError(401, f"The API key {stored.revoked} was revoked: use another key",
                                code="invalid_api_key")
            if project is None and (self.keys or (stored is not None and stored.required)):
                return APIError(401, "Incorrect or missing API key: send Authorization: Bearer KEY with one of "
                                     "the server's keys", code="invalid_api_key")
            scope["state"]["project"] = project or DEFAULT_PROJECT
        length = headers.get(b"content-length")
        limit = self._limit(scope)
        if length is not None and length.isdigit() and int(length) > limit:
            return APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        return None

    @staticmethod
    async def _reply(error: APIError, send) -> None:
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
