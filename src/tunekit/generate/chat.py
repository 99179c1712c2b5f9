"""Talk to a trained model: the conversation is rendered with the model's own chat template and
generation, through the engine the server and the evaluation use, stops at the template's end of turn.

    from tunekit.generate.chat import load_chat, reply
    model, tokenizer = load_chat("runs/quickstart")
    text = reply(model, tokenizer, [{"role": "user", "content": "Hello!"}])
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


def reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
          seed: int = 0) -> str:
    """The assistant's next message for `messages` (greedy when temperature is 0)."""
    from tunekit.data.render import end_of_turn_ids, render_prompt
    from tunekit.generate.engine import generate

    prompt = render_prompt(messages, tokenizer)  # exactly the text training puts before a reply
    stop = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    [out] = generate(model, [list(prompt)], stop_ids=stop, pad_id=pad, max_new_tokens=max_new_tokens,
                     batch_size=1, temperature=temperature, seed=seed)
    return tokenizer.decode(out.ids, skip_special_tokens=True).strip()
