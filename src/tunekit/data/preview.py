"""Show which tokens are trained: an example rendered with its template, trained tokens highlighted and
bracketed ⟦like this⟧, so the marking survives where colours do not (output piped to a file, a log)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text

from tunekit.data.render import render_example
from tunekit.data.types import IGNORE, Sequence

TRAINED_STYLE = "bold black on green"
PROMPT_STYLE = "dim"
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"  # around each trained run, in the plain text too
MARK_STYLE = "green"


@dataclass
class Preview:
    text: Text  # the rendered sequence(s); trained runs styled TRAINED_STYLE, between TRAINED_OPEN / _CLOSE
    tokens: int
    trained: int
    sequences: int


def runs(sequence: Sequence) -> list[tuple[bool, list[int]]]:
    """Split a sequence into maximal runs of (trained?, token ids), in order."""
    out: list[tuple[bool, list[int]]] = []
    for token, label in zip(sequence.input_ids, sequence.labels, strict=True):
        trained = label != IGNORE
        if out and out[-1][0] == trained:
            out[-1][1].append(token)
        else:
            out.append((trained, [token]))
    return out


def decoded_runs(sequences: list[Sequence], tokenizer) -> list[list[tuple[bool, str]]]:
    """Per sequence, its runs as (trained?, text). Runs are decoded whole, so characters of several tokens
    (emoji, CJK under byte-level BPE) come out intact."""
    return [[(trained, tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
             for trained, ids in runs(sequence)] for sequence in sequences]


def preview_example(example: dict, tokenizer, *, unstable_template: str = "split") -> Preview:
    """Render an example and mark its trained tokens."""
    sequences = render_example(example, tokenizer, unstable_template=unstable_template)
    text = Text()
    for k, pieces in enumerate(decoded_runs(sequences, tokenizer)):
        if len(sequences) > 1:
            text.append(f"── sequence {k + 1} of {len(sequences)} ──\n", style="bold")
        for trained, piece in pieces:
            if trained:
                text.append(TRAINED_OPEN, style=MARK_STYLE)
                text.append(piece, style=TRAINED_STYLE)
                text.append(TRAINED_CLOSE, style=MARK_STYLE)
            else:
                text.append(piece, style=PROMPT_STYLE)
        text.append("\n")
    return Preview(text=text, tokens=sum(len(s) for s in sequences),
                   trained=sum(s.num_trained for s in sequences), sequences=len(sequences))


def preview_pair(record: dict, tokenizer) -> Preview:
    """A preference pair as the model's template renders it: the prompt once (not trained), then each reply
    with the tokens the DPO loss reads marked."""
    from tunekit.data.preference import pair_sequences, render_pair

    pair = render_pair(record, tokenizer)
    chosen, rejected = pair_sequences(pair)
    text = Text()
    text.append(tokenizer.decode(pair.prompt, skip_special_tokens=False, clean_up_tokenization_spaces=False),
                style=PROMPT_STYLE)
    text.append("\n")
    for title, ids in (("preferred", pair.chosen), ("non-preferred", pair.rejected)):
        text.append(f"── {title} reply ──\n", style="bold")
        text.append(TRAINED_OPEN, style=MARK_STYLE)
        text.append(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
                    style=TRAINED_STYLE)
        text.append(TRAINED_CLOSE + "\n", style=MARK_STYLE)
    return Preview(text=text, tokens=len(chosen) + len(rejected), trained=chosen.num_trained + rejected.num_trained,
                   sequences=2)
