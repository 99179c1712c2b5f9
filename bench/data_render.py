"""Rendering + masking throughput: tunekit against transformers' `apply_chat_template` with the assistant mask.

    python -m bench.data_render [--n 200] [--turns 1,4,8,16] [--repeat 3] [--workers 2]

For each number of turns, `--n` conversations of user/assistant pairs, 10-80 pseudo-words a message
(bench/data.py's text and tokenizer, ChatML with `{% generation %}` markers). Measured in this process on one
core (tokenizers' own thread pool limited to 1):

- tunekit: `render_example` (the single render where the template's layout proves it, prefix otherwise);
- tunekit prefix: `render_example(method="prefix")`, one render per trained turn (the method before);
- transformers: `apply_chat_template(tokenize=True, return_dict=True, return_assistant_tokens_mask=True)`,
  the path TRL's `assistant_only_loss` takes;
- tunekit with `--workers` processes (`tunekit.data.workers.render_records`, pool start included) on
  `--workers-n` conversations of 4 turns, against one process;
- the on-disk cache: `read_examples` on `--cache-n` conversations of 8 turns with an empty cache (render with
  `--workers` processes, write the entry) and again (read the entry);
- memory: what a fresh process's resident memory gains by opening an entry of N short sequences, fitting it,
  packing an epoch from the lengths and building 100 rows (`--rss-sizes`).

Each timing is the best of `--repeat` rounds (the stacks interleaved). The trained-token count of tunekit and
of the transformers mask are compared on every conversation. Results: bench/results/data_render.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers' thread pool: one core (set before import)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.data import TextGen, build_tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "data_render.json"


def conversations(turns: int, n: int, seed: int) -> list[dict]:
    gen = TextGen(seed)
    out = []
    for _ in range(n):
        messages = []
        for _ in range(turns):
            messages.append({"role": "user", "content": gen.text(gen.rng.randint(10, 80))})
            messages.append({"role": "assistant", "content": gen.text(gen.rng.randint(10, 80))})
        out.append({"messages": messages})
    return out


def rate(fn, examples: list[dict]) -> float:
    start = time.perf_counter()
    fn(examples)
    return len(examples) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--turns", default="1,4,8,16")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workers-n", type=int, default=2000, help="conversations for the workers timing")
    parser.add_argument("--cache-n", type=int, default=2000, help="conversations for the cache timing")
    parser.add_argument("--rss-sizes", default="10000,1000000", help="sequences per entry for the memory "
                                                                      "measure ('' to skip)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from tunekit.data.render import render_example
    from tunekit.data.workers import render_records

    tokenizer = build_tokenizer(4096)

    def tunekit(examples):
        for ex in examples:
            render_example(ex, tokenizer)

    def prefix(examples):
        for ex in examples:
            render_example(ex, tokenizer, method="prefix")

    def transformers(examples):
        for ex in examples:
            tokenizer.apply_chat_template(ex["messages"], tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)

    rows = []
    for turns in [int(t) for t in args.turns.split(",")]:
        examples = conversations(turns, args.n, seed=turns)
        same = 0
        for ex in examples:  # both train the same tokens?
            (seq,) = render_example(ex, tokenizer)
            out = tokenizer.apply_chat_template(ex["messages"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            trained = [t for t, label in zip(seq.input_ids, seq.labels, strict=True) if label != -100]
            marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
            same += seq.input_ids == list(out["input_ids"]) and trained == marked
        best: dict[str, float] = {}
        stacks = {"tunekit": tunekit, "transformers": transformers, "tunekit_prefix": prefix}
        for _ in range(args.repeat):
            for name, fn in stacks.items():
                best[name] = max(best.get(name, 0.0), rate(fn, examples))
        row = {"turns": turns, "conversations": len(examples), "same_tokens_and_mask": same, **best,
               "ratio": best["tunekit"] / best["transformers"]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    workers_row = worker_timings(tokenizer, args.workers_n, args.workers, render_records)
    print(json.dumps(workers_row), flush=True)
    cache_row = cache_timings(tokenizer, args.cache_n, args.workers)
    print(json.dumps(cache_row), flush=True)
    rss_rows = rss_growth([int(n) for n in args.rss_sizes.split(",")]) if args.rss_sizes else []

    print("\n| turns | tunekit ex/s | transformers + mask ex/s | ratio | tunekit prefix ex/s |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['turns']} | {r['tunekit']:,.0f} | {r['transformers']:,.0f} | {r['ratio']:.2f} | "
              f"{r['tunekit_prefix']:,.0f} |")
    print(f"\nworkers: {workers_row['conversations']} conversations of {workers_row['turns']} turns: "
          f"1 process {workers_row['one_seconds']:.2f} s, {args.workers} processes "
          f"{workers_row['many_seconds']:.2f} s: {workers_row['speedup']:.2f}x (a pure-Python loop on "
          f"{args.workers} processes: {workers_row['control_speedup']:.2f}x on this machine now)")
    import tokenizers
    import transformers as tf

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python -m bench.data_render " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cores": len(os.sched_getaffinity(0)), "loadavg": os.getloadavg(),
                    "transformers": tf.__version__, "tokenizers": tokenizers.__version__},
        "rows": rows, "workers": workers_row, "cache": cache_row, "rss": rss_rows}, indent=2) + "\n")
    print(f"\ncache: {cache_row['conversations']} conversations of {cache_row['turns']} turns, "
          f"{cache_row['workers']} workers: cold {cache_row['cold_seconds']:.2f} s (render + write), "
          f"warm {cache_row['warm_seconds']:.2f} s (read), {cache_row['entry_mib']:.1f} MiB on disk")
    for r in rss_rows:
        print(f"memory: {r['sequences']:,} sequences ({r['tokens']:,} tokens): anonymous resident memory grows "
              f"by {r['rss_anon_growth_mib']:.0f} MiB, file-backed (the memory-mapped entry, reclaimable) by "
              f"{r['rss_file_growth_mib']:.0f} MiB")


def worker_timings(tokenizer, n: int, num_workers: int, render_records, turns: int = 4) -> dict:
    """`render_records` on `n` conversations in one process and in `num_workers` (pool start included)."""
    records = list(enumerate(conversations(turns, n, seed=77)))
    seconds = {}
    for workers in (1, num_workers):
        start = time.perf_counter()
        for _ in render_records(records, tokenizer, num_workers=workers, progress=False):
            pass
        seconds[workers] = time.perf_counter() - start
    return {"conversations": n, "turns": turns, "workers": num_workers, "one_seconds": seconds[1],
            "many_seconds": seconds[num_workers], "speedup": seconds[1] / seconds[num_workers],
            "control_speedup": control_speedup(num_workers)}


def _busy(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def control_speedup(num_workers: int, n: int = 5_000_000) -> float:
    """What the machine gives `num_workers` processes now: the same pure-Python loop `num_workers` times, in
    one process and in `num_workers` (on a shared, loaded machine this is well under `num_workers`)."""
    import multiprocessing

    start = time.perf_counter()
    for _ in range(num_workers):
        _busy(n)
    one = time.perf_counter() - start
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(num_workers) as pool:
        pool.map(_busy, [n] * num_workers)
    return one / (time.perf_counter() - start)


_RSS_CHILD = """
import sys
from pathlib import Path
def rss():
    fields = dict(line.split(':') for line in open('/proc/self/status') if line.startswith('Rss'))
    return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}
from tunekit.data import cache
from tunekit.data.dataset import fit_store, epoch_rows
before = rss()
store = cache.open_entry(Path(sys.argv[1]), 'k', Path('train.jsonl'))
view, report = fit_store(store, list(range(store.n_examples)), 2048, 'drop')
lengths = view.lengths()
rows = epoch_rows(lengths, 2048, True, 0, 0)
for row in rows[:50] + rows[-50:]:
    batch = [view[i] for i in row]
after = rss()
print(after['RssAnon'] - before['RssAnon'], after['RssFile'] - before['RssFile'], report.tokens)
"""


def rss_growth(sizes: list[int], tokens_each: int = 48) -> list[dict]:
    """Resident memory a fresh process gains by opening a cache entry of N short sequences, fitting it, packing
    an epoch from the lengths and building 100 rows of sequences (the entry is written beforehand): anonymous
    (Python objects, arrays) and file-backed (pages of the memory-mapped entry, which the kernel can drop)."""
    import subprocess
    import tempfile

    from tunekit.data import cache
    from tunekit.data.types import IGNORE, Sequence

    out = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            def examples(n=n):
                for e in range(n):
                    ids = [(e * 7 + k) % 4000 for k in range(tokens_each)]
                    yield e + 1, [Sequence(ids, [IGNORE] * (tokens_each // 2) + ids[tokens_each // 2:], {"turns": [1]})]
            cache.store_stream(Path(tmp), "k", {}, Path("train.jsonl"), examples())
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
            result = subprocess.run([sys.executable, "-c", _RSS_CHILD, tmp], capture_output=True, text=True,
                                    env=env, check=True)
            anon, file_backed, tokens = result.stdout.split()
            out.append({"sequences": n, "tokens": int(tokens), "rss_anon_growth_mib": int(anon) / 2**20,
                        "rss_file_growth_mib": int(file_backed) / 2**20})
            print(json.dumps(out[-1]), flush=True)
    return out


def cache_timings(tokenizer, n: int, num_workers: int, turns: int = 8) -> dict:
    """`read_examples` on a JSONL file with an empty cache (render, then write the entry) and again (read)."""
    import tempfile

    from tunekit.config import DataConfig
    from tunekit.data import cache
    from tunekit.data.dataset import read_examples

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_text("".join(json.dumps(ex) + "\n" for ex in conversations(turns, n, seed=99)))
        data = DataConfig(train=path, cache_dir=Path(tmp) / "cache", num_workers=num_workers)
        start = time.perf_counter()
        cold = read_examples(path, tokenizer, data)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        warm = read_examples(path, tokenizer, data)
        warm_s = time.perf_counter() - start
        assert [[s.input_ids for s in ex] for ex in warm] == [[s.input_ids for s in ex] for ex in cold]
        (entry,) = cache.entries(Path(tmp) / "cache")
        return {"conversations": n, "turns": turns, "workers": num_workers, "cold_seconds": cold_s,
                "warm_seconds": warm_s, "tokens": entry.meta["tokens"], "entry_mib": entry.size_bytes / 2**20}


if __name__ == "__main__":
    main()
