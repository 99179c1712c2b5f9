"""Write the function-calling example's chats: train.jsonl (full conversations) and valid.jsonl (held out).

Each training chat: a user asks; the assistant calls one tool, or two in parallel (`tool_calls` with JSON
arguments); each tool answers (a "tool" message with the result of tools.py's function); the assistant
replies from the results. Some questions need no tool and get a direct reply. Every chat declares the four
tools in `tools`.

The held-out file stops at the decision the evaluation scores: the first assistant message (its tool calls,
or its direct reply). No held-out question is asked in the training file.

    python examples/function-calling/make_data.py --seed 0   # writes the shipped files byte for byte
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tools as T  # noqa: E402  (the example's own module, beside this file)

SYSTEM = "You are a helpful assistant. Call a tool when the question needs one."
# Argument values come from large pools (made-up place and person names, random amounts), so that no value is
# frequent in training: the only way to get a call's arguments right is to copy them from the question, where
# they appear exactly as in the arguments (same spelling, same number form) and in the same order.
CITIES = ["Paris", "Rome", "Oslo", "Lisbon", "Madrid", "Berlin", "Vienna", "Prague", "Dublin", "Athens",
          "Cairo", "Lima", "Quito", "Tokyo", "Seoul", "Delhi", "Sydney", "Toronto", "Chicago", "Denver"]
ONSETS = ["b", "br", "c", "d", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "tr", "v", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "", "", "n", "r", "s", "l", "m"]

WEATHER_Q = ["What's the weather in {city}?", "How is the weather in {city} today?", "Is it warm in {city}?",
             "Weather for {city}, please.", "Tell me the weather in {city}."]
CONVERT_Q = ["Convert {amount} {src} to {dst}.", "How much is {amount} {src} in {dst}?",
             "Change {amount} {src} into {dst}, please.", "What is {amount} {src} in {dst}?"]
EVENTS_Q = ["What's on my calendar on {day}?", "Do I have anything on {day}?", "Am I free on {day}?",
            "Show my events for {day}."]
NO_TOOL = [("Hello, I'm {name}!", "Hello {name}! I can check the weather, convert money and units, "
                                  "and read your calendar."),
           ("Thanks, {name} here, that helped.", "You're welcome, {name}!"),
           ("What can you do for me, {name} asks.", "I can check the weather, convert money and units, "
                                                    "and read your calendar."),
           ("Write a poem about {city}.", "Sorry, I can only help with the weather, money, units and your "
                                          "calendar."),
           ("Who is the mayor of {city}?", "Sorry, I can only help with the weather, money, units and your "
                                           "calendar.")]


def made_up_name(rng: random.Random) -> str:
    """A pronounceable made-up name of 2-3 syllables ("Brelom", "Taizouk"): thousands of them, none frequent."""
    syllables = [rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3))]
    return ("".join(syllables) + rng.choice(CODAS)).capitalize()


def city(rng: random.Random) -> str:
    return rng.choice(CITIES) if rng.random() < 0.2 else made_up_name(rng)


def amount(rng: random.Random) -> int | float:
    """1-999, or one decimal (0.1-99.9): written the same way in the question and in the arguments."""
    return rng.randint(1, 999) if rng.random() < 0.7 else rng.randint(1, 999) / 10


def weather_call(rng):
    place = city(rng)
    return rng.choice(WEATHER_Q).format(city=place), ("get_weather", {"city": place})


def currency_call(rng):
    src, dst = rng.sample(list(T.EUR_RATES), 2)
    value = amount(rng)
    text = rng.choice(CONVERT_Q).format(amount=value, src=src, dst=dst)
    return text, ("convert_currency", {"amount": value, "from": src, "to": dst})


def units_call(rng):
    table = rng.choice([T.LENGTH, T.MASS])
    src, dst = rng.sample(list(table), 2)
    value = amount(rng)
    text = rng.choice(CONVERT_Q).format(amount=value, src=src, dst=dst)
    return text, ("convert_units", {"amount": value, "from": src, "to": dst})


def events_call(rng):
    day = rng.choice(T.DAYS)
    return rng.choice(EVENTS_Q).format(day=day), ("get_events", {"day": day})


SINGLE = [weather_call, currency_call, units_call, events_call]


def answer(name: str, result: dict) -> str:
    """The assistant's reply from one tool result."""
    if "error" in result:
        return f"Sorry, that did not work: {result['error']}."
    if name == "get_weather":
        return f"It is {result['temperature']} degrees and {result['conditions']} in {result['city']}."
    if name in ("convert_currency", "convert_units"):
        return f"{result['amount']} {result['from']} is {result['result']} {result['to']}."
    if not result["events"]:
        return f"You have nothing on {result['day']}."
    return f"On {result['day']} you have: {', '.join(result['events'])}."


def _strip_trailing(text: str) -> str:
    return text.rstrip(".?!")


def make_chat(rng: random.Random) -> dict:
    """One conversation: no tool (15%), two calls in parallel (25%) or one call."""
    roll = rng.random()
    if roll < 0.15:
        question, reply = rng.choice(NO_TOOL)
        fill = {"name": made_up_name(rng), "city": city(rng)}
        messages = [{"role": "user", "content": question.format(**fill)},
                    {"role": "assistant", "content": reply.format(**fill)}]
    else:
        if roll < 0.40:  # parallel: two questions in one message, two calls in one assistant turn
            (q1, c1), (q2, c2) = rng.choice(SINGLE)(rng), rng.choice(SINGLE)(rng)
            while c2 == c1:
                q2, c2 = rng.choice(SINGLE)(rng)
            question, calls = f"{_strip_trailing(q1)}, and {q2[0].lower()}{q2[1:]}", [c1, c2]
        else:
            question, call = rng.choice(SINGLE)(rng)
            calls = [call]
        ids = [f"call_{i + 1}" for i in range(len(calls))]
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "tool_calls": [
                        {"id": i, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
                        for i, (name, args) in zip(ids, calls, strict=True)]}]
        replies = []
        for i, (name, args) in zip(ids, calls, strict=True):
            result = T.call(name, args)
            messages.append({"role": "tool", "tool_call_id": i, "content": json.dumps(result)})
            replies.append(answer(name, result))
        messages.append({"role": "assistant", "content": " ".join(replies)})
    return {"messages": [{"role": "system", "content": SYSTEM}] + messages, "tools": T.TOOLS}


def held_out(chat: dict) -> dict:
    """The chat up to its first assistant message (the decision the evaluation scores)."""
    messages = chat["messages"]
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {**chat, "messages": messages[:first + 1]}


def make_split(n_train: int, n_valid: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """n_train training chats and n_valid held-out ones; no question is asked twice in either file."""
    rng = random.Random(seed)
    train, valid, asked = [], [], set()
    while len(train) < n_train:
        chat = make_chat(rng)
        question = chat["messages"][1]["content"]
        if question not in asked:
            asked.add(question)
            train.append(chat)
    while len(valid) < n_valid:
        chat = make_chat(rng)
        question = chat["messages"][1]["content"]
        if question not in asked:
            asked.add(question)
            valid.append(held_out(chat))
    return train, valid


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--valid", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    train, valid = make_split(args.train, args.valid, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "valid.jsonl", valid)
    print(f"wrote {len(train)} training and {len(valid)} held-out chats to {args.out}")


if __name__ == "__main__":
    main()
