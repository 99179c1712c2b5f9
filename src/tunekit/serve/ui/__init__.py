"""The dashboard: a page at `/` and its static files at `/ui/`, calling the same REST API as any client.

Plain HTML, CSS and JavaScript shipped as package data (no build step, nothing fetched from outside the
server: no CDN, no web fonts). The pages (Data, Jobs, Playground, Compare) are views of `/v1`: the OpenAI
endpoints plus two tunekit extensions for data files (`GET /v1/files/{id}/check` and `.../preview`, in
files.py). The page itself needs no key; on a server with API keys the browser asks for one on the first
401 and keeps it in sessionStorage.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def add_dashboard(app: FastAPI) -> None:
    """Serve the dashboard's page at `/` and its assets at `/ui/`."""

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    app.mount("/ui", StaticFiles(directory=STATIC), name="ui")
