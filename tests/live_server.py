"""A live `tunekit serve` app for tests: uvicorn in a thread on a free 127.0.0.1 port (the server the openai
SDK talks to in test_serve, test_finetune and the function-calling example's test), and free ports for
other servers (torchrun's rendezvous)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(**settings):
    """(uvicorn server, its thread, base_url, app): `create_app(ServeSettings(**settings))` running in a thread
    on 127.0.0.1 (cpu unless `device` is given)."""
    import uvicorn

    from tunekit.serve.app import ServeSettings, create_app

    port = free_port()
    app = create_app(ServeSettings(**{"device": "cpu", **settings, "port": port}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}/v1", app


@contextmanager
def serving(**settings):
    """(base_url, app) of a server running in a thread on 127.0.0.1; stopped on exit."""
    server, thread, url, app = start(**settings)
    try:
        yield url, app
    finally:
        server.should_exit = True
        thread.join(30)
