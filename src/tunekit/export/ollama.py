"""An Ollama TEMPLATE learned from a tokenizer's own chat template, and proven on its renders.

Ollama renders prompts with a Go text/template over `.Messages` (role and content of each message; the
Modelfile's SYSTEM becomes the first message when a conversation has none). Rather than keeping a hand-written
TEMPLATE per model family, tunekit learns the chat template's text *between* messages from its own renders:
probe conversations with placeholder contents are rendered by the Jinja template, and the text before each
message is recorded under (previous role, this role), the text after the last one under (last role, "gen").
This covers ChatML, Llama 3, Gemma (system folded into the first user turn), Mistral, Llama 2, Zephyr, Phi-3,
Vicuna and a default system prompt that a template inserts (Qwen 2.5), in the layout the template really has.

The learned table is a template only if it is proven: `learn` refuses a chat template whose text between two
messages depends on more than the roles of the two (or on the message contents), and `OllamaTemplate.render`,
the table's meaning, is compared with the Jinja render on every probe and on the run's own conversations
before a Modelfile is written. `go_template` writes the table as Go text/template; the tests execute it with
Go's own text/template (the engine Ollama uses) and compare with `render`.

Not translated: tool definitions, tool calls and tool results (Ollama passes them as .Tools and .ToolCalls,
which each family formats its own way), and content the Jinja template changes (e.g. `| trim`: Go's
text/template has no trim, so such a conversation renders differently; `verify` counts these).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunekit.export.export import _Plan as Plan

START, GEN = "start", "gen"
ROLES = ("system", "user", "assistant")

# Probe conversations: roles only; contents are placeholders. Their transitions are learned and then checked
# against each other (a transition seen twice must have the same text both times).
_PROBES = (
    ("system", "user", "assistant", "user", "assistant", "user"),
    ("user", "assistant", "user", "assistant", "user"),
    ("user",),
    ("system", "user"),
)


@dataclass(frozen=True)
class OllamaTemplate:
    transitions: dict[tuple[str, str], str]  # (previous role or "start", role or "gen") -> text between them
    notes: tuple[str, ...] = ()

    def render(self, messages: Iterable[dict]) -> str | None:
        """The prompt text Ollama makes from `messages` (role/content dicts) with this TEMPLATE; None when the
        conversation has a role order the table does not know (it would render without its markup)."""
        out, prev = [], START
        for m in messages:
            key = (prev, m["role"])
            if key not in self.transitions or not isinstance(m.get("content"), str):
                return None
            out += [self.transitions[key], m["content"]]
            prev = m["role"]
        if (prev, GEN) not in self.transitions:
            return None
        out.append(self.transitions[(prev, GEN)])
        return "".join(out)

    def go_template(self) -> str:
        """The table as an Ollama TEMPLATE (Go text/template). Every literal is a Go string constant, so no
        whitespace trimming or `{{` in a template's text can change it."""
        def lit(text: str) -> str:
            return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

        msg = [(k, v) for k, v in self.transitions.items() if k[1] != GEN]
        gen = [(k, v) for k, v in self.transitions.items() if k[1] == GEN]
        lines = ['{{- $prev := "start" }}', "{{- range .Messages }}"]
        for i, ((prev, role), text) in enumerate(msg):
            word = "if" if i == 0 else "else if"
            lines.append(f'{{{{- {word} and (eq $prev "{prev}") (eq .Role "{role}") }}}}{lit(text)}')
        lines += ["{{- end }}{{ .Content }}{{ $prev = .Role }}", "{{- end }}"]
        for i, ((prev, _), text) in enumerate(gen):
            word = "if" if i == 0 else "else if"
            lines.append(f'{{{{- {word} eq $prev "{prev}" }}}}{lit(text)}')
        lines.append("{{- end }}")
        return "\n".join(lines)

    def without_leading(self, prefix: str) -> OllamaTemplate:
        """The table with `prefix` (a BOS the runtime adds itself) cut from every transition out of "start"."""
        table = {k: (v[len(prefix):] if k[0] == START else v) for k, v in self.transitions.items()}
        return OllamaTemplate(table, self.notes)


def _placeholder(i: int) -> str:
    return f"TkProbe{i}q"


def _render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def learn(tokenizer) -> tuple[OllamaTemplate | None, str]:
    """(template, "") or (None, the reason the chat template cannot be written as an Ollama TEMPLATE)."""
    source = getattr(tokenizer, "chat_template", None)
    if not isinstance(source, str) or not source:
        return None, "the tokenizer has no chat template"
    table: dict[tuple[str, str], str] = {}
    notes: list[str] = []
    rendered = 0
    for roles in _PROBES:
        messages = [{"role": r, "content": _placeholder(i)} for i, r in enumerate(roles)]
        try:
            text = _render(tokenizer, messages)
        except Exception as exc:  # a template is code; it may refuse a role order (e.g. no system role)
            notes.append(f"the chat template refuses the role order {'/'.join(roles)} ({str(exc)[:80]})")
            continue
        rendered += 1
        pos, prev = 0, START
        for i, role in enumerate(roles + (GEN,)):
            if role == GEN:
                gap, pos = text[pos:], len(text)
            else:
                at = text.find(_placeholder(i), pos)
                if at < 0 or text.count(_placeholder(i)) != 1:
                    return None, f"the chat template does not write a {role} message's content once, as given"
                gap, pos = text[pos:at], at + len(_placeholder(i))
            if table.setdefault((prev, role), gap) != gap:
                return None, (f"the text before a {role} message after a {prev} message is not always the same "
                              "(it depends on more than the two roles)")
            prev = role
    if not rendered or (START, "user") not in table:
        return None, "the chat template renders none of the probe conversations"
    today = date.today()
    for shown in {today.strftime(f) for f in ("%d %b %Y", "%d %B %Y", "%Y-%m-%d", "%B %d, %Y")}:
        if any(shown in text for text in table.values()):
            notes.append(f"the chat template writes today's date ({shown}); the TEMPLATE keeps it fixed")
    template = OllamaTemplate(table, tuple(notes))
    # Contents that are real text, not placeholders: a template that changes them is caught here.
    checks = [[{"role": r, "content": f"Hello {r} {i}, how are you?"} for i, r in enumerate(roles)]
              for roles in _PROBES]
    bad = verify(template, tokenizer, checks)
    if bad:
        return None, "the chat template changes the text of messages (" + bad[0] + ")"
    return template, ""


def verify(template: OllamaTemplate, tokenizer, conversations: Iterable[list[dict]]) -> list[str]:
    """For each conversation (a prompt: the messages before a reply) that the Jinja template can render, the
    differences from the TEMPLATE's render, one line each."""
    problems = []
    for k, messages in enumerate(conversations):
        try:
            expected = _render(tokenizer, messages)
        except Exception:  # a conversation the chat template itself refuses has nothing to compare
            continue
        got = template.render(messages)
        if got is None:
            roles = "/".join(m["role"] for m in messages)
            problems.append(f"conversation {k + 1}: the role order {roles} has no TEMPLATE text")
        elif got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                      min(len(got), len(expected)))
            problems.append(f"conversation {k + 1}: renders differently from character {at} "
                            f"(Jinja {expected[at:at + 24]!r}, Ollama {got[at:at + 24]!r})")
    return problems


# --------------------------------------------------------------------------------------------------
# A run's Modelfile


def fixed_system_prompt(data_file: Path) -> str | None:
    """The system message every chat example of the data starts with, when they all share one."""
    seen: set[str] = set()
    try:
        with open(data_file, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                messages = json.loads(line).get("messages") or []
                first = messages[0] if messages else {}
                if first.get("role") != "system" or not isinstance(first.get("content"), str):
                    return None
                seen.add(first["content"])
                if len(seen) > 1:
                    return None
    except (OSError, ValueError, AttributeError):
        return None
    return seen.pop() if seen else None


def _quoted(text: str) -> str:
    """A Modelfile value: triple quotes (text may span lines) unless it holds triple quotes itself."""
    if '"""' in text:
        return json.dumps(text)
    return f'"""{text}"""'


def data_prompts(paths: list[Path], limit: int = 2000) -> tuple[list[list[dict]], int]:
    """The prompts of the run's chat data as Ollama sees them (the messages before each assistant message, text
    content only), and how many examples were left out for tools or non-text content."""
    prompts, skipped = [], 0
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if len(prompts) >= limit:
                        return prompts, skipped
                    try:
                        example = json.loads(line) if line.strip() else None
                    except ValueError:
                        continue
                    messages = example.get("messages") if isinstance(example, dict) else None
                    if not isinstance(messages, list):
                        continue
                    if example.get("tools") or any(
                            not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                            or not isinstance(m.get("content"), str) or m.get("tool_calls") for m in messages):
                        skipped += 1
                        continue
                    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
                    prompts += [plain[:i] for i, m in enumerate(plain) if m["role"] == "assistant" and i > 0]
        except OSError:
            continue
    return prompts, skipped


def ollama_template(plan: Plan, gguf: Path) -> tuple[object, list[str]]:
    """The learned TEMPLATE fitted to how llama.cpp tokenizes the GGUF, checked on the run's own prompts."""
    from tunekit.export.gguf_run import llama_cpp_adds_bos
    from tunekit.export.ollama import START, verify

    tokenizer = plan.tokenizer()
    template, notes = plan.ollama, list(plan.ollama.notes)
    bos = tokenizer.bos_token
    starts_with_bos = bool(bos) and all(v.startswith(bos) for k, v in template.transitions.items() if k[0] == START)
    if llama_cpp_adds_bos(gguf):
        if starts_with_bos:  # llama.cpp puts BOS before the prompt itself; the TEMPLATE must not write it again
            template = template.without_leading(bos)
        else:
            notes.append("llama.cpp adds a BOS token before every prompt of this GGUF; the chat template does not "
                         "write one, so Ollama's prompts start with a token the fine-tune did not see")
    paths = [p for p in (plan.cfg.data.train, plan.cfg.data.validation) if p is not None]
    prompts, skipped = data_prompts([Path(p) for p in paths])
    differ = verify(plan.ollama, tokenizer, prompts)  # text before tokenization, BOS as the template writes it
    notes.append(f"the Ollama TEMPLATE renders {len(prompts) - len(differ)} of {len(prompts)} prompts of the "
                 f"run's data exactly like the chat template"
                 + (f" ({skipped} examples with tools or non-text content were not compared: the TEMPLATE does "
                    "not translate tools)" if skipped else ""))
    if differ:
        notes.append("first difference: " + differ[0])
    return template, notes


def modelfile(plan: Plan, gguf_name: str, template) -> str:
    from tunekit.data.render import end_of_turn_ids

    tokenizer = plan.tokenizer()
    stops = list(dict.fromkeys(tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer))))
    lines = [f"# {plan.name}: exported by tunekit from {plan.run_dir}"
             + (f" ({plan.checkpoint})" if plan.checkpoint else ""),
             f"FROM ./{gguf_name}",
             f"TEMPLATE {_quoted(template.go_template())}"]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines.append("PARAMETER temperature 0")
    system = fixed_system_prompt(plan.cfg.data.train)
    if system is not None:
        lines.append(f"SYSTEM {_quoted(system)}")
    return "\n".join(lines) + "\n"
