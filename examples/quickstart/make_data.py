"""Write the quickstart data set: recipe ingredient lines -> JSON list of generic ingredient names.

Each example is one OpenAI-format chat: a system prompt, a user message with a recipe title and its
ingredient lines ("2 cups all-purpose flour, sifted", "1 (14 oz) can diced tomatoes"), and the
assistant's answer, a JSON list of the generic names in the order given (["flour", "tomatoes"]).

Deterministic: the same seed writes the same files byte for byte. Validation recipes never repeat a
training recipe (same ingredients in the same order).

    python examples/quickstart/make_data.py            # writes train.jsonl and valid.jsonl here
    python examples/quickstart/make_data.py --train 800 --valid 100 --seed 0 --out DIR
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SYSTEM = ("You are a recipe assistant. Reply with a JSON list of the generic ingredient names in the recipe, "
          "in order.")

# generic name -> (ways it is written on an ingredient line, kind of quantity it takes).
# Kinds: "dry"/"liquid" (volume), "count" (a number of items), "weight", "can", "spice" (small volume).
INGREDIENTS: dict[str, tuple[list[str], str]] = {
    "flour": (["all-purpose flour", "whole wheat flour", "bread flour", "flour"], "dry"),
    "sugar": (["granulated sugar", "white sugar", "sugar", "caster sugar"], "dry"),
    "brown sugar": (["packed brown sugar", "light brown sugar", "dark brown sugar"], "dry"),
    "butter": (["unsalted butter", "salted butter", "butter", "cold butter"], "dry"),
    "eggs": (["large eggs", "eggs", "whole eggs"], "count"),
    "milk": (["whole milk", "milk", "skim milk", "warm milk"], "liquid"),
    "cream": (["heavy cream", "whipping cream", "double cream"], "liquid"),
    "salt": (["kosher salt", "sea salt", "salt", "fine salt"], "spice"),
    "black pepper": (["ground black pepper", "black pepper", "cracked black pepper"], "spice"),
    "baking soda": (["baking soda"], "spice"),
    "baking powder": (["baking powder"], "spice"),
    "vanilla": (["vanilla extract", "pure vanilla extract", "vanilla"], "spice"),
    "cinnamon": (["ground cinnamon", "cinnamon"], "spice"),
    "cumin": (["ground cumin", "cumin seeds"], "spice"),
    "paprika": (["smoked paprika", "sweet paprika", "paprika"], "spice"),
    "oregano": (["dried oregano", "fresh oregano"], "spice"),
    "garlic": (["garlic cloves", "cloves garlic", "garlic"], "count"),
    "onion": (["yellow onion", "red onion", "white onion", "onion"], "count"),
    "carrots": (["carrots", "large carrots", "baby carrots"], "count"),
    "celery": (["celery stalks", "stalks celery", "celery"], "count"),
    "potatoes": (["russet potatoes", "potatoes", "red potatoes", "yukon gold potatoes"], "weight"),
    "tomatoes": (["diced tomatoes", "crushed tomatoes", "whole peeled tomatoes"], "can"),
    "beans": (["black beans", "kidney beans", "pinto beans"], "can"),
    "chickpeas": (["chickpeas", "garbanzo beans"], "can"),
    "corn": (["sweet corn", "corn kernels", "whole kernel corn"], "can"),
    "chicken": (["boneless chicken breasts", "chicken thighs", "skinless chicken breast", "chicken"], "weight"),
    "beef": (["ground beef", "lean ground beef", "beef chuck"], "weight"),
    "pork": (["pork shoulder", "pork chops", "ground pork"], "weight"),
    "bacon": (["thick-cut bacon", "bacon", "smoked bacon"], "weight"),
    "rice": (["long-grain white rice", "basmati rice", "brown rice", "jasmine rice"], "dry"),
    "pasta": (["penne pasta", "dried spaghetti", "elbow macaroni"], "weight"),
    "cheese": (["shredded cheddar cheese", "grated parmesan cheese", "mozzarella cheese"], "dry"),
    "olive oil": (["extra-virgin olive oil", "olive oil"], "liquid"),
    "vegetable oil": (["vegetable oil", "canola oil"], "liquid"),
    "lemon juice": (["fresh lemon juice", "lemon juice"], "liquid"),
    "honey": (["honey", "raw honey", "clover honey"], "liquid"),
    "soy sauce": (["low-sodium soy sauce", "soy sauce", "light soy sauce"], "liquid"),
    "broth": (["chicken broth", "vegetable broth", "beef broth", "low-sodium chicken broth"], "liquid"),
    "spinach": (["baby spinach", "fresh spinach", "frozen spinach"], "weight"),
    "mushrooms": (["cremini mushrooms", "button mushrooms", "sliced mushrooms"], "weight"),
    "apples": (["granny smith apples", "apples", "tart apples"], "count"),
    "oats": (["rolled oats", "old-fashioned oats", "quick oats"], "dry"),
    "walnuts": (["chopped walnuts", "walnut halves", "walnuts"], "dry"),
    "chocolate chips": (["semisweet chocolate chips", "dark chocolate chips", "milk chocolate chips"], "dry"),
}

# Volumes and weights read "1/2 cup", "2 cups", "250 g": (singular, plural) units per kind of quantity.
FRACTIONS = ["1/4", "1/3", "1/2", "2/3", "3/4", "1"]
WHOLE = ["2", "3", "4", "1 1/2", "2 1/2"]
UNITS = {
    "dry": [("cup", "cups"), ("tablespoon", "tablespoons"), ("g", "g"), ("oz", "oz")],
    "liquid": [("cup", "cups"), ("tablespoon", "tablespoons"), ("ml", "ml"), ("teaspoon", "teaspoons")],
    "spice": [("teaspoon", "teaspoons"), ("tablespoon", "tablespoons"), ("pinch", "pinches")],
    "weight": [("lb", "lbs"), ("pound", "pounds"), ("g", "g"), ("oz", "oz")],
}
NOTES = {
    "dry": ["sifted", "softened", "melted", "divided", "at room temperature", "packed"],
    "liquid": ["warmed", "divided", "plus more for serving", "chilled"],
    "spice": ["to taste", "divided", "or to taste"],
    "count": ["chopped", "minced", "diced", "peeled and sliced", "finely chopped", "beaten", "halved"],
    "weight": ["cut into 1-inch pieces", "trimmed", "thinly sliced", "cubed", "rinsed", "cooked"],
    "can": ["drained", "drained and rinsed", "undrained", "with juices"],
}
DISHES = ["Soup", "Stew", "Bake", "Skillet", "Casserole", "Salad", "Muffins", "Cookies", "Pie", "Bowl",
          "Stir-Fry", "Pancakes", "Bread", "Chili", "Curry", "Tacos", "Pasta Bake", "Cake"]
STYLES = ["Easy", "Quick", "Classic", "Grandma's", "Weeknight", "Rustic", "Creamy", "Spicy", "Simple",
          "Homestyle", "Golden", "One-Pan"]


def ingredient_line(rng: random.Random, surface: str, kind: str) -> str:
    """One ingredient line as a recipe writes it: quantity, unit, name, optional note."""
    if kind == "count":
        line = f"{rng.randint(1, 6)} {surface}"
    elif kind == "can":
        size = rng.choice(["14 oz", "15 oz", "14.5 oz", "28 oz", "400 g"])
        line = f"{rng.choice(['1', '2'])} ({size}) can {surface}"
    else:
        singular, plural = rng.choice(UNITS[kind])
        if singular in ("g", "ml"):
            line = f"{rng.choice([50, 100, 125, 200, 250, 400, 500])} {singular} {surface}"
        elif singular == "oz":
            line = f"{rng.choice([4, 6, 8, 12, 16])} oz {surface}"
        elif rng.random() < 0.5:
            line = f"{rng.choice(FRACTIONS)} {singular} {surface}"
        else:
            line = f"{rng.choice(WHOLE)} {plural} {surface}"
    if rng.random() < 0.45:
        line += ", " + rng.choice(NOTES[kind])
    return line


def make_example(rng: random.Random, min_items: int = 2, max_items: int = 5) -> tuple[dict, tuple[str, ...]]:
    """A chat example and its key (the generic names in order) for de-duplication."""
    names = rng.sample(sorted(INGREDIENTS), rng.randint(min_items, max_items))
    lines = []
    for name in names:
        surfaces, kind = INGREDIENTS[name]
        lines.append(ingredient_line(rng, rng.choice(surfaces), kind))
    main = rng.choice(names[:2]).title()
    title = f"{rng.choice(STYLES)} {main} {rng.choice(DISHES)}" if rng.random() < 0.7 else f"{main} {rng.choice(DISHES)}"
    user = f"{title}\n\nIngredients:\n" + "\n".join(f"- {line}" for line in lines)
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": user},
        {"role": "assistant", "content": json.dumps(names)},
    ]
    return {"messages": messages}, tuple(names)


def make_split(n_train: int, n_valid: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train, valid, seen = [], [], set()
    while len(train) + len(valid) < n_train + n_valid:
        example, key = make_example(rng)
        if key in seen:
            continue
        seen.add(key)
        (train if len(train) < n_train else valid).append(example)
    return train, valid


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=800, help="training examples")
    parser.add_argument("--valid", type=int, default=100, help="validation examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=here, help="directory for train.jsonl and valid.jsonl")
    args = parser.parse_args()
    train, valid = make_split(args.train, args.valid, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "valid.jsonl", valid)
    print(f"wrote {len(train)} training and {len(valid)} validation examples to {args.out}")


if __name__ == "__main__":
    main()
