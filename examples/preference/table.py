"""Print the preference example's table from the two results.json files that run.sh writes.

    python examples/preference/table.py PAIRS_RESULTS TASK_RESULTS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NAMES = {"fine-tuned": "SFT+DPO", "base": "SFT", "tiny-chat": "base (models/tiny-chat)"}


def pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def main(pairs_path: str, task_path: str) -> None:
    pairs = json.loads(Path(pairs_path).read_text(encoding="utf-8"))
    task = json.loads(Path(task_path).read_text(encoding="utf-8"))
    task_by_name = {c["name"]: c["metrics"] for c in task["candidates"]}
    print(f"| model | preference accuracy ({pairs['n_examples']} held-out pairs) | per token | margin (nats) "
          f"| exact match ({task['n_examples']} held-out chats) | JSON equal |")
    print("|---|---|---|---|---|---|")
    for cand in reversed(pairs["candidates"]):
        m, t = cand["metrics"], task_by_name.get(cand["name"], {})
        print(f"| {NAMES.get(cand['name'], cand['name'])} | {pct(m['preference_accuracy'])} "
              f"| {pct(m['preference_accuracy_normalized'])} | {m['preference_margin']:.2f} "
              f"| {pct(t.get('exact_match'))} | {pct(t.get('json_equal'))} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
