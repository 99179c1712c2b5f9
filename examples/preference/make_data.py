"""Write the preference example's pairs from the quickstart's recipes: the right ingredient list preferred
over a plausible wrong one.

Each pair is one OpenAI DPO line: the quickstart chat's system + user turns as `input`, its answer as the
preferred output and a corrupted copy as the non-preferred one. The corruptions are the mistakes a small
model makes on this task, one per pair, chosen by a seeded generator:

    drop_last   the last ingredient left out            ["flour", "sugar"] for ["flour", "sugar", "eggs"]
    swap        two neighbouring ingredients swapped     ["sugar", "flour", "eggs"]
    repeat      an ingredient written twice              ["flour", "flour", "sugar", "eggs"]
    written     an ingredient as the recipe writes it    ["all-purpose flour", "sugar", "eggs"]

Deterministic: the same seed writes the same files byte for byte. Pairs from the quickstart's train.jsonl go
to train.jsonl, those from its valid.jsonl (recipes never seen in training) to valid.jsonl.

    python examples/preference/make_data.py          # writes train.jsonl (800 pairs) and valid.jsonl (100)
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICKSTART = HERE.parent / "quickstart"
KINDS = ("drop_last", "swap", "repeat", "written")


def written_forms(user: str) -> list[str]:
    """The ingredient names as the recipe's lines write them ("2 cups all-purpose flour, sifted" ->
    "all-purpose flour"): the words after the quantity, before any comma."""
    forms = []
    for line in user.splitlines():
        if not line.startswith("- "):
            continue
        words = line[2:].split(",")[0].split()
        while words and (re.fullmatch(r"[\d/().]+|[\d/]+-[\d/]+", words[0]) or words[0] in UNITS):
            words = words[1:]
        forms.append(" ".join(words))
    return forms


UNITS = {"cup", "cups", "tablespoon", "tablespoons", "teaspoon", "teaspoons", "tbsp", "tsp", "g", "kg", "lb", "lbs",
         "oz", "ml", "l", "pinch", "pinches", "dash", "dashes", "can", "cans", "clove", "cloves", "large", "small",
         "medium", "whole", "pound", "pounds", "ounces", "ounce", "grams", "gram", "liters", "liter", "litre",
         "quart", "quarts", "pint", "pints", "stick", "sticks", "slice", "slices", "handful", "bunch", "sprig",
         "sprigs", "package", "packages", "jar", "jars", "head", "heads"}


def corrupt(answer: list[str], forms: list[str], rng: random.Random) -> tuple[str, list[str]]:
    """One plausible wrong answer (kind, list), always different from the right one."""
    for kind in rng.sample(KINDS, len(KINDS)):
        wrong = list(answer)
        if kind == "drop_last" and len(answer) >= 2:
            wrong = answer[:-1]
        elif kind == "swap" and len(answer) >= 2:
            i = rng.randrange(len(answer) - 1)
            wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
        elif kind == "repeat":
            i = rng.randrange(len(answer))
            wrong.insert(i, answer[i])
        elif kind == "written" and len(forms) == len(answer):
            changed = [i for i, (a, f) in enumerate(zip(answer, forms, strict=True)) if f and f != a]
            if changed:
                i = rng.choice(changed)
                wrong[i] = forms[i]
        if wrong != answer:
            return kind, wrong
    raise ValueError(f"no corruption applies to {answer}")


def pairs_from(chats: Path, rng: random.Random) -> list[dict]:
    out = []
    for line in chats.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        *prompt, reply = messages
        answer = json.loads(reply["content"])
        _, wrong = corrupt(answer, written_forms(prompt[-1]["content"]), rng)
        out.append({"input": {"messages": prompt},
                    "preferred_output": [{"role": "assistant", "content": reply["content"]}],
                    "non_preferred_output": [{"role": "assistant", "content": json.dumps(wrong)}]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE, help="directory for train.jsonl and valid.jsonl")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        rows = pairs_from(QUICKSTART / f"{split}.jsonl", rng)
        with open(args.out / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{args.out / f'{split}.jsonl'}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
