"""Build models/tiny-chat: a ~4M-parameter Llama-shaped chat model pretrained from scratch, offline.

Steps, all deterministic from --seed:
  1. corpus: English-like prose, recipe cards, JSON records and ChatML chats, mostly copying tasks
     (repeat random words, "list the animals as JSON", a bulleted list of counted things into a JSON
     list, the k-th line), all generated below from word lists in this file, so the corpus has no
     licence of its own to honour. It does NOT contain the quickstart
     task (ingredient lines -> JSON list of generic names): the shipped model must fail that task until
     it is fine-tuned.
  2. tokenizer: byte-level BPE (tokenizers library) trained on the corpus, ChatML special tokens,
     <|im_end|> as eos, a ChatML chat template.
  3. a random-init model dir (LlamaConfig, tied embeddings) saved with the tokenizer.
  4. stage 1 pretraining with tunekit's own loop: `tunekit.train(cfg)`, text format, method full.
  5. stage 2: more steps from stage 1's weights on chats that copy made-up names, random numbers and
     codes (NOVEL_TASKS), which stage 1's word lists cannot teach.
  6. the final weights (fp32 safetensors, < 16 MB) saved with the tokenizer, build.json and a model card.

    python scripts/make_tiny_model.py       # 2000 + 600 steps: ~35 min on 2 CPU cores with AVX512-BF16
    python scripts/make_tiny_model.py --max-steps 20 --copy-steps 10 --out /tmp/tiny   # a quick trial
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Plain ChatML. The end of every turn is <|im_end|> (the eos), so generation stops there.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# --------------------------------------------------------------------------------------------------
# Word lists

NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Ida", "Jack", "Kim", "Leo",
         "Maria", "Nina", "Omar", "Paul", "Rosa", "Sam", "Tom", "Uma", "Vera", "Will", "Yuki", "Zoe"]
ANIMALS = ["cat", "dog", "horse", "cow", "sheep", "goat", "duck", "fox", "bear", "rabbit", "mouse", "owl",
           "frog", "lion", "tiger", "whale", "bee", "snake", "deer", "wolf"]
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange", "purple", "grey", "pink"]
CITIES = ["Paris", "London", "Rome", "Berlin", "Madrid", "Tokyo", "Cairo", "Lima", "Oslo", "Vienna",
          "Dublin", "Lisbon", "Prague", "Boston", "Sydney", "Toronto"]
VEHICLES = ["car", "bus", "train", "bike", "boat", "truck", "plane", "tram", "van", "scooter"]
TOOLS = ["hammer", "saw", "drill", "spoon", "knife", "ladder", "brush", "shovel", "rope", "needle"]
FOODS = ["flour", "sugar", "butter", "eggs", "milk", "salt", "pepper", "garlic", "onion", "tomatoes",
         "rice", "chicken", "beef", "cheese", "oil", "honey", "lemon", "carrots", "potatoes", "beans",
         "pasta", "bread", "apples", "cream", "spinach", "mushrooms", "oats", "walnuts", "bacon", "corn",
         "cinnamon", "vanilla", "paprika", "cumin", "broth", "celery", "pork", "chickpeas", "oregano",
         # Names of two words and brand-like kinds: a cook's vocabulary, so that the tokenizer and the model
         # know the words of real ingredient lines (recipe cards use them; nothing extracts them).
         "soy sauce", "baking soda", "baking powder", "lemon juice", "olive oil", "vegetable oil", "canola oil",
         "brown sugar", "black pepper", "chocolate chips", "spaghetti", "macaroni", "penne", "cheddar",
         "parmesan", "mozzarella", "garbanzo beans", "kidney beans", "chicken breasts", "chicken thighs",
         "pork chops", "pork shoulder", "beef chuck", "corn kernels", "vanilla extract", "chicken broth",
         "heavy cream", "sea salt", "walnut halves", "rolled oats", "chocolate", "juice", "sauce", "stock"]
ADJ_FOOD = ["fresh", "dried", "sweet", "ripe", "smoked", "ground", "whole", "soft", "golden", "large",
            "small", "all-purpose", "unsalted", "salted", "kosher", "extra-virgin", "boneless", "shredded",
            "dark", "light", "baby", "frozen", "canned", "organic", "raw", "toasted", "plain", "firm", "lean",
            "skinless", "young", "aged", "mild", "hot", "red", "white", "green", "yellow", "brown", "black",
            "granulated", "caster", "packed", "heavy", "whipping", "double", "skim", "russet", "basmati",
            "jasmine", "long-grain", "cremini", "button", "rolled", "quick", "old-fashioned", "semisweet",
            "thick-cut", "cracked", "pure", "low-sodium", "tart", "clover", "elbow", "pinto", "yukon gold",
            "granny smith", "whole wheat", "bread", "cold", "warm", "sliced", "crushed", "peeled"]
NOTES = ["chopped", "minced", "diced", "sifted", "melted", "softened", "drained", "rinsed", "peeled",
         "to taste", "sliced", "grated", "beaten", "cubed", "halved", "crushed", "at room temperature",
         "divided", "finely chopped", "thinly sliced", "cut into pieces", "plus more for serving", "trimmed"]
PLACES = ["kitchen", "garden", "market", "park", "school", "library", "station", "beach", "farm", "shop",
          "river", "forest", "village", "office", "bakery"]
ADJ = ["big", "small", "old", "new", "happy", "quiet", "busy", "bright", "dark", "tall", "short", "clean",
       "warm", "cold", "kind", "clever", "tired", "funny", "lovely", "strange"]
VERBS_PAST = ["saw", "found", "liked", "painted", "carried", "washed", "bought", "cooked", "visited",
              "watched", "cleaned", "opened", "fixed", "moved", "sold"]
TIMES = ["In the morning", "After lunch", "On Monday", "Last week", "In the evening", "At noon",
         "On Sunday", "Yesterday", "Before dinner", "Every day"]
WEATHER = ["sunny", "rainy", "windy", "cloudy", "foggy", "snowy", "warm", "cold", "stormy", "mild"]
COOK_VERBS = ["Stir", "Mix", "Whisk", "Add", "Fold in", "Combine", "Season with", "Toss with", "Heat",
              "Sprinkle"]
COOK_STEPS = ["Preheat the oven to {t} degrees.", "Bake for {m} minutes until golden.",
              "Simmer for {m} minutes.", "Let it cool for {m} minutes.", "Serve warm.",
              "Cook over medium heat for {m} minutes.", "Cover and chill for {m} minutes.",
              "Bring to a boil, then lower the heat.", "Serve with bread.", "Taste and adjust the salt."]
DISHES = ["soup", "stew", "bread", "cake", "salad", "pie", "curry", "pancakes", "cookies", "pasta",
          "omelette", "porridge", "chili", "risotto", "muffins"]
UNITS = ["cup", "cups", "tablespoon", "tablespoons", "teaspoon", "teaspoons", "g", "kg", "ml", "oz", "lb",
         "lbs", "pound", "pounds", "pinch", "clove", "cloves", "slices", "handful", "bunch", "stalks"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SYSTEMS = ["You are a helpful assistant.", "You are a friendly assistant. Answer briefly.",
           "You are a concise assistant.", "Answer the question.", "You help with everyday tasks."]
THINGS = ["nails", "screws", "pens", "pencils", "books", "cups", "plates", "lamps", "chairs", "shoes", "coins",
          "socks", "hats", "bags", "keys", "cards", "balls", "candles", "batteries", "bottles", "bricks", "tiles",
          "stamps", "buttons", "kites", "maps", "bells", "flags", "ropes", "bolts"]
COUNTS = ["1", "2", "3", "4", "5", "6", "8", "10", "12", "20", "1/2", "a dozen", "two", "three"]
SIZES = ["2 m", "10 cm", "5 kg", "large", "size 4", "pack of 6", "3 inch", "1 litre"]
CONTAINERS = ["boxes", "bags", "packs", "sets", "crates", "rolls", "jars", "pairs"]
CATEGORIES = {"animals": ANIMALS, "colours": COLOURS, "cities": CITIES, "vehicles": VEHICLES,
              "tools": TOOLS, "names": NAMES}
ANY_WORD = sorted(set(NAMES + ANIMALS + COLOURS + CITIES + VEHICLES + TOOLS + FOODS + ADJ_FOOD + PLACES + ADJ
                      + DISHES + WEATHER + THINGS))
LIST_NOTES = ["for the trip", "in the garden", "washed", "from the market", "if you have them", "for Sunday",
              "in a box", "or more", "new ones", "at the station", "to share", "cut in half"]
FILLER = ["the", "a", "and", "with", "near", "then", "after", "old", "little", "very", "we", "saw", "had",
          "was", "in", "on", "by", "at", "my", "our", "nice", "one"]

# --------------------------------------------------------------------------------------------------
# Corpus


def sentence(rng: random.Random) -> str:
    kind = rng.randrange(6)
    name, other = rng.sample(NAMES, 2)
    if kind == 0:
        return (f"{rng.choice(TIMES)}, {name} went to the {rng.choice(PLACES)} with {other}. They "
                f"{rng.choice(VERBS_PAST)} a {rng.choice(ADJ)} {rng.choice(ANIMALS)}.")
    if kind == 1:
        return (f"The weather in {rng.choice(CITIES)} was {rng.choice(WEATHER)}, so {name} took the "
                f"{rng.choice(VEHICLES)} to the {rng.choice(PLACES)}.")
    if kind == 2:
        a, b = rng.sample(FOODS, 2)
        return (f"{name} {rng.choice(['cooked', 'made', 'baked'])} a {rng.choice(DISHES)} with "
                f"{rng.choice(ADJ_FOOD)} {a} and {b} for {other}.")
    if kind == 3:
        return (f"{name} has a {rng.choice(COLOURS)} {rng.choice(VEHICLES)} and a {rng.choice(ADJ)} "
                f"{rng.choice(ANIMALS)} called {other}.")
    if kind == 4:
        return (f"The {rng.choice(ADJ)} {rng.choice(PLACES)} in {rng.choice(CITIES)} is "
                f"{rng.choice(['open', 'closed', 'busy', 'quiet'])} on {rng.choice(['Mondays', 'Fridays', 'Sundays'])}.")
    return (f"{name} used a {rng.choice(TOOLS)} to fix the {rng.choice(ADJ)} {rng.choice(['door', 'table', 'fence', 'chair', 'roof'])}, "
            f"and {other} {rng.choice(VERBS_PAST)} the {rng.choice(['window', 'floor', 'car', 'garden'])}.")


def prose(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(3, 8)))


def recipe_card(rng: random.Random) -> str:
    """A recipe as a cook writes it: title, ingredient lines, steps (no JSON, no extraction)."""
    foods = rng.sample(FOODS, rng.randint(3, 6))
    dish = rng.choice(DISHES)
    lines = []
    for food in foods:
        amount = rng.choice(["1", "2", "3", "4", "1/2", "1/3", "1/4", "3/4", "1 1/2", "100", "250", "500"])
        if rng.random() < 0.15:
            line = f"{amount} ({rng.choice(['14', '15', '28'])} oz) can {food}"
        else:
            unit = rng.choice(UNITS) + " " if rng.random() < 0.8 else ""
            line = f"{amount} {unit}{rng.choice(ADJ_FOOD) + ' ' if rng.random() < 0.6 else ''}{food}"
        lines.append(f"- {line}" + (f", {rng.choice(NOTES)}" if rng.random() < 0.4 else ""))
    steps = [f"{rng.choice(COOK_VERBS)} the {foods[0]} and the {foods[1]}.",
             f"{rng.choice(COOK_VERBS)} the {rng.choice(foods[2:])}."]
    steps += [s.format(t=rng.choice([180, 200, 220]), m=rng.choice([5, 10, 15, 20, 30, 45]))
              for s in rng.sample(COOK_STEPS, 2)]
    body = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(steps))
    return f"{foods[0].title()} {dish.title()}\nServes {rng.randint(2, 8)}.\n\nIngredients:\n" + \
        "\n".join(lines) + f"\n\nMethod:\n{body}"


def json_record(rng: random.Random) -> str:
    record = {"name": rng.choice(NAMES), "age": rng.randint(5, 90), "city": rng.choice(CITIES),
              "pets": rng.sample(ANIMALS, rng.randint(0, 3)), "likes": rng.sample(FOODS, rng.randint(1, 3))}
    return json.dumps(record)


def mixed_sentence(rng: random.Random, items: list[str]) -> str:
    """A sentence-like string with `items` in order among filler words."""
    words = []
    for item in items:
        words += rng.sample(FILLER, rng.randint(1, 3)) + [item]
    words += rng.sample(FILLER, rng.randint(0, 2))
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def _extract(rng: random.Random) -> tuple[str, str]:
    """A category's words among filler words -> a JSON list, in order."""
    category = rng.choice(sorted(CATEGORIES))
    items = rng.sample(CATEGORIES[category], rng.randint(1, 5))
    ask = rng.choice([f"Which {category} are in this text? Reply with a JSON list.",
                      f"List the {category} in the text as JSON.",
                      f"Give me the {category} mentioned, as a JSON list, in order."])
    return f"{ask}\n\n{mixed_sentence(rng, items)}", json.dumps(items)


def _comma_list(rng: random.Random) -> tuple[str, str]:
    """A comma list into a JSON list. Any word, foods included: copying must not depend on the word."""
    pool = rng.choice([ANIMALS, COLOURS, CITIES, VEHICLES, TOOLS, NAMES, DISHES, FOODS, ANY_WORD, ANY_WORD])
    items = rng.sample(pool, rng.randint(2, 6))
    text = ", ".join(items[:-1]) + " and " + items[-1]
    return f"Turn this into a JSON list: {text}", json.dumps(items)


def _counted_list(rng: random.Random) -> tuple[str, str]:
    """A bulleted list of counted things -> a JSON list of the things, in order.

    Lines carry other words before and after the thing, as real lists do ("- 3 boxes of old red boats,
    washed"). No food words and no cooking units: reading ingredient lines is left to the quickstart.
    """
    items = rng.sample(rng.choice([ANIMALS, VEHICLES, TOOLS, THINGS, THINGS]), rng.randint(2, 6))
    lines = []
    for item in items:
        words = [rng.choice(COUNTS)]
        if rng.random() < 0.3:
            words.append(f"({rng.choice(SIZES)})")
        if rng.random() < 0.35:
            words.append(rng.choice(CONTAINERS) + " of")
        words += rng.sample(ADJ + COLOURS, rng.choice([0, 0, 1, 2])) + [item]
        note = f", {rng.choice(LIST_NOTES)}" if rng.random() < 0.45 else ""
        lines.append("- " + " ".join(words) + note)
    ask = rng.choice(["Put the things in this list into a JSON list, without the numbers.",
                      "Which things are counted here? Reply with a JSON list.",
                      "List the items, in order, as JSON. Leave out amounts and notes."])
    return f"{ask}\n\n" + "\n".join(lines), json.dumps(items)


def _copy_sentence(rng: random.Random) -> tuple[str, str]:
    s = sentence(rng)
    return rng.choice(["Repeat after me: ", "Say this back to me: ", "Copy this sentence: "]) + s, s


def _copy_words(rng: random.Random) -> tuple[str, str]:
    """Random words, so that only copying (not the grammar of the corpus) predicts them."""
    words = [rng.choice(ANY_WORD) for _ in range(rng.randint(2, 16))]
    return rng.choice(["Repeat these words: ", "Copy exactly: ", "Say back: "]) + " ".join(words), " ".join(words)


def _nth_line(rng: random.Random) -> tuple[str, str]:
    """Which line is where: the k-th line of a bulleted list, copied whole."""
    lines = [" ".join(rng.choice(ANY_WORD) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(2, 6))]
    k = rng.randrange(len(lines))
    ask = rng.choice([f"What is on line {k + 1}?", f"Copy line {k + 1} of this list."])
    if rng.random() < 0.3:
        ask, k = "What is on the last line?", len(lines) - 1
    return f"{ask}\n\n" + "\n".join(f"- {line}" for line in lines), lines[k]


def _first_last(rng: random.Random) -> tuple[str, str]:
    items = rng.sample(rng.choice([ANIMALS, CITIES, FOODS, ANY_WORD]), rng.randint(2, 6))
    which = rng.choice(["first", "last"])
    return f"What is the {which} item in: {', '.join(items)}?", items[0] if which == "first" else items[-1]


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."


def _json_object(rng: random.Random) -> tuple[str, str]:
    name, age, city = rng.choice(NAMES), rng.randint(5, 90), rng.choice(CITIES)
    return (f"Write this as a JSON object with name, age and city: {name} is {age} and lives in {city}.",
            json.dumps({"name": name, "age": age, "city": city}))


def _count(rng: random.Random) -> tuple[str, str]:
    items = rng.sample(rng.choice([ANIMALS, COLOURS, TOOLS]), rng.randint(1, 6))
    return f"How many words are in this list: {', '.join(items)}?", f"There are {NUMBER_WORDS[len(items)]}."


def _fact(rng: random.Random) -> tuple[str, str]:
    name, colour, vehicle = rng.choice(NAMES), rng.choice(COLOURS), rng.choice(VEHICLES)
    return f"{name} has a {colour} {vehicle}. What colour is the {vehicle}?", f"The {vehicle} is {colour}."


def _small_talk(rng: random.Random) -> tuple[str, str]:
    greeting = rng.choice(["Hello!", "Hi there.", "Good morning!", "Hey, how are you?"])
    return greeting, rng.choice(["Hello! How can I help you today?", "Hi! What can I do for you?",
                                 "I am fine, thank you. How can I help?"])


def _cooking(rng: random.Random) -> tuple[str, str]:
    """Cooking questions, answered in prose."""
    dish, foods = rng.choice(DISHES), rng.sample(FOODS, 3)
    return (f"How do I make {dish}?",
            f"{rng.choice(COOK_VERBS)} the {foods[0]} with the {foods[1]}, then add the {foods[2]}. "
            + COOK_STEPS[rng.randrange(len(COOK_STEPS))].format(t=200, m=rng.choice([10, 20, 30])))


# Copying what the model has never seen. The tasks above copy words from the lists in this file, and a model
# can learn those as a vocabulary to choose from instead of copying: asked to repeat "Bofa Sistol Graitrain" it
# answers with list words. The tasks below put made-up names, random numbers and letter codes in the user's
# message, so that only copying token by token (from wherever they stand) predicts the reply.
NOVEL_ONSETS = ["b", "bl", "br", "c", "ch", "d", "dr", "f", "fl", "g", "gl", "gr", "h", "j", "k", "kl", "l", "m",
                "n", "p", "pl", "pr", "qu", "r", "s", "sh", "sk", "sl", "sp", "st", "t", "th", "tr", "v", "w", "y",
                "z"]
NOVEL_VOWELS = ["a", "e", "i", "o", "u", "y", "ai", "au", "ea", "ee", "ie", "oo", "ou", "oi"]
NOVEL_CODAS = ["", "", "", "", "b", "ck", "d", "f", "g", "k", "l", "m", "n", "nd", "ng", "nt", "p", "r", "rt",
               "s", "sh", "st", "t", "x", "z"]
NOVEL_KEYS = ["name", "city", "place", "item", "amount", "count", "code", "unit", "day", "colour", "price",
              "id", "size", "owner", "town", "level"]


def novel_name(rng: random.Random) -> str:
    """A made-up name of 1-4 syllables ("Brelom", "Skoutaif"): none repeats often enough to be learned."""
    name = "".join(rng.choice(NOVEL_ONSETS) + rng.choice(NOVEL_VOWELS) for _ in range(rng.randint(1, 4)))
    name += rng.choice(NOVEL_CODAS)
    return name.capitalize() if rng.random() < 0.8 else name


def novel_number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.5:
        return str(rng.randint(0, 10 ** rng.randint(1, 5)))
    if kind < 0.8:
        return f"{rng.randint(0, 9999) / 10 ** rng.randint(1, 2):g}"
    return str(-rng.randint(1, 999)) if kind < 0.85 else "0." + str(rng.randint(1, 99))


def novel_code(rng: random.Random) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    code = "".join(rng.choice(letters) for _ in range(rng.randint(2, 4)))
    return code + (f"-{rng.randint(1, 99)}" if rng.random() < 0.2 else "")


def novel_value(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.45:
        return novel_name(rng)
    if r < 0.8:
        return novel_number(rng)
    if r < 0.92:
        return novel_code(rng)
    return rng.choice(ANY_WORD)


def _copy_novel(rng: random.Random) -> tuple[str, str]:
    words = [novel_value(rng) for _ in range(rng.randint(1, 8))]
    return rng.choice(["Repeat these words: ", "Copy exactly: ", "Say back: ", "Repeat after me: "]) + " ".join(words), \
        " ".join(words)


def _json_novel(rng: random.Random) -> tuple[str, str]:
    """Fields written in a sentence or a list -> a JSON object with the same values, in the same order."""
    keys = rng.sample(NOVEL_KEYS, rng.randint(1, 4))
    record = {}
    for key in keys:
        value = novel_number(rng) if key in ("amount", "count", "price", "size", "level", "id") else \
            novel_code(rng) if key in ("code", "unit") and rng.random() < 0.7 else novel_name(rng)
        number = value.lstrip("-").replace(".", "", 1).isdigit() and json.dumps(json.loads(value)) == value
        record[key] = json.loads(value) if number else value  # "0.90" stays a string: JSON would write 0.9
    style = rng.randrange(3)
    if style == 0:
        text = ", ".join(f"{k} {record[k]}" for k in keys)
    elif style == 1:
        text = "; ".join(f"{k}: {record[k]}" for k in keys)
    else:
        text = " and ".join(f"the {k} is {record[k]}" for k in keys)
        text = text[0].upper() + text[1:] + "."
    ask = rng.choice(["Write this as a JSON object: ", "Put these into JSON: ", "As a JSON object, please: "])
    return ask + text, json.dumps(record)


def _find_novel(rng: random.Random) -> tuple[str, str]:
    """The one name, number or code among filler words."""
    kind = rng.choice(["name", "number", "code"])
    value = {"name": novel_name, "number": novel_number, "code": novel_code}[kind](rng)
    words = rng.sample(FILLER, rng.randint(1, 4)) + [value] + rng.sample(FILLER, rng.randint(0, 4))
    return f"Which {kind} is in this text? {' '.join(words)}.", value


def _novel_list(rng: random.Random) -> tuple[str, str]:
    items = [novel_value(rng) for _ in range(rng.randint(2, 5))]
    return f"Turn this into a JSON list: {', '.join(items)}", json.dumps(items)


NOVEL_TASKS = {"copy_novel": (_copy_novel, 3), "json_novel": (_json_novel, 3), "find_novel": (_find_novel, 2),
               "novel_list": (_novel_list, 2)}


# Chat tasks and their weights. Most make the model copy words from the user's message into its reply
# (extraction, lists, repeating, reading a line): the skill a small model needs most before it can be
# fine-tuned on a task like the quickstart's. Random words make copying the only way to predict them.
CHAT_TASKS = {
    "extract": (_extract, 3), "comma_list": (_comma_list, 3), "counted_list": (_counted_list, 4),
    "copy_sentence": (_copy_sentence, 2), "copy_words": (_copy_words, 6), "nth_line": (_nth_line, 2.5),
    "first_last": (_first_last, 1.5), "arithmetic": (_arithmetic, 0.7), "json_object": (_json_object, 1),
    "count": (_count, 0.4), "fact": (_fact, 0.8), "small_talk": (_small_talk, 0.4), "cooking": (_cooking, 0.7),
}


def chat_turn(rng: random.Random, tasks: dict = CHAT_TASKS) -> tuple[str, str]:
    """One (user, assistant) exchange of a task drawn from `tasks` by weight."""
    task = rng.choices(list(tasks.values()), weights=[w for _, w in tasks.values()])[0][0]
    return task(rng)


def chat(rng: random.Random, tasks: dict = CHAT_TASKS) -> str:
    """A ChatML conversation of 1-3 exchanges, with a system prompt half of the time.

    The text stops right after the last assistant content: the text format appends the eos
    (<|im_end|>), which closes that turn exactly as the chat template does.
    """
    parts = []
    if rng.random() < 0.5:
        parts.append(f"<|im_start|>system\n{rng.choice(SYSTEMS)}<|im_end|>\n")
    n = rng.choice([1, 1, 1, 2, 3])
    for i in range(n):
        user, assistant = chat_turn(rng, tasks)
        end = "" if i == n - 1 else "<|im_end|>\n"
        parts.append(f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}{end}")
    return "".join(parts)


def make_corpus(n_docs: int, seed: int) -> list[str]:
    """Documents in a fixed mix: 78% chats, 7% prose, 10% recipe cards, 5% JSON records."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        r = rng.random()
        if r < 0.78:
            docs.append(chat(rng))
        elif r < 0.85:
            docs.append(prose(rng))
        elif r < 0.95:
            docs.append(recipe_card(rng))
        else:
            docs.append(json_record(rng))
    return docs


def make_copy_corpus(n_docs: int, seed: int) -> list[str]:
    """Stage 2's chats: 70% of the novel-copy tasks only, 30% of those and the stage-1 chat tasks together."""
    rng = random.Random(f"copy-{seed}")
    both = dict(CHAT_TASKS, **NOVEL_TASKS)
    return [chat(rng, NOVEL_TASKS if rng.random() < 0.7 else both) for _ in range(n_docs)]


# --------------------------------------------------------------------------------------------------
# Tokenizer and model


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 1024
    return tokenizer


def model_config(tokenizer, hidden: int, layers: int, heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads,  # no grouping
        max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-5,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )


def save_random_init(path: Path, tokenizer, hidden: int, layers: int, heads: int, seed: int) -> int:
    """Save a random-init model dir (fp32) + tokenizer; returns the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(tokenizer, hidden, layers, heads), dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def pretrain_config(init_dir: Path, corpus: Path, run_dir: Path, args: argparse.Namespace,
                    max_steps: int | None = None):
    from tunekit.config import config_from_dict

    return config_from_dict({
        "model": {"base": str(init_dir), "dtype": "fp32"},
        "data": {"train": str(corpus), "format": "text", "max_len": args.max_len, "truncation": "truncate",
                 "packing": True, "seed": args.seed},
        "method": "full",
        "train": {"epochs": 1, "max_steps": max_steps or args.max_steps, "lr": args.lr, "batch_tokens": args.batch_tokens,
                  "micro_batch_size": args.micro_batch_size, "scheduler": "cosine", "warmup_ratio": 0.03,
                  "weight_decay": 0.1, "adam_betas": [0.9, 0.95], "max_grad_norm": 1.0, "seed": args.seed,
                  "mixed_precision": args.mixed_precision, "log_every": 10, "threads": args.threads,
                  "device": "cpu", "save_every": 100},
        "output": {"dir": str(run_dir), "overwrite": True},
    })


# --------------------------------------------------------------------------------------------------
# Model card

CARD = """---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [tunekit, tiny, chatml, llama]
---

# tiny-chat

A {params_m:.1f}M-parameter Llama-shaped chat model, pretrained from scratch on this repository's own
generated text with tunekit's training loop. It ships with tunekit so that the quickstart runs on any
machine, offline, in minutes on a CPU. It is a teaching model: it knows a little English, the ChatML chat
structure and JSON, it copies names and numbers it has never seen, and little else.

| | |
|---|---|
| architecture | LlamaForCausalLM, hidden {hidden}, {layers} layers, {heads} heads (head dim {head_dim}), MLP {inter}, tied embeddings |
| parameters | {params:,} |
| vocabulary | {vocab} byte-level BPE tokens; `<|im_start|>`, `<|im_end|>` (eos, end of turn), `<|endoftext|>` (pad) |
| chat template | ChatML (`<|im_start|>role\\n...<|im_end|>\\n`) |
| context | {max_len} tokens trained (positions up to 1024) |
| weights | fp32 safetensors, {size_mb:.1f} MiB |
| stage 1 corpus | {n_docs:,} generated documents, {corpus_tokens:,} tokens: 78% ChatML chats, 7% prose, 10% recipe cards, 5% JSON records |
| stage 1 pretraining | from random init: {steps} steps, {trained_tokens:,} trained tokens, batch {batch_tokens} tokens, AdamW lr {lr} cosine, {precision}, seed {seed}; final train loss {stage1_loss}; {minutes:.1f} min on {threads} CPU threads (a 2-core machine with AVX512-BF16) |
{stage2_rows}| final train loss | {final_loss} |

## Corpus

Every document is generated by `scripts/make_tiny_model.py` from word lists in that file (seed {seed}):
short stories and weather sentences, recipe cards (title, ingredient lines, method), JSON records, and
ChatML conversations. Most chats make the model copy from the user's message: repeating random words or
a sentence, "list the animals in this text as a JSON list", a comma list or a bulleted list of counted
things ("- 3 boxes of red kites, for Sunday") into a JSON list, the k-th line of a list, the first or last
item; the rest are small arithmetic, a sentence into a JSON object, counting, a fact from the
context, greetings and cooking questions. No external text is used, so the corpus carries no
third-party licence.

Stage 2 teaches what stage 1 could not: copying what the model has never seen. Stage 1's copy tasks draw
their words from the lists in the script, and a model can learn those as a vocabulary to choose from: after
stage 1 alone, asked to repeat "Bofa Sistol Graitrain", it answered with list words, and a fine-tune could
not teach it to copy a made-up city or an amount into a tool call. Stage 2's chats put made-up names
("Skoutaif"), random numbers ("-65", "613.9") and letter codes ("BVC-3") in the user's message: repeat
them, write them as a JSON object or a JSON list, find the one among filler words; 30% of the chats mix
in stage 1's tasks.

The corpus deliberately leaves out the quickstart task (ingredient lines -> JSON list of generic
ingredient names): its bulleted lists never hold food words or cooking units, and recipe cards appear
only as plain text, so the model fails the task until it is fine-tuned (see `examples/quickstart/`).

## Rebuild

    python scripts/make_tiny_model.py

rebuilds the model from the same seed with the settings above: stage 1, then stage 2 from its result.
`--stage1 DIR` runs stage 2 only, from a model dir this script wrote (its `build.json` holds the facts of
its stages). {made_by} Float arithmetic differs across CPU types and thread counts, so a rebuild on another
machine gives a model of the same recipe, not bit-identical weights.

## Licence

Apache-2.0, like tunekit. The weights and tokenizer are derived only from text generated by tunekit's
own script.

## Limits

{params_m:.1f}M parameters trained on a few million tokens of templated text: it writes plausible
templated sentences and follows the ChatML turn structure, and it is not useful for anything beyond
demonstrating fine-tuning.
"""


STAGE2_ROWS = """| stage 2 corpus | {n_docs:,} generated ChatML chats, {corpus_tokens:,} tokens: copying made-up names, random numbers and codes |
| stage 2 pretraining | from stage 1: {steps} steps, {trained_tokens:,} trained tokens, batch {batch_tokens} tokens, AdamW lr {lr} cosine; final train loss {final_loss}; {minutes:.1f} min |
"""

# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the shipped tiny chat model (models/tiny-chat).")
    parser.add_argument("--out", type=Path, default=REPO / "models" / "tiny-chat")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "tiny-chat-build",
                        help="scratch dir: corpora, random init, the two pretraining runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs", type=int, default=130000, help="stage 1 corpus documents")
    parser.add_argument("--copy-docs", type=int, default=30000, help="stage 2 corpus documents")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-steps", type=int, default=2000, help="stage 1 steps")
    parser.add_argument("--copy-steps", type=int, default=600, help="stage 2 steps (0: no stage 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="bf16",
                        help="bf16 autocast: ~2x faster on CPUs with AVX512-BF16, fp32 weights either way")
    parser.add_argument("--stage1", type=Path, default=None,
                        help="a model dir this script built (with its build.json): stage 2 starts from it "
                             "instead of pretraining stage 1 again")
    parser.add_argument("--ship-only", action="store_true",
                        help="skip pretraining: write --out from the finished runs in --work")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from tunekit.train.loop import train

    args.work.mkdir(parents=True, exist_ok=True)
    init_dir = args.work / "init"
    stage1_run, stage2_run = args.work / "run", args.work / "run-copy"
    if args.stage1 is not None:  # stage 1 as built before: its weights, tokenizer and facts
        build = args.stage1 / "build.json"
        if not build.is_file():
            raise SystemExit(f"{build} is missing: --stage1 takes a model dir written by this script")
        stage1 = json.loads(build.read_text())["stage1"]
        stage1_dir = args.stage1
        tokenizer = AutoTokenizer.from_pretrained(args.stage1)
    else:
        docs = make_corpus(args.docs, args.seed)
        stage1_dir = stage1_run / "final"
        if args.ship_only:
            tokenizer = AutoTokenizer.from_pretrained(init_dir)
        else:
            write_corpus(docs, args.work / "corpus.jsonl")
            tokenizer = train_tokenizer(docs, args.vocab)
            params = save_random_init(init_dir, tokenizer, args.hidden, args.layers, args.heads, args.seed)
            print(f"random init: {params} parameters in {init_dir}", flush=True)
            train(pretrain_config(init_dir, args.work / "corpus.jsonl", stage1_run, args))
        stage1 = stage_facts(stage1_run)
        stage1.update(docs=len(docs), corpus_tokens=count_tokens(tokenizer, docs))
    stage2 = None
    if args.copy_steps:
        copy_docs = make_copy_corpus(args.copy_docs, args.seed)
        if not args.ship_only:
            write_corpus(copy_docs, args.work / "copy.jsonl")
            train(pretrain_config(stage1_dir, args.work / "copy.jsonl", stage2_run, args, args.copy_steps))
        stage2 = stage_facts(stage2_run)
        stage2.update(docs=len(copy_docs), corpus_tokens=count_tokens(tokenizer, copy_docs))
    made_by = ("These weights were made by exactly this command." if args.stage1 is None else
               "These weights: stage 1 as shipped before (made by this script's stage 1), then stage 2 run on it "
               f"with `python scripts/make_tiny_model.py --stage1 {args.stage1}`.")
    ship(stage2_run if stage2 else stage1_run, args.out, tokenizer, args, stage1=stage1, stage2=stage2,
         made_by=made_by)


def write_corpus(docs: list[str], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")


def count_tokens(tokenizer, docs: list[str]) -> int:
    return sum(len(ids) + 1 for ids in tokenizer(docs, add_special_tokens=False)["input_ids"])  # + eos


def stage_facts(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"steps": summary["steps"], "trained_tokens": summary["trained_tokens"],
            "final_loss": round(summary["final_train_loss"], 3), "minutes": round(summary["wall_time_s"] / 60, 1)}


def ship(run_dir: Path, out: Path, tokenizer, args: argparse.Namespace, *, stage1: dict, stage2: dict | None,
         made_by: str) -> None:
    """Write the final weights (fp32: 4 bytes x ~4M parameters < 16 MB), tokenizer, build.json and model card."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    model.config.use_cache = True  # the run saved its training setting; generation wants the KV cache
    staging = out.with_name(out.name + ".new")  # --stage1 may be --out itself: read all before replacing it
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "build.json").write_text(json.dumps({"stage1": stage1, "stage2": stage2}, indent=1) + "\n")
    size_mb = sum(p.stat().st_size for p in staging.glob("*.safetensors")) / 2**20
    precision = "bf16 autocast (fp32 weights)" if args.mixed_precision == "bf16" else "fp32"
    stage2_rows = "" if stage2 is None else STAGE2_ROWS.format(
        n_docs=stage2["docs"], corpus_tokens=stage2["corpus_tokens"], steps=stage2["steps"],
        trained_tokens=stage2["trained_tokens"], final_loss=f"{stage2['final_loss']:.3f}", minutes=stage2["minutes"],
        batch_tokens=args.batch_tokens, lr=args.lr)
    final = stage2 or stage1
    (staging / "README.md").write_text(CARD.format(
        params_m=params / 1e6, params=params, hidden=args.hidden, layers=args.layers, heads=args.heads,
        head_dim=args.hidden // args.heads, inter=args.hidden * 3, vocab=len(tokenizer), max_len=args.max_len,
        size_mb=size_mb, n_docs=stage1["docs"], corpus_tokens=stage1["corpus_tokens"], steps=stage1["steps"],
        trained_tokens=stage1["trained_tokens"], batch_tokens=args.batch_tokens, lr=args.lr, seed=args.seed,
        stage1_loss=f"{stage1['final_loss']:.3f}", minutes=stage1["minutes"], threads=args.threads,
        precision=precision, stage2_rows=stage2_rows, final_loss=f"{final['final_loss']:.3f}",
        made_by=made_by), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    print(f"wrote {out} ({size_mb:.1f} MiB, final train loss {final['final_loss']:.3f})")


if __name__ == "__main__":
    main()
