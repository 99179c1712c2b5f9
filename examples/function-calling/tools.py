"""The example's four tools: their OpenAI schemas and deterministic Python implementations.

The data generator uses them to write each tool's result into the training chats, and client.py runs them
when the served model asks for a call, so the model sees at inference the same kind of results it learned from.
"""

from __future__ import annotations

import hashlib

CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy"]
# Units per currency of one euro (fixed, fictional rates: the example must run offline and reproducibly).
EUR_RATES = {"EUR": 1.0, "USD": 1.08, "GBP": 0.85, "JPY": 162.0, "CHF": 0.95, "CAD": 1.47, "SEK": 11.4}
# Length and mass conversions: value in unit -> value in the base unit (m, kg).
LENGTH = {"km": 1000.0, "m": 1.0, "mi": 1609.344, "ft": 0.3048, "in": 0.0254, "cm": 0.01}
MASS = {"kg": 1.0, "g": 0.001, "lb": 0.45359237, "oz": 0.028349523125}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
EVENTS = ["dentist", "team meeting", "yoga class", "lunch with Sam", "piano lesson", "code review",
          "gym", "call with the bank", "book club", "haircut"]


def _pick(seq, *key) -> object:
    digest = hashlib.sha256("|".join(map(str, key)).encode()).digest()
    return seq[digest[0] % len(seq)]


def get_weather(city: str) -> dict:
    """Deterministic fictional weather: the same city always gets the same report (degrees Celsius)."""
    celsius = int(hashlib.sha256(city.lower().encode()).digest()[1] % 31) - 5
    return {"city": city, "temperature": celsius, "conditions": _pick(CONDITIONS, city.lower())}


def convert_currency(amount: float, src: str, dst: str) -> dict:
    if src not in EUR_RATES or dst not in EUR_RATES:
        return {"error": f"unknown currency; known: {', '.join(EUR_RATES)}"}
    value = amount / EUR_RATES[src] * EUR_RATES[dst]
    return {"amount": amount, "from": src, "to": dst, "result": round(value, 2)}


def convert_units(amount: float, src: str, dst: str) -> dict:
    for table in (LENGTH, MASS):
        if src in table and dst in table:
            return {"amount": amount, "from": src, "to": dst, "result": round(amount * table[src] / table[dst], 2)}
    return {"error": f"cannot convert {src} to {dst}"}


def get_events(day: str) -> dict:
    """The fictional calendar of one week: 0-2 events per day."""
    day = day.capitalize()
    if day not in DAYS:
        return {"error": f"unknown day; use one of {', '.join(DAYS)}"}
    digest = hashlib.sha256(day.lower().encode()).digest()
    events = [f"{EVENTS[digest[i] % len(EVENTS)]} at {8 + digest[i + 3] % 10}:00" for i in range(digest[9] % 3)]
    return {"day": day, "events": events}


FUNCTIONS = {"get_weather": get_weather, "convert_currency": convert_currency, "convert_units": convert_units,
             "get_events": get_events}


def _schema(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


# Compact arguments: few keys, the same short names in both conversions ("from" and "to" are Python
# keywords, so call() hands them to the functions as src and dst).
TOOLS = [
    _schema("get_weather", "current weather in a city", {"city": {"type": "string"}}, ["city"]),
    _schema("convert_currency", "convert an amount of money",
            {"amount": {"type": "number"}, "from": {"type": "string", "enum": list(EUR_RATES)},
             "to": {"type": "string", "enum": list(EUR_RATES)}},
            ["amount", "from", "to"]),
    _schema("convert_units", "convert a length or a mass",
            {"amount": {"type": "number"}, "from": {"type": "string", "enum": list(LENGTH) + list(MASS)},
             "to": {"type": "string", "enum": list(LENGTH) + list(MASS)}},
            ["amount", "from", "to"]),
    _schema("get_events", "events in my calendar on a day of this week",
            {"day": {"type": "string", "enum": DAYS}}, ["day"]),
]


KEYWORDS = {"from": "src", "to": "dst"}


def call(name: str, arguments: dict) -> dict:
    """Run one tool by name (what a client does with a tool call); unknown names and arguments are errors."""
    function = FUNCTIONS.get(name)
    if function is None:
        return {"error": f"no tool named {name}"}
    try:
        return function(**{KEYWORDS.get(key, key): value for key, value in arguments.items()})
    except TypeError as exc:
        return {"error": str(exc)}
