"""The `calculate_output` formula of a multi grader: a tokenizer and a recursive-descent parser of its own.

Grammar (usual precedence; `^` is power and binds tighter than unary minus, right to left: -2^2 = -4,
2^3^2 = 2^9):

    expr  := term (("+" | "-") term)*
    term  := unary (("*" | "/") unary)*
    unary := ("+" | "-") unary | power
    power := atom ("^" unary)?
    atom  := number | name | function "(" expr ("," expr)* ")" | "(" expr ")"

Names are the keys of the multi grader's `graders`; functions are min, max (1 or more arguments), abs, floor,
ceil, exp, sqrt, log (natural logarithm; one argument). Nothing is ever handed to Python's eval.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

FUNCTIONS = {
    "min": (min, None), "max": (max, None),
    "abs": (abs, 1), "floor": (math.floor, 1), "ceil": (math.ceil, 1),
    "exp": (math.exp, 1), "sqrt": (math.sqrt, 1), "log": (math.log, 1),
}
TOKEN = re.compile(r"\s*(?:(\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|([A-Za-z_][A-Za-z0-9_]*)|(.))")


class FormulaError(ValueError):
    """The formula does not parse, names something unknown, or cannot be evaluated (division by zero, a
    logarithm of 0, an overflow)."""


@dataclass(frozen=True)
class Token:
    kind: str  # "num" | "name" | "op" | "end"
    text: str
    pos: int


def tokenize(text: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if m is None:  # only trailing whitespace is left
            break
        start = m.start(m.lastindex) if m.lastindex else m.end()
        if m.group(1) is not None:
            tokens.append(Token("num", m.group(1), start))
        elif m.group(2) is not None:
            tokens.append(Token("name", m.group(2), start))
        elif m.group(3) is not None:
            if m.group(3) not in "+-*/^(),":
                raise FormulaError(f"unexpected character {m.group(3)!r} at position {start}")
            tokens.append(Token("op", m.group(3), start))
        pos = m.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


class Parser:
    """Builds a tree of tuples: ("num", v) | ("var", name) | ("neg", x) | (op, a, b) | ("call", f, [args])."""

    def __init__(self, text: str):
        self.tokens = tokenize(text)
        self.i = 0

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, text: str) -> None:
        tok = self.take()
        if tok.text != text or tok.kind != "op":
            found = repr(tok.text) if tok.kind != "end" else "the end"
            raise FormulaError(f"expected {text!r} at position {tok.pos}, found {found}")

    def parse(self):
        tree = self.expr()
        tok = self.peek()
        if tok.kind != "end":
            raise FormulaError(f"unexpected {tok.text!r} at position {tok.pos}")
        return tree

    def expr(self):
        left = self.term()
        while self.peek().kind == "op" and self.peek().text in "+-":
            op = self.take().text
            left = (op, left, self.term())
        return left

    def term(self):
        left = self.unary()
        while self.peek().kind == "op" and self.peek().text in "*/":
            op = self.take().text
            left = (op, left, self.unary())
        return left

    def unary(self):
        tok = self.peek()
        if tok.kind == "op" and tok.text in "+-":
            self.take()
            operand = self.unary()
            return ("neg", operand) if tok.text == "-" else operand
        return self.power()

    def power(self):
        base = self.atom()
        if self.peek().kind == "op" and self.peek().text == "^":
            self.take()
            return ("^", base, self.unary())
        return base

    def atom(self):
        tok = self.take()
        if tok.kind == "num":
            return ("num", float(tok.text))
        if tok.kind == "name":
            if self.peek().kind == "op" and self.peek().text == "(":
                if tok.text not in FUNCTIONS:
                    raise FormulaError(f"unknown function {tok.text!r} at position {tok.pos} "
                                       f"(allowed: {', '.join(FUNCTIONS)})")
                self.take()
                args = [self.expr()]
                while self.peek().kind == "op" and self.peek().text == ",":
                    self.take()
                    args.append(self.expr())
                self.expect(")")
                arity = FUNCTIONS[tok.text][1]
                if arity is not None and len(args) != arity:
                    raise FormulaError(f"{tok.text}() takes {arity} argument, got {len(args)} (position {tok.pos})")
                return ("call", tok.text, args)
            if tok.text in FUNCTIONS:
                raise FormulaError(f"{tok.text} is a function: write {tok.text}(...) (position {tok.pos})")
            return ("var", tok.text, tok.pos)
        if tok.kind == "op" and tok.text == "(":
            inner = self.expr()
            self.expect(")")
            return inner
        found = repr(tok.text) if tok.kind != "end" else "the end of the formula"
        raise FormulaError(f"expected a number, a name or '(' at position {tok.pos}, found {found}")


def names_in(tree) -> list[tuple[str, int]]:
    """(name, position) of every variable in the tree, in order."""
    if tree[0] == "var":
        return [(tree[1], tree[2])]
    if tree[0] == "num":
        return []
    if tree[0] == "call":
        return [n for arg in tree[2] for n in names_in(arg)]
    return [n for sub in tree[1:] for n in names_in(sub)]


def parse_formula(text: str, names: set[str] | None = None):
    """The parsed tree; with `names`, every variable must be one of them. Raises FormulaError."""
    if not isinstance(text, str) or not text.strip():
        raise FormulaError("the formula is empty")
    tree = Parser(text).parse()
    if names is not None:
        for name, pos in names_in(tree):
            if name not in names:
                raise FormulaError(f"unknown name {name!r} at position {pos}: the names are the keys of graders "
                                   f"({', '.join(sorted(names)) or 'none'})")
    return tree


def _eval(tree, env: dict[str, float]) -> float:
    kind = tree[0]
    if kind == "num":
        return tree[1]
    if kind == "var":
        return float(env[tree[1]])
    if kind == "neg":
        return -_eval(tree[1], env)
    if kind == "call":
        fn, _ = FUNCTIONS[tree[1]]
        return float(fn(*[_eval(arg, env) for arg in tree[2]]))
    a, b = _eval(tree[1], env), _eval(tree[2], env)
    if kind == "+":
        return a + b
    if kind == "-":
        return a - b
    if kind == "*":
        return a * b
    if kind == "/":
        if b == 0:
            raise FormulaError("division by zero")
        return a / b
    return math.pow(a, b)  # "^": a ValueError for a negative base with a fractional exponent


def evaluate(text: str, env: dict[str, float]) -> float:
    """The formula's value with `env` for its names. Raises FormulaError for any parse or domain error."""
    tree = parse_formula(text, set(env))
    try:
        value = _eval(tree, env)
    except FormulaError:
        raise
    except (ValueError, OverflowError, ZeroDivisionError) as exc:
        raise FormulaError(f"cannot evaluate {text!r}: {exc}") from exc
    if math.isnan(value) or math.isinf(value):
        raise FormulaError(f"{text!r} evaluates to {value}")
    return value
