"""Print the RAG example's comparison from the evaluation's results.json: base + retrieval vs tuned + retrieval.

    python examples/rag/compare.py runs/rag/eval/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [("answerable: exact match", "scorer.answer_exact"),
        ("answerable: said \"I don't know\"", "scorer.answer_idk"),
        ("unanswerable: said \"I don't know\"", "scorer.unanswerable_idk")]


def table(results: dict) -> list[str]:
    cands = results["candidates"]
    names = {"fine-tuned": "tuned + retrieval", "base": "base + retrieval"}
    header = ["held-out questions"] + [names.get(c["name"], c["name"]) for c in cands]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for title, key in ROWS:
        cells = []
        for c in cands:
            value, n = c["metrics"].get(key), c["counts"].get(key)
            cells.append("-" if value is None else f"{100 * value:.0f}% (n={n})")
        lines.append(" | ".join([title] + cells))
    cells = []
    for c in cands:
        value = c["metrics"].get("scorer.unanswerable_idk")
        cells.append("-" if value is None else f"{100 * (1 - value):.0f}%")
    lines.append(" | ".join(["hallucination rate (unanswerable, answered anyway)"] + cells))
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0] if argv else "runs/rag/eval/results.json")
    lines = table(json.loads(path.read_text(encoding="utf-8")))
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
