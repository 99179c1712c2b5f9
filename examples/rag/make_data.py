"""The RAG example's data: a fictional knowledge base, its passages indexed in Qdrant, and chats that ask a
question with the top-k retrieved passages in the prompt (OpenAI's cookbook on fine-tuning for RAG).

- The knowledge base is generated from made-up names (products, their makers and prices; people, their
  roles and offices; shop policies), so no model can know it: a right answer must come from the passages.
- Each passage is indexed by `tunekit.eval.retrieval.TextIndex` (BM25 sparse vectors in Qdrant's local mode,
  in memory or under --index DIR). Each question gets the top-k passages retrieved for it.
- The answer is the fact when a retrieved passage holds it, else "I don't know". Unanswerable questions
  are hard negatives: they name a product or person that is not in the base but shares words with one
  that is, or ask for a fact no passage gives, so the retrieved passages look relevant and are not.
- Held-out questions ask about entities no training question asks about (their passages are in the index
  all the same), so the tuned model must read the passages, not recall training answers.

    python examples/rag/make_data.py --seed 0   # writes the shipped train.jsonl, valid.jsonl and kb.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tunekit.eval.retrieval import TextIndex

HERE = Path(__file__).resolve().parent
IDK = "I don't know"
SYSTEM = f"Answer the question from the passages with a short phrase. If they do not say, reply: {IDK}."
TOP_K = 3

SYLLABLES = ["va", "lo", "qui", "zor", "ben", "tra", "mi", "ko", "rel", "das", "fen", "gul", "hap", "ix", "jor",
             "nel", "pra", "sul", "tov", "wen", "yal", "bri", "cor", "dun"]
KINDS = ["kettle", "lamp", "backpack", "bicycle", "speaker", "tent", "blender", "jacket", "desk", "camera"]
COLOURS = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange"]
ROLES = ["designer", "engineer", "accountant", "manager", "chemist", "translator", "driver", "teacher"]
CITIES = ["Oslo", "Lisbon", "Vienna", "Dublin", "Porto", "Krakow", "Lyon", "Bergen", "Riga", "Turin"]
TEAMS = ["sales", "support", "research", "logistics", "marketing", "finance"]


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def make_kb(rng: random.Random, n_products: int = 160, n_people: int = 120) -> tuple[list[dict], list[dict]]:
    """(products, people): each a dict of facts with unique names."""
    products, people, names = [], [], set()
    while len(products) < n_products:
        brand, kind = _word(rng, 2), rng.choice(KINDS)
        name = f"{brand} {kind}"
        if name in names:
            continue
        names.add(name)
        products.append({"name": name, "brand": brand, "kind": kind, "maker": _word(rng, 3),
                         "price": f"{rng.randint(5, 400)} euros", "colour": rng.choice(COLOURS),
                         "warranty": rng.choice(["1 year", "2 years", "3 years", "5 years"])})
    while len(people) < n_people:
        name = f"{_word(rng, 2)} {_word(rng, 2)}"
        if name in names:
            continue
        names.add(name)
        people.append({"name": name, "role": rng.choice(ROLES), "city": rng.choice(CITIES), "team": rng.choice(TEAMS)})
    return products, people


def passages(products: list[dict], people: list[dict]) -> list[dict]:
    """One passage per entity: {"id", "entity", "text"}."""
    out = []
    for p in products:
        out.append({"entity": p["name"], "text": f"The {p['name']} is made by {p['maker']}. It costs {p['price']} "
                                                  f"and comes in {p['colour']}. Its warranty is {p['warranty']}."})
    for p in people:
        out.append({"entity": p["name"], "text": f"{p['name']} works as {'an' if p['role'][0] in 'aeiou' else 'a'} {p['role']} in the {p['team']} team "
                                                  f"at the {p['city']} office."})
    return [{"id": i, **p} for i, p in enumerate(out)]


PRODUCT_Q = {"price": ["How much does the {name} cost?", "What is the price of the {name}?"],
             "colour": ["What colour is the {name}?", "Which colour does the {name} come in?"],
             "warranty": ["How long is the warranty of the {name}?", "What warranty does the {name} have?"],
             "maker": ["Who makes the {name}?", "Which company makes the {name}?"]}
PERSON_Q = {"role": ["What is the job of {name}?", "What does {name} work as?"],
            "city": ["Which office does {name} work at?", "In which city does {name} work?"],
            "team": ["Which team is {name} in?", "What team does {name} work in?"]}
MISSING_Q = {"product": ["How much does the {name} weigh?", "Where is the {name} made?",
                         "When was the {name} released?"],
             "person": ["How old is {name}?", "What is the phone number of {name}?", "When did {name} join?"]}


def answerable(rng: random.Random, entity: dict, is_product: bool) -> tuple[str, str, str]:
    """(question, entity name, answer) asking a fact the entity's passage holds."""
    table = PRODUCT_Q if is_product else PERSON_Q
    fact = rng.choice(list(table))
    return rng.choice(table[fact]).format(name=entity["name"]), entity["name"], entity[fact]


def unanswerable(rng: random.Random, entity: dict, is_product: bool, known: set[str]) -> tuple[str, None, str]:
    """A hard negative: a fact no passage gives about a real entity, or a real-looking entity not in the base
    (a known brand with another kind, a known first name with another surname)."""
    if rng.random() < 0.4:
        question = rng.choice(MISSING_Q["product" if is_product else "person"]).format(name=entity["name"])
        return question, None, IDK
    while True:
        if is_product:
            name = f"{entity['brand']} {rng.choice(KINDS)}"
            table = PRODUCT_Q
        else:
            name = f"{entity['name'].split()[0]} {_word(rng, 2)}"
            table = PERSON_Q
        if name not in known:
            break
    fact = rng.choice(list(table))
    return rng.choice(table[fact]).format(name=name), None, IDK


def chat(question: str, retrieved: list[dict], answer: str) -> dict:
    context = "\n".join(f"- {p['text']}" for p in retrieved)
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"Passages:\n{context}\n\nQuestion: {question}"},
                         {"role": "assistant", "content": answer}]}


def make_split(n_train: int, n_valid: int, seed: int = 0, index_path: str | Path | None = None,
               unanswerable_share: float = 0.35) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(train chats, held-out chats, passages, stats). The answer of each chat follows what its retrieved
    passages hold: a question whose passage is not retrieved is answered "I don't know"."""
    rng = random.Random(seed)
    products, people = make_kb(rng)
    kb = passages(products, people)
    known = {p["entity"] for p in kb}
    index = TextIndex.build([p["text"] for p in kb], kb, path=index_path, collection="passages")
    entities = [(e, True) for e in products] + [(e, False) for e in people]
    rng.shuffle(entities)
    cut = int(len(entities) * 0.75)  # held-out questions ask about the last quarter only
    pools = {"train": entities[:cut], "valid": entities[cut:]}
    out: dict[str, list[dict]] = {"train": [], "valid": []}
    stats = {"answerable": 0, "retrieved": 0}
    asked: set[str] = set()
    for split, n in (("train", n_train), ("valid", n_valid)):
        while len(out[split]) < n:
            entity, is_product = rng.choice(pools[split])
            if rng.random() < unanswerable_share:
                question, source, answer = unanswerable(rng, entity, is_product, known)
            else:
                question, source, answer = answerable(rng, entity, is_product)
            if question in asked:
                continue
            asked.add(question)
            retrieved = [payload for payload, _ in index.search(question, TOP_K)]
            if source is not None:
                stats["answerable"] += 1
                if any(p["entity"] == source for p in retrieved):
                    stats["retrieved"] += 1
                else:
                    answer = IDK  # the passages do not hold it: the honest reply
            out[split].append(chat(question, retrieved, answer))
    index.close()
    return out["train"], out["valid"], kb, stats


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=800)
    parser.add_argument("--valid", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--index", type=Path, default=None,
                        help="keep the Qdrant index in this folder (default: in memory)")
    args = parser.parse_args()
    train, valid, kb, stats = make_split(args.train, args.valid, args.seed, args.index)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "kb.jsonl", kb)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "valid.jsonl", valid)
    idk = sum(row["messages"][-1]["content"] == IDK for row in valid)
    print(f"{len(kb)} passages{' indexed in ' + str(args.index) if args.index else ''}; wrote {len(train)} "
          f"training and {len(valid)} held-out chats ({idk} held-out answers are \"{IDK}\"); the answer's "
          f"passage was retrieved for {stats['retrieved']} of {stats['answerable']} answerable questions")


if __name__ == "__main__":
    main()
