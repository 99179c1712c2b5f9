"""Rendering + masking throughput: tunekit against transformers' `apply_chat_template` with the assistant mask.

    python -m bench.data_render [--n 200] [--turns 1,4,8,16] [--repeat 3] [--workers 2]

For each number of turns, `--n` conversations of user/assistant pairs, 10-80 pseudo-words a message
(bench/data.py's text and tokenizer, ChatML with `{% generation %}` markers). Measured in this process on one
core (tokenizers' own thread pool limited to 1):

- tunekit: `render_example` (the single render where the template's layout proves it, prefix otherwise);
- tunekit prefix: `render_example(method="prefix")`, one render per trained turn (the method before);
- transformers: `apply_chat_template(tokenize=True, return_dict=True, return_assistant_tokens_mask=True)`,
  the path TRL's `assistant_only_loss` takes;
- tunekit with `--workers` processes (`tunekit.data.workers.render_records`), the speed-up against one.

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

    def workers(examples):
        for _ in render_records(list(enumerate(examples)), tokenizer, num_workers=args.workers, progress=False):
            pass

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
        stacks = {"tunekit": tunekit, "transformers": transformers, "tunekit_prefix": prefix,
                  f"tunekit_{args.workers}_workers": workers}
        for _ in range(args.repeat):
            for name, fn in stacks.items():
                best[name] = max(best.get(name, 0.0), rate(fn, examples))
        row = {"turns": turns, "conversations": len(examples), "same_tokens_and_mask": same, **best,
               "ratio": best["tunekit"] / best["transformers"],
               "speedup_workers": best[f"tunekit_{args.workers}_workers"] / best["tunekit"]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    w = f"tunekit_{args.workers}_workers"
    print(f"\n| turns | tunekit ex/s | transformers + mask ex/s | ratio | tunekit prefix ex/s | "
          f"tunekit {args.workers} workers ex/s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['turns']} | {r['tunekit']:,.0f} | {r['transformers']:,.0f} | {r['ratio']:.2f} | "
              f"{r['tunekit_prefix']:,.0f} | {r[w]:,.0f} | {r['speedup_workers']:.2f}x |")
    import tokenizers
    import transformers as tf

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python -m bench.data_render " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cores": len(os.sched_getaffinity(0)), "loadavg": os.getloadavg(),
                    "transformers": tf.__version__, "tokenizers": tokenizers.__version__},
        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
