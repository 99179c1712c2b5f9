"""Talk to a trained model: the conversation is rendered with the model's own chat template and
generation stops at the template's end of turn.

    from tunekit.chat import load_chat, reply
    model, tokenizer = load_chat("runs/quickstart")
    text = reply(model, tokenizer, [{"role": "user", "content": "Hello!"}])
"""

from __future__ import annotations

from pathlib import Path

from tunekit.errors import Problem, TunekitError


def load_chat(path: str | Path):
    """(model, tokenizer) from a run dir, its final/ or a checkpoint, or a plain model dir."""
    from tunekit.model import load_for_inference

    path = Path(path)
    if not path.exists():
        raise TunekitError(Problem(str(path), "no such run or model directory",
                                   "give a run dir (with final/) or a saved model dir"))
    model, tokenizer = load_for_inference(path)
    if not getattr(tokenizer, "chat_template", None):
        raise TunekitError(Problem(str(path), "the tokenizer has no chat template",
                                   "chat needs a chat model; train from a base whose tokenizer sets one"))
    return model, tokenizer


def reply(model, tokenizer, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
          seed: int = 0) -> str:
    """The assistant's next message for `messages` (greedy when temperature is 0)."""
    import torch

    from tunekit.data.render import end_of_turn_ids, render_prompt

    prompt = render_prompt(messages, tokenizer)  # exactly the text training puts before a reply
    input_ids = torch.tensor([prompt], device=model.device)  # (1, T) prompt tokens
    stop = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad, **sampling)
    new = out[0, input_ids.shape[1]:].tolist()
    for i, token in enumerate(new):  # cut at the first end-of-turn token
        if token in stop:
            new = new[:i]
            break
    return tokenizer.decode(new, skip_special_tokens=True).strip()
