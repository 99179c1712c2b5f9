"""Go's text/template (the engine Ollama renders TEMPLATEs with), for tests: tests/gotemplate/render.go, built
once per session with the `go` toolchain. Where `go` is absent the tests that need it skip with the reason,
except under CI (CI=true), where they fail: .ci/run installs Debian's golang-go.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import pytest

SOURCE = Path(__file__).parent / "gotemplate" / "render.go"


@cache
def _binary() -> str:
    go = shutil.which("go")
    if go is None:
        reason = "no Go toolchain (`go`) to run Ollama's template engine: install it with `apt-get install -y golang-go`"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: .ci/run installs it)")
        pytest.skip(reason)
    build_dir = tempfile.mkdtemp(prefix="tunekit-go-")
    atexit.register(shutil.rmtree, build_dir, True)
    out = Path(build_dir) / "render"
    env = {**os.environ, "GOCACHE": str(Path(build_dir) / "gocache"), "GOPATH": str(Path(build_dir) / "gopath"),
           "GO111MODULE": "off", "GOFLAGS": ""}
    subprocess.run([go, "build", "-o", str(out), str(SOURCE)], check=True, env=env, capture_output=True)
    return str(out)


def go_render(template: str, datas: list[dict]) -> list[str]:
    """Each `data` rendered with `template` by Go's text/template; a Go error fails the test with its message."""
    jobs = [{"template": template, "data": d} for d in datas]
    done = subprocess.run([_binary()], input=json.dumps(jobs), capture_output=True, text=True,
                          check=True)
    results = json.loads(done.stdout)
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, errors[0]
    return [r["text"] for r in results]


def ollama_data(messages: list[dict], system: str | None = None) -> dict:
    """What Ollama executes a TEMPLATE with: .Messages (Role, Content), the Modelfile SYSTEM as the first message
    when the conversation has no system message."""
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    if system is not None and not any(m["Role"] == "system" for m in msgs):
        msgs.insert(0, {"Role": "system", "Content": system})
    return {"Messages": msgs}
