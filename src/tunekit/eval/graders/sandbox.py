"""A pool of warm worker processes that run untrusted python graders (`grade(sample, item)`).

Each worker is a separate Python process (`_sandbox_worker.py`) with a memory limit, a per-call CPU-time
limit, no writable files, a small descriptor limit, an audit hook that refuses sockets, process creation
and file access outside Python's own library, an empty working directory, a minimal environment (none of the
server's variables or keys) and, where `unshare --net` works, no network interface at all. The parent
enforces the wall-clock timeout (it kills the worker and starts another) and caps each reply's size.
What this does and does not protect against: docs/security.md.
"""

from __future__ import annotations

import json
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("_sandbox_worker.py")
START_TIMEOUT_S = 30.0  # a cold start imports only the standard library: well under a second normally


class SandboxError(Exception):
    """A python grader failed. kind: "runtime" (the grader's code: it raised, returned a non-float, timed out,
    ran out of memory or CPU, printed too much, or did something the sandbox refuses) or "server" (the sandbox
    itself could not run it). reason: the finer cause ("exception", "return", "no_grade", "timeout", "memory",
    "cpu", "output", "crash", "protocol", "start"). details: a traceback or a sentence."""

    def __init__(self, kind: str, details: str, *, reason: str = ""):
        super().__init__(f"{kind} error ({reason}): {details}" if reason else f"{kind} error: {details}")
        self.kind = kind
        self.details = details
        self.reason = reason


_NETNS: bool | None = None


def network_namespace_available() -> bool:
    """True when `unshare --net` can start a process in an empty network namespace (root, or unprivileged
    user namespaces with --map-root-user). Probed once per process."""
    global _NETNS
    if _NETNS is None:
        _NETNS = False
        tool = shutil.which("unshare")
        if tool:
            try:
                _NETNS = subprocess.run([tool, *_unshare_args(), "true"], capture_output=True, timeout=10).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                _NETNS = False
    return _NETNS


def _unshare_args() -> list[str]:
    return ["--net"] if os.geteuid() == 0 else ["--net", "--map-root-user"]


@dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen
    ready: bool = False


class PythonSandbox:
    """Runs `grade(sample, item)` of a python grader's source in one of `workers` warm processes.

    Limits, per call: timeout_s of wall-clock time, cpu_s of CPU time (all threads), memory_mb of address
    space, max_output_bytes of printed output (past it the call fails). Thread-safe: run() waits for a free
    worker. A worker that timed out, crashed, ran out of memory or left threads behind is replaced.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, memory_mb: int = 2048, cpu_s: float = 10.0,
                 max_output_bytes: int = 1_000_000, network_namespace: bool | None = None):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.cpu_s = cpu_s
        self.max_output_bytes = max_output_bytes
        # "namespace": workers have no network interface; "audit-hook": sockets are refused in Python only.
        use_ns = network_namespace_available() if network_namespace is None else network_namespace
        self.network_isolation = "namespace" if use_ns else "audit-hook"
        self._home = tempfile.mkdtemp(prefix="tunekit-sandbox-")
        os.chmod(self._home, 0o500)  # read-and-enter only, and empty
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._all: set[_Worker] = set()
        self._closed = False
        for _ in range(workers):
            self._idle.put(self._start())

    def _start(self) -> _Worker:
        env = {"PATH": "/usr/bin:/bin", "HOME": self._home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cmd = [sys.executable, "-I", str(WORKER), str(self.memory_mb), str(self.cpu_s), str(self.max_output_bytes)]
        if self.network_isolation == "namespace":
            cmd = [shutil.which("unshare") or "unshare", *_unshare_args(), "--", *cmd]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                cwd=self._home, env=env, close_fds=True, start_new_session=True)
        worker = _Worker(proc)
        with self._lock:
            self._all.add(worker)
        return worker

    def _kill(self, worker: _Worker) -> None:
        try:
            os.killpg(worker.proc.pid, signal.SIGKILL)  # its own session: the worker and anything left of it
        except (ProcessLookupError, PermissionError):
            pass
        try:
            worker.proc.kill()
        except ProcessLookupError:
            pass
        for stream in (worker.proc.stdin, worker.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        worker.proc.wait()
        with self._lock:
            self._all.discard(worker)

    def _read_exact(self, worker: _Worker, size: int, deadline: float) -> bytes:
        fd = worker.proc.stdout.fileno()
        chunks, got = [], 0
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                raise TimeoutError
            chunk = os.read(fd, min(size - got, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _read_frame(self, worker: _Worker, deadline: float) -> dict:
        (size,) = struct.unpack(">I", self._read_exact(worker, 4, deadline))
        cap = self.max_output_bytes + 64 * 1024  # a reply holds a score or a capped traceback
        if size > cap:
            raise ValueError(f"reply of {size} bytes is over the {cap}-byte cap")
        return json.loads(self._read_exact(worker, size, deadline).decode("utf-8"))

    def _died(self, worker: _Worker) -> SandboxError:
        code = worker.proc.wait(timeout=5)
        if code == -signal.SIGXCPU:
            return SandboxError("runtime", f"the grader used more than {self.cpu_s} s of CPU time", reason="cpu")
        if code == -signal.SIGKILL or code == -signal.SIGSEGV:
            return SandboxError("runtime", f"the grader's process was killed (signal {-code}), probably out of "
                                f"memory (limit {self.memory_mb} MB)", reason="crash")
        return SandboxError("runtime", f"the grader's process exited with code {code}", reason="crash")

    def run(self, source: str, sample: dict, item: dict) -> float:
        """The score grade(sample, item) returns. Raises SandboxError (see its kinds) on any failure."""
        if self._closed:
            raise SandboxError("server", "the sandbox is closed", reason="closed")
        request = json.dumps({"source": source, "sample": sample, "item": item}, ensure_ascii=False).encode("utf-8")
        worker = self._idle.get()
        replace = True
        try:
            if not worker.ready:
                try:
                    hello = self._read_frame(worker, time.monotonic() + START_TIMEOUT_S)
                except (TimeoutError, EOFError, ValueError, OSError) as exc:
                    raise SandboxError("server", f"a sandbox worker did not start: {exc!r}", reason="start") from exc
                if not hello.get("ready"):
                    raise SandboxError("server", "a sandbox worker did not start", reason="start")
                worker.ready = True
            try:
                worker.proc.stdin.write(struct.pack(">I", len(request)) + request)
                worker.proc.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                raise self._died(worker) from exc
            try:
                reply = self._read_frame(worker, time.monotonic() + self.timeout_s)
            except TimeoutError as exc:
                raise SandboxError("runtime", f"the grader did not return within {self.timeout_s} s",
                                   reason="timeout") from exc
            except EOFError as exc:
                raise self._died(worker) from exc
            except (ValueError, UnicodeDecodeError) as exc:
                raise SandboxError("runtime", f"the grader's process sent an unreadable reply: {exc}",
                                   reason="protocol") from exc
            replace = bool(reply.get("recycle"))
            if reply.get("ok"):
                return float(reply["score"])
            raise SandboxError("runtime", str(reply.get("details", "")), reason=str(reply.get("reason", "")))
        finally:
            if replace:
                self._kill(worker)
                worker = self._start() if not self._closed else None
            if worker is not None:
                self._idle.put(worker)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            workers = list(self._all)
        for worker in workers:
            self._kill(worker)
        try:
            os.chmod(self._home, 0o700)
            shutil.rmtree(self._home, ignore_errors=True)
        except OSError:
            pass

    def __enter__(self) -> PythonSandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()
