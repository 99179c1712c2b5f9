"""Talk to a trained model: the conversation is rendered with the model's own chat template and
generation, through the engine the server and the evaluation use, stops at the template's end of turn.

    from tunekit.generate.chat import load_chat, reply
    model, tokenizer = load_chat("runs/quickstart")
    text = reply(model, tokenizer, [{"role": "user", "content": "Hello!"}])

A model whose template writes a think block (`think_markers`: Qwen3, DeepSeek-R1) answers with its reasoning
between `<think>` and `</think>`, then its answer. `Reasoning` splits the generated text into the two, piece by
piece as it is generated: the server sends them as `reasoning_content` and `content`.
"""

from __future__ import annotations

from pathlib import Path

from tunekit.errors import Problem, TunekitError


def load_chat(path: str | Path):
    """(model, tokenizer) from a run dir, its final/ or a checkpoint, a plain model dir or a hub id."""
    from tunekit.model import load_for_inference

    model, tokenizer = load_for_inference(path)
    if not getattr(tokenizer, "chat_template", None):
        raise TunekitError(Problem(str(path), "the tokenizer has no chat template",
                                   "chat needs a chat model; train from a base whose tokenizer sets one"))
    return model, tokenizer


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker` (it may still become it)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class Reasoning:
    """Generated text -> (reasoning, content), fed piece by piece; the pieces released add up to the split of
    the whole text, however it is cut.

    The reply is reasoning when it starts (after whitespace) with the open marker, or when the prompt already
    opened it (`opened`, DeepSeek-R1's `<think>\\n` generation prompt); the reasoning ends at the close marker.
    The newlines templates write around the reasoning and before the answer (`<think>\\nR\\n</think>\\n\\nA`)
    are not part of either. A reply that starts with anything else is all content. `reasoning` is None until
    a think block is opened, then the reasoning released so far.
    """

    def __init__(self, markers: tuple[str, str], opened: bool = False):
        self.open, self.close = markers
        self.state = "reasoning" if opened else "start"  # start -> reasoning -> after -> content
        self.reasoning: str | None = "" if opened else None
        self._held = ""  # text received but not released yet

    @property
    def thinking(self) -> bool:
        """Whether the text fed so far may still be reasoning (the think block is not closed)."""
        return self.state in ("start", "reasoning")

    def feed(self, text: str, *, final: bool = False) -> tuple[str, str]:
        """Take the next piece of text (`final`: the reply is over); returns (reasoning, content) to release."""
        held = self._held + text
        self._held = ""
        reasoning = content = ""
        if self.state == "start":
            stripped = held.lstrip()
            if stripped.startswith(self.open):
                self.state, self.reasoning, held = "reasoning", "", stripped[len(self.open):]
            elif self.open.startswith(stripped) and not final:
                self._held = held  # whitespace, or the start of the open marker
                return "", ""
            else:
                self.state = "content"
        if self.state == "reasoning":
            at = held.find(self.close)
            if at >= 0:
                reasoning, held, self.state = held[:at].rstrip("\n"), held[at + len(self.close):], "after"
            else:
                keep = 0 if final else _held_prefix(held, self.close)
                reasoning = held[:len(held) - keep]
                trailing = len(reasoning) - len(reasoning.rstrip("\n"))  # newlines may end the reasoning
                reasoning, self._held, held = reasoning.rstrip("\n"), held[len(reasoning) - trailing:], ""
                if final:
                    self._held = ""
            if not self.reasoning:  # the newlines after the open marker
                reasoning = reasoning.lstrip("\n")
            self.reasoning += reasoning
        if self.state == "after":
            held = held.lstrip("\n")
            if held:
                self.state = "content"
        if self.state == "content":
            content = held
        return reasoning, content


def split_reasoning(text: str, markers: tuple[str, str], opened: bool = False) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole reply (see `Reasoning`)."""
    splitter = Reasoning(markers, opened)
    _, content = splitter.feed(text, final=True)
    return splitter.reasoning, content


def reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
          seed: int = 0, template_kwargs: dict | None = None) -> str:
    """The assistant's next message for `messages` (greedy when temperature is 0).

    For a model with a think block (see module doc), the message is written as the template reads it back in
    a conversation: `<think>\\n{reasoning}\\n</think>\\n\\n{answer}` when the reply reasoned.
    `template_kwargs`: extra variables of the chat template, e.g. {"enable_thinking": False} for Qwen3.
    """
    from tunekit.data.render import end_of_turn_ids, render_prompt, starts_in_reasoning, think_markers
    from tunekit.generate.engine import generate

    prompt = render_prompt(messages, tokenizer, template_kwargs=template_kwargs)  # the text training puts before a reply
    stop = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    [out] = generate(model, [list(prompt)], stop_ids=stop, pad_id=pad, max_new_tokens=max_new_tokens,
                     batch_size=1, temperature=temperature, seed=seed)
    markers = think_markers(tokenizer)
    if markers is None:
        return tokenizer.decode(out.ids, skip_special_tokens=True).strip()
    # The markers may be special tokens (decoding would drop them): decode the runs between them.
    ids = {tokenizer.convert_tokens_to_ids(m): m for m in markers}
    pieces, run = [], []
    for token in [*out.ids, None]:
        if token in ids or token is None:
            pieces.append(tokenizer.decode(run, skip_special_tokens=True))
            pieces.append(ids.get(token, ""))
            run = []
        else:
            run.append(token)
    reasoning, content = split_reasoning("".join(pieces), markers, starts_in_reasoning(list(prompt), tokenizer))
    if reasoning is None:
        return content.strip()
    return f"{markers[0]}\n{reasoning}\n{markers[1]}\n\n{content.strip()}"
