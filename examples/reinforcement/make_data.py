"""Write the reinforcement example's data from the quickstart's recipes: prompts (each chat's system and user
turns, its answer as a field the grader reads as `{{item.answer}}`, no reply to imitate), and held-out chats.

    python examples/reinforcement/make_data.py   # writes train.jsonl (800 prompts), valid.jsonl (100), test.jsonl

- train.jsonl: the prompts of the quickstart's 800 training chats.
- valid.jsonl: the prompts of its 100 held-out chats (the validation reward during training).
- test.jsonl: 400 more held-out chats, made by the quickstart's own generator (same seed: its recipes continue
  the quickstart's sequence, none repeats a training or validation recipe); the example's reported numbers are
  measured on these, which neither training nor its validation saw.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "quickstart"
TEST = 400


def prompts_from(chats: list[dict]) -> list[dict]:
    out = []
    for chat in chats:
        *prompt, reply = chat["messages"]
        out.append({"messages": prompt, "answer": json.loads(reply["content"])})
    return out


def quickstart_generator():
    spec = importlib.util.spec_from_file_location("quickstart_make_data", QUICKSTART / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    chats = {split: [json.loads(line) for line in (QUICKSTART / f"{split}.jsonl").read_text(encoding="utf-8")
                     .splitlines()] for split in ("train", "valid")}
    gen = quickstart_generator()
    train, held_out = gen.make_split(len(chats["train"]), len(chats["valid"]) + TEST, seed=0)
    # the quickstart's own split is the start of this one: the same recipes, in the same order
    assert train == chats["train"] and held_out[:len(chats["valid"])] == chats["valid"], "quickstart data changed"
    for name, rows in (("train.jsonl", prompts_from(chats["train"])), ("valid.jsonl", prompts_from(chats["valid"])),
                       ("test.jsonl", held_out[len(chats["valid"]):])):
        with open(args.out / name, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"{args.out / name}: {len(rows)} {'chats' if name == 'test.jsonl' else 'prompts'}")


if __name__ == "__main__":
    main()
