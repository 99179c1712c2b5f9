"""Write the reinforcement example's prompts from the quickstart's recipes: each chat's system and user turns,
and its answer as a field the grader reads (`{{item.answer}}`), no reply to imitate.

    python examples/rft/make_data.py          # writes train.jsonl (800 prompts) and valid.jsonl (100)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "quickstart"


def prompts_from(chats: Path) -> list[dict]:
    out = []
    for line in chats.read_text(encoding="utf-8").splitlines():
        *prompt, reply = json.loads(line)["messages"]
        out.append({"messages": prompt, "answer": json.loads(reply["content"])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        rows = prompts_from(QUICKSTART / f"{split}.jsonl")
        with open(args.out / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{args.out / f'{split}.jsonl'}: {len(rows)} prompts")


if __name__ == "__main__":
    main()
