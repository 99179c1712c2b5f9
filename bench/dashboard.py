"""Cold load time of each dashboard page, against the same server's plainest document (its /openapi.json).

    python -m bench.dashboard                      # models/tiny-chat, 5 rounds, Debian's chromium
    python -m bench.dashboard --rounds 5 --chromium /usr/bin/chromium

Each round starts `tunekit serve models/tiny-chat --data-dir TMP` as a subprocess (a cold server: new process,
nothing requested yet) and, as soon as /health answers, a new headless chromium (empty cache). Measured in
that browser: the time from navigation start until the page shows what it fetched from the API (the Data
page's file list or its empty state, the Jobs form and list, the Playground's and Compare's model selectors),
and, as the peer, until /openapi.json has loaded. The Data page is loaded first (the server's first request);
each later page in a new browser context (no cache). Prints median milliseconds and the ratio to the peer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.serve import free_port

REPO = Path(__file__).resolve().parents[1]
PAGES = {"data": ("#/data", "#files, #files-empty"), "jobs": ("#/jobs", "#jobs-empty, #jobs"),
         "playground": ("#/playground", "#pg-model"), "compare": ("#/compare", "#cmp-model-1")}


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the server did not start")


def one_round(playwright, chromium: str) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as data_dir:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "tunekit"), "serve", str(REPO / "models" / "tiny-chat"),
                                 "--port", str(port), "--data-dir", data_dir], stderr=subprocess.DEVNULL)
        try:
            wait_healthy(url, proc)
            browser = playwright.chromium.launch(executable_path=chromium, headless=True)
            times = {}
            for name, (hash_, ready) in [*PAGES.items(), ("peer: /openapi.json", ("", None))]:
                context = browser.new_context()
                page = context.new_page()
                target = url + ("/openapi.json" if ready is None else "/" + hash_)
                began = time.perf_counter()
                page.goto(target, wait_until="load")
                if ready is not None:
                    page.wait_for_selector(ready, timeout=30_000)
                times[name] = (time.perf_counter() - began) * 1000
                context.close()
            browser.close()
            return times
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    rounds = []
    with sync_playwright() as p:
        for _ in range(args.rounds):
            rounds.append(one_round(p, args.chromium))
    medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    peer = medians["peer: /openapi.json"]
    print(f"{'page':<22}{'median ms':>10}{'max ms':>9}{'x peer':>8}")
    for name, ms in medians.items():
        print(f"{name:<22}{ms:>10.0f}{max(r[name] for r in rounds):>9.0f}{ms / peer:>8.2f}")
    print(json.dumps({"rounds": rounds, "median_ms": medians}))


if __name__ == "__main__":
    main()
