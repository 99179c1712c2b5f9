"""The python grader sandbox under attack: each attack fails that one grade (score 0, a clear error) and the
pool grades the next sample correctly. Also: the warm pool's overhead per call (printed)."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tunekit.eval.graders import PythonSandbox, SandboxError, grade, make_sample

OK = "def grade(sample, item):\n    return 1.0 if sample['output_text'] == item['answer'] else 0.0\n"
TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def sandbox():
    with PythonSandbox(workers=2, timeout_s=TIMEOUT_S, memory_mb=512, cpu_s=5, max_output_bytes=100_000) as sb:
        yield sb


def still_grades(sb: PythonSandbox) -> None:
    for _ in range(3):  # more calls than workers: every worker, replaced or not, answers
        assert sb.run(OK, make_sample("4"), {"answer": "4"}) == 1.0
        assert sb.run(OK, make_sample("5"), {"answer": "4"}) == 0.0


def attack(sb: PythonSandbox, body: str, *, imports: str = "") -> SandboxError:
    source = f"{imports}\ndef grade(sample, item):\n" + "".join(f"    {line}\n" for line in body.splitlines())
    with pytest.raises(SandboxError) as caught:
        sb.run(source, make_sample("x"), {"answer": "x"})
    still_grades(sb)
    return caught.value


def test_infinite_loop_times_out_and_the_worker_is_replaced(sandbox):
    start = time.monotonic()
    err = attack(sandbox, "while True:\n    pass")
    assert (err.kind, err.reason) == ("runtime", "timeout")
    assert TIMEOUT_S <= time.monotonic() - start < TIMEOUT_S + 5


def test_fork_bomb_and_subprocesses_are_refused(sandbox):
    err = attack(sandbox, "while True:\n    os.fork()", imports="import os")
    assert (err.kind, err.reason) == ("runtime", "exception") and "os.fork is not allowed" in err.details
    err = attack(sandbox, "subprocess.run(['id'])\nreturn 1.0", imports="import subprocess")
    assert "subprocess.Popen is not allowed" in err.details
    err = attack(sandbox, "os.system('id')\nreturn 1.0", imports="import os")
    assert "os.system is not allowed" in err.details
    err = attack(sandbox, "multiprocessing.Process(target=print).start()\nreturn 1.0", imports="import multiprocessing")
    assert "not allowed" in err.details
    err = attack(sandbox, "os.kill(os.getppid(), 9)\nreturn 1.0", imports="import os")
    assert "os.kill is not allowed" in err.details


def test_unbounded_memory_is_a_memory_error(sandbox):
    err = attack(sandbox, "x = bytearray(10**10)\nreturn 1.0")
    assert (err.kind, err.reason) == ("runtime", "memory") and "MemoryError" in err.details
    err = attack(sandbox, "chunks = []\nwhile True:\n    chunks.append(bytearray(32 * 2**20))")
    assert err.reason == "memory"


def test_sockets_are_refused_and_nothing_connects(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        err = attack(sandbox, f"socket.create_connection(('127.0.0.1', {port}), timeout=1)\nreturn 1.0",
                     imports="import socket")
        assert "network access is not allowed" in err.details
        err = attack(sandbox, "urllib.request.urlopen('http://example.com', timeout=1)\nreturn 1.0",
                     imports="import urllib.request")
        assert "not allowed" in err.details
        with pytest.raises(socket.timeout):
            server.accept()  # no connection ever arrived
    finally:
        server.close()
    print(f"\nnetwork isolation of the workers: {sandbox.network_isolation}")
    # without a network namespace (where `unshare --net` cannot run) the audit hook alone refuses sockets
    with PythonSandbox(workers=1, timeout_s=5, network_namespace=False) as plain:
        assert plain.network_isolation == "audit-hook"
        err = attack(plain, "socket.socket().connect(('127.0.0.1', 9))\nreturn 1.0", imports="import socket")
        assert "network access is not allowed" in err.details


def test_files_outside_python_are_unreadable_and_nothing_is_writable(sandbox, tmp_path):
    err = attack(sandbox, "return float(len(open('/etc/passwd').read()))")
    assert "reading outside Python's library is not allowed" in err.details
    secret = tmp_path / "serve-data" / "store.sqlite"
    secret.parent.mkdir()
    secret.write_text("sk-secret")
    err = attack(sandbox, f"return float(len(open({str(secret)!r}).read()))")
    assert "not allowed" in err.details
    err = attack(sandbox, f"return float(len(os.listdir({str(secret.parent)!r})))", imports="import os")
    assert "listing outside" in err.details
    err = attack(sandbox, "return float(len(open(f'/proc/{os.getppid()}/environ', 'rb').read()))", imports="import os")
    assert "not allowed" in err.details
    target = tmp_path / "written.txt"
    err = attack(sandbox, f"open({str(target)!r}, 'w').write('x')\nreturn 1.0")
    assert "writing files is not allowed" in err.details and not target.exists()
    err = attack(sandbox, "import tunekit\nreturn 1.0")  # the server's own code is outside the allowed folders
    assert "not allowed" in err.details
    err = attack(sandbox, "ctypes.CDLL('libc.so.6').system(b'id')\nreturn 1.0", imports="import ctypes")
    assert "ctypes.dlopen is not allowed" in err.details
    # the standard library and site-packages stay importable
    source = "import numpy, statistics\ndef grade(sample, item):\n    return float(numpy.mean([0.0, 1.0]))\n"
    assert sandbox.run(source, make_sample("x"), {}) == 0.5


def test_the_environment_holds_no_keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-1")
    monkeypatch.setenv("TUNEKIT_API_KEY", "tk-secret-2")
    source = ("import os\n"
              "def grade(sample, item):\n"
              "    values = ' '.join(os.environ.values())\n"
              "    return float(('secret' in values) + len([k for k in os.environ if 'KEY' in k]))\n")
    with PythonSandbox(workers=1, timeout_s=5) as sb:
        assert sb.run(source, make_sample("x"), {}) == 0.0
        home = "def grade(sample, item):\n    import os\n    return float(os.environ['HOME'] == os.getcwd())\n"
        assert sb.run(home, make_sample("x"), {}) == 1.0  # HOME and the working directory: an empty temp dir


def test_printing_gigabytes_is_capped(sandbox):
    start = time.monotonic()
    err = attack(sandbox, "while True:\n    print('x' * 10**6)")
    assert (err.kind, err.reason) == ("runtime", "output") and "100000 bytes" in err.details
    err = attack(sandbox, "try:\n    print('y' * 10**6)\nexcept BaseException:\n    pass\nreturn 1.0")
    assert err.reason == "output"  # swallowing the error does not lift the cap
    assert time.monotonic() - start < TIMEOUT_S  # stopped at the cap, not by the timeout
    # raw writes to fds 1 and 2 reach /dev/null, not the parent's channel
    source = "import os\ndef grade(sample, item):\n    os.write(1, b'z' * 10**7)\n    os.write(2, b'z' * 10**6)\n    return 0.75\n"
    assert sandbox.run(source, make_sample("x"), {}) == 0.75
    still_grades(sandbox)


def test_bad_returns_raises_and_missing_grade(sandbox):
    assert attack(sandbox, "return '1.0'").reason == "return"
    assert attack(sandbox, "return None").reason == "return"
    assert attack(sandbox, "return True").reason == "return"
    err = attack(sandbox, "raise ValueError('no score for you')")
    assert err.reason == "exception" and "ValueError: no score for you" in err.details
    with pytest.raises(SandboxError) as caught:
        sandbox.run("x = 1\n", make_sample("x"), {})
    assert caught.value.reason == "no_grade"
    assert sandbox.run("def grade(sample, item):\n    return 1\n", make_sample("x"), {}) == 1.0  # an int is a number


def test_threads_left_running_get_the_worker_replaced(sandbox):
    source = ("import threading\n"
              "def grade(sample, item):\n"
              "    threading.Thread(target=lambda: [0 for _ in iter(int, 1)], daemon=True).start()\n"
              "    return 0.5\n")
    assert sandbox.run(source, make_sample("x"), {}) == 0.5
    still_grades(sandbox)


def test_grade_maps_sandbox_failures_to_openai_error_flags(sandbox):
    def run(body):
        g = {"type": "python", "name": "p", "source": "def grade(sample, item):\n" + body}
        return grade(g, make_sample("x"), {"answer": "x"}, sandbox=sandbox)

    r = run("    while True:\n        pass\n")
    assert (r.reward, r.passed) == (0.0, False)
    assert r.errors["python_grader_runtime_error"] and r.errors["unresponsive_reward_error"]
    r = run("    while True:\n        print('x' * 10**6)\n")
    assert r.errors["python_grader_runtime_error"] and r.errors["truncated_observation_error"]
    r = run("    import socket\n    socket.socket()\n    return 1.0\n")
    assert r.reward == 0.0 and "network access is not allowed" in r.error_message
    assert "PermissionError" in r.errors["python_grader_runtime_error_details"]
    assert run("    return 0.9\n").reward == 0.9


def test_concurrent_calls_and_warm_pool_overhead(sandbox):
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: sandbox.run(OK, make_sample(str(i % 2)), {"answer": "0"}), range(40)))
    assert results == [1.0 if i % 2 == 0 else 0.0 for i in range(40)]
    sample, item = make_sample('{"answer": "4", "why": "' + "x" * 2000 + '"}'), {"answer": "4", "id": 7}
    source = ("import json\n"
              "def grade(sample, item):\n"
              "    return 1.0 if sample['output_json']['answer'] == item['answer'] else 0.0\n")
    sandbox.run(source, sample, item)
    n = 300
    start = time.perf_counter()
    for _ in range(n):
        assert sandbox.run(source, sample, item) == 1.0
    per_call_ms = (time.perf_counter() - start) / n * 1000
    g = {"type": "python", "name": "p", "source": source}
    start = time.perf_counter()
    for _ in range(n):
        assert grade(g, sample, item, sandbox=sandbox).reward == 1.0
    per_grade_ms = (time.perf_counter() - start) / n * 1000
    print(f"\nwarm pool: {per_call_ms:.2f} ms per PythonSandbox.run, {per_grade_ms:.2f} ms per grade() "
          f"(check included), {n} calls")
    assert per_call_ms < 200 and per_grade_ms < 200  # a generous bound: the target is under 20 ms


def test_close_stops_every_worker():
    sb = PythonSandbox(workers=2, timeout_s=5)
    assert sb.run(OK, make_sample("a"), {"answer": "a"}) == 1.0
    procs = [w.proc for w in sb._all]
    sb.close()
    assert procs and all(p.poll() is not None for p in procs)
    with pytest.raises(SandboxError) as caught:
        sb.run(OK, make_sample("a"), {"answer": "a"})
    assert caught.value.kind == "server"
