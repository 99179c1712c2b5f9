"""One sandbox worker: runs python graders' grade(sample, item), one call at a time, for `sandbox.PythonSandbox`.

Started by the parent as `python -I <this file>` (run by path, so that nothing of tunekit is imported here:
only the standard library), in an empty temporary directory, with a minimal environment and, where the
`unshare` tool works, in a network namespace of its own. Before the first call it:

- sets resource limits: address space (memory_mb), file size 0 (no file can be written), a few file
  descriptors, no core dumps, processes (ignored when running as root); the CPU-time limit is re-armed
  before each call (cpu_s of CPU time per call, threads included);
- installs an audit hook that refuses sockets, fork/exec/spawn/subprocess/kill, opening any file for writing,
  opening or listing anything outside Python's own library folders, changing resource limits, and the
  ctypes calls that reach raw memory or native functions.

The parent enforces the wall-clock timeout (it kills this process) and caps the size of each reply.
Audit hooks are not a security boundary against a determined attacker: see docs/security.md.

Protocol, on stdin/stdout (moved to private descriptors; fds 0-2 become /dev/null): frames of a 4-byte
big-endian length and a UTF-8 JSON body. The parent sends {"source","sample","item"}; the worker answers
{"ok": true, "score": float} or {"ok": false, "reason", "details"}; "recycle": true asks the parent to replace
this worker (after a MemoryError, or when a grader left threads running). The first frame the worker sends is
{"ready": true}.
"""

# Pre-imported before the audit hook: `import ctypes` itself opens the process's own symbols (dlopen(NULL)),
# and numpy and other libraries import ctypes; what ctypes can *do* is refused by the hook afterwards.
import ctypes  # noqa: F401
import io
import json
import os
import resource
import signal
import struct
import sys
import threading
import traceback

DETAILS_MAX = 8192  # characters of traceback sent back


class OutputLimitExceeded(BaseException):
    """Raised inside the grader when it prints more than max_output_bytes (BaseException: `except Exception`
    in the grader does not swallow it; the limit counts even if it is swallowed)."""


class CappedOutput(io.TextIOBase):
    """sys.stdout / sys.stderr of a grader call: keeps the first max_bytes, then refuses."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.size = 0
        self.exceeded = False
        self.parts: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, text) -> int:
        text = str(text)
        self.size += len(text.encode("utf-8", "replace"))
        if self.size > self.max_bytes:
            self.exceeded = True
            raise OutputLimitExceeded(f"the grader printed more than {self.max_bytes} bytes")
        self.parts.append(text)
        return len(text)


def read_frame(stream) -> dict | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (size,) = struct.unpack(">I", head)
    return json.loads(stream.read(size).decode("utf-8"))


def write_frame(stream, obj: dict) -> None:
    body = json.dumps(obj, ensure_ascii=False, allow_nan=True).encode("utf-8")
    stream.write(struct.pack(">I", len(body)) + body)
    stream.flush()


def allowed_read_roots() -> tuple[str, ...]:
    """Python's own library folders (the standard library, the venv's site-packages): read-only."""
    import site
    import sysconfig

    roots = {sys.base_prefix, sys.base_exec_prefix}
    roots.update(p for key, p in sysconfig.get_paths().items() if key in ("stdlib", "platstdlib", "purelib", "platlib"))
    roots.update(site.getsitepackages())
    return tuple(sorted(os.path.realpath(r) + os.sep for r in roots if r))


REFUSED_EXACT = {
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.kill", "os.killpg",
    "subprocess.Popen", "pty.spawn", "resource.setrlimit", "resource.prlimit", "os.chdir", "os.chmod",
    "os.chown", "os.link", "os.symlink", "os.mkdir", "os.remove", "os.rename", "os.rmdir", "os.truncate",
    "os.utime", "shutil.rmtree", "ctypes.dlopen", "ctypes.dlsym",
    "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.cdata/buffer", "ctypes.call_function", "ctypes.string_at",
    "ctypes.wstring_at", "ctypes.addressof", "ctypes.set_errno", "ctypes.seh_exception", "sys.addaudithook",
    "mmap.__new__", "syslog.openlog", "webbrowser.open", "ftplib.connect", "http.client.connect",
    "smtplib.connect", "telnetlib.Telnet.open", "urllib.Request", "imaplib.open", "poplib.connect",
    "nntplib.connect",
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def install_audit_hook(read_roots: tuple[str, ...], arm_cpu_code) -> None:
    realpath = os.path.realpath
    getframe = sys._getframe

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return  # an already-open descriptor (the worker's own pipes and /dev/null)
            if (mode and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS:
                raise PermissionError(f"sandbox: writing files is not allowed ({path!r})")
            full = realpath(os.fsdecode(path))
            if not (full + os.sep).startswith(read_roots):
                raise PermissionError(f"sandbox: reading outside Python's library is not allowed ({path!r})")
        elif event in ("os.listdir", "os.scandir"):
            path = args[0] if args and args[0] is not None else "."
            if isinstance(path, int):
                raise PermissionError("sandbox: listing a directory by descriptor is not allowed")
            full = realpath(os.fsdecode(path))
            if not (full + os.sep).startswith(read_roots):
                raise PermissionError(f"sandbox: listing outside Python's library is not allowed ({path!r})")
        elif event.startswith("socket."):
            raise PermissionError(f"sandbox: network access is not allowed ({event})")
        elif event in REFUSED_EXACT:
            # The worker's own per-call CPU limit is the one setrlimit allowed (see arm_cpu below).
            if event == "resource.setrlimit" and getframe(1).f_code is arm_cpu_code:
                return
            raise PermissionError(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


def set_limits(memory_mb: int) -> None:
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # no file can grow; the hook refuses opening for write
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
    try:
        # Limits processes/threads of the user; Linux ignores it for root (the hook refuses fork anyway).
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
    except (ValueError, OSError):
        pass
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past FSIZE fails with EFBIG instead of killing


def run_grader(source: str, sample, item, max_output: int) -> dict:
    out = CappedOutput(max_output)
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = out
    recycle = False
    try:
        namespace: dict = {"__name__": "grader", "__builtins__": __builtins__}
        exec(compile(source, "<grader>", "exec"), namespace)
        grade = namespace.get("grade")
        if not callable(grade):
            return {"ok": False, "reason": "no_grade", "details": "the source defines no function grade(sample, item)"}
        score = grade(sample, item)
    except OutputLimitExceeded as exc:
        return {"ok": False, "reason": "output", "details": str(exc)}
    except MemoryError:
        return {"ok": False, "reason": "memory", "recycle": True,
                "details": "MemoryError: the grader needed more memory than the sandbox allows"}
    except BaseException:  # noqa: BLE001 - any failure of the grader's code is its error, reported
        details = traceback.format_exc()
        if out.exceeded:
            return {"ok": False, "reason": "output", "details": f"the grader printed more than {max_output} bytes"}
        return {"ok": False, "reason": "exception", "details": details[-DETAILS_MAX:]}
    finally:
        sys.stdout, sys.stderr = saved
        if threading.active_count() > 1:
            recycle = True  # a thread the grader started would outlive the call
    if out.exceeded:
        return {"ok": False, "reason": "output", "details": f"the grader printed more than {max_output} bytes",
                "recycle": recycle}
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return {"ok": False, "reason": "return", "recycle": recycle,
                "details": f"grade() returned {type(score).__name__} {str(score)[:200]!r}, not a float"}
    score = float(score)
    if score != score or score in (float("inf"), float("-inf")):
        return {"ok": False, "reason": "return", "recycle": recycle, "details": f"grade() returned {score}"}
    return {"ok": True, "score": score, "recycle": recycle}


def main() -> None:
    memory_mb, cpu_s, max_output = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    sys.dont_write_bytecode = True
    # The protocol moves to private descriptors; 0, 1 and 2 become /dev/null, so a grader writing to them
    # with os.write reaches nothing.
    channel_in = os.fdopen(os.dup(0), "rb", buffering=0)
    channel_out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)

    def arm_cpu() -> None:
        """Allow cpu_s more seconds of CPU time (all threads) from now; past it the kernel sends SIGXCPU."""
        used = resource.getrusage(resource.RUSAGE_SELF)
        now = used.ru_utime + used.ru_stime
        soft = int(now + cpu_s) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.RLIM_INFINITY))

    roots = allowed_read_roots()
    set_limits(memory_mb)
    install_audit_hook(roots, arm_cpu.__code__)
    write_frame(channel_out, {"ready": True})
    while True:
        request = read_frame(channel_in)
        if request is None:
            return
        arm_cpu()
        reply = run_grader(request["source"], request["sample"], request["item"], max_output)
        write_frame(channel_out, reply)


if __name__ == "__main__":
    main()
