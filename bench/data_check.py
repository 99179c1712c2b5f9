"""`tunekit data check --model` on a large file of short chats: cold cache, warm cache, no cache.

    python -m bench.data_check [--n 240000] [--model models/tiny-chat]

Writes `--n` chats (a fixed system prompt, a question, an answer: bench/data.py's pseudo-words, about 420
bytes a line) to a temporary file and times the command as a user runs it, in a new process each time, with a
temporary data cache: first with an empty cache (render on every core and write the entry), then again (the
entry gives the token statistics), then with `--no-cache` (render every line, write nothing). Each run's JSON
report must give the same statistics. Results: bench/results/data_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.data import TextGen

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "data_check.json"


def write_chats(path: Path, n: int, seed: int = 0) -> int:
    gen = TextGen(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            record = {"messages": [{"role": "system", "content": "You answer in one short sentence."},
                                   {"role": "user", "content": gen.text(gen.rng.randint(12, 30)) + "?"},
                                   {"role": "assistant", "content": gen.text(gen.rng.randint(12, 30)) + "."}]}
            fh.write(json.dumps(record) + "\n")
    return path.stat().st_size


def timed(args: list[str], env: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tunekit", *args, "--json"], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(done.stderr[-2000:])
    return seconds, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=240_000)
    parser.add_argument("--model", default=str(REPO / "models" / "tiny-chat"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chats.jsonl"
        size = write_chats(data, args.n)
        env = {**os.environ, "TUNEKIT_DATA_CACHE": str(Path(tmp) / "cache")}
        runs = {}
        for name, extra in (("cold cache", []), ("warm cache", []), ("no cache", ["--no-cache"]),
                            ("characters only (no --model)", None)):
            cmd = ["data", "check", str(data)] + (["--model", args.model] + extra if extra is not None else [])
            seconds, report = timed(cmd, env)
            runs[name] = {"seconds": round(seconds, 2), "stats": report.get("stats")}
            print(f"{name}: {seconds:.1f} s", flush=True)
        stats = [r["stats"] for k, r in runs.items() if k != "characters only (no --model)"]
        assert stats[0] == stats[1] == stats[2], "the three runs disagree"
        result = {"command": "python -m bench.data_check " + " ".join(sys.argv[1:]), "examples": args.n,
                  "file_mib": round(size / 2**20, 1), "cores": len(os.sched_getaffinity(0)),
                  "loadavg": os.getloadavg(), "runs": {k: v["seconds"] for k, v in runs.items()},
                  "tokens_per_epoch": stats[0].get("tokens_per_epoch")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
