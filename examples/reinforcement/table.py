"""Print the reinforcement example's table from the results.json that run.sh's evaluation writes: per model the
grader's mean (±2 standard errors) and exact match on the held-out chats, and SFT+GRPO's paired difference from
SFT on the same chats (±2 standard errors of the per-chat differences).

    python examples/reinforcement/table.py RESULTS_JSON
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

NAMES = {"fine-tuned": "SFT + GRPO", "base": "SFT", "tiny-chat": "base (models/tiny-chat)"}
GRADER = "grader.ingredients"


def two_se(values: list[float]) -> float:
    return 2 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def main(path: str) -> None:
    results = json.loads(Path(path).read_text(encoding="utf-8"))
    examples = results["examples"]
    scores = {c["name"]: [e["scores"][c["name"]][GRADER] for e in examples] for c in results["candidates"]}
    exact = {c["name"]: c["metrics"]["exact_match"] for c in results["candidates"]}
    print(f"| model ({len(examples)} held-out chats) | `ingredients` grader (mean ±2 SE) | exact match |")
    print("|---|---:|---:|")
    for name in sorted(scores, key=lambda n: list(NAMES).index(n) if n in NAMES else -1, reverse=True):
        s = scores[name]
        print(f"| {NAMES.get(name, name)} | {statistics.fmean(s):.3f} ±{two_se(s):.3f} | {100 * exact[name]:.1f}% |")
    if "fine-tuned" in scores and "base" in scores:
        diff = [a - b for a, b in zip(scores["fine-tuned"], scores["base"], strict=True)]
        print(f"\nSFT + GRPO - SFT, paired over the same chats: {statistics.fmean(diff):+.3f} ±{two_se(diff):.3f} "
              f"(grader); better on {sum(d > 0 for d in diff)} chats, worse on {sum(d < 0 for d in diff)}")


if __name__ == "__main__":
    main(sys.argv[1])
