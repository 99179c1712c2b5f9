"""Is an eval with graders limited by generation or by grading? Generation of the tiny model's replies to the
quickstart's held-out recipes against grading replies with a string_check grader and with a python grader (a
warm sandbox pool), per sample, in one process.

    python -m bench.graders [--model models/tiny-chat] [--generate 100] [--grade 1000] [--max-new-tokens 48]

Generation is timed on --generate prompts (greedy, batch 8, tunekit's engine, what `tunekit eval` runs) and
grading on --grade samples (the generated replies repeated); prints ms per sample for each and the ratio, and
writes bench/results/graders.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tunekit.data.render import end_of_turn_ids, render_prompt
from tunekit.eval.graders import PythonSandbox, grade
from tunekit.eval.grading import sample_of
from tunekit.generate.engine import generate
from tunekit.model import load_for_inference

REPO = Path(__file__).resolve().parents[1]
STRING_CHECK = {"type": "string_check", "name": "exact", "operation": "eq", "input": "{{sample.output_text}}",
                "reference": "{{item.messages[-1].content}}"}
PYTHON = {"type": "python", "name": "items", "source": (
    "import json\n\ndef grade(sample, item):\n    try:\n        got = json.loads(sample['output_text'])\n"
    "    except ValueError:\n        return 0.0\n    want = json.loads(item['messages'][-1]['content'])\n"
    "    return len(set(got) & set(want)) / max(1, len(want))\n")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "tiny-chat"))
    parser.add_argument("--generate", type=int, default=100)
    parser.add_argument("--grade", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = [json.loads(x) for x in (REPO / "examples/quickstart/valid.jsonl").read_text().splitlines()]
    records = (records * (args.generate // len(records) + 1))[:args.generate]
    model, tokenizer = load_for_inference(args.model, device=torch.device("cpu"))
    prompts = [list(render_prompt({"messages": r["messages"][:-1]}, tokenizer)) for r in records]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    gens = generate(model, prompts, stop_ids=list(end_of_turn_ids(tokenizer)), pad_id=pad,
                    max_new_tokens=args.max_new_tokens, batch_size=8)
    generate_ms = (time.perf_counter() - t0) * 1000 / len(prompts)
    replies = [tokenizer.decode(g.ids, skip_special_tokens=True).strip() for g in gens]
    items = [records[i % len(records)] for i in range(args.grade)]
    samples = [sample_of(replies[i % len(replies)]) for i in range(args.grade)]
    out = {"model": args.model, "generated": len(prompts), "graded": args.grade, "generate_ms_per_sample": generate_ms}
    with PythonSandbox(workers=2) as sandbox:
        grade(PYTHON, samples[0], items[0], sandbox=sandbox)  # the pool warm
        for name, grader in (("string_check", STRING_CHECK), ("python", PYTHON)):
            t0 = time.perf_counter()
            rewards = [grade(grader, s, it, sandbox=sandbox).reward for s, it in zip(samples, items, strict=True)]
            ms = (time.perf_counter() - t0) * 1000 / args.grade
            out[f"{name}_ms_per_sample"] = ms
            out[f"{name}_mean_reward"] = sum(rewards) / len(rewards)
            print(f"{name}: {ms:.3f} ms per sample over {args.grade} samples (mean reward "
                  f"{out[f'{name}_mean_reward']:.3f}); generation {generate_ms:.1f} ms per sample: grading is "
                  f"{100 * ms / generate_ms:.2f}% of it")
    path = REPO / "bench" / "results" / "graders.json"
    path.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
