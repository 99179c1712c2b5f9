"""tunekit.generate: the one engine that `tunekit chat`, the evaluation and the server generate with.

Its greedy output must be transformers' own greedy `generate` of each prompt alone, token for token, on a
model whose cache is the engine's slots (Llama), one that runs padded (a sliding-window Qwen2), and a peft
model with its adapter active (an evaluation's tuned run), with more prompts than rows so that rows leave and
later prompts join.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunekit.data.render import end_of_turn_ids, render_prompt
from tunekit.generate.chat import reply
from tunekit.generate.engine import generate
from tunekit.model import load_for_inference

TINY_CHAT = Path(__file__).resolve().parents[1] / "models" / "tiny-chat"
QUESTIONS = ["Pancakes: 1 cup flour, 2 eggs", "Copy exactly: Zorbenix 4417", "What is 2 + 2?",
             "List three colours as JSON.", "Hello!", "Toast: 2 slices bread, butter, a pinch of salt and pepper",
             "Say apple", "Repeat: a b c d e f g"]


def transformers_greedy(model, prompt: list[int], stop: list[int], pad: int, max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, eos_token_id=stop, pad_token_id=pad)[0, len(prompt):].tolist()
    cut = next((i for i, t in enumerate(out) if t in stop), None)
    return out if cut is None else out[:cut]


def sliding_qwen(tmp_path, chat_tokenizer) -> Path:
    from conftest import tiny_model_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    config = tiny_model_config("qwen2", len(chat_tokenizer))
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 16, 0
    config.eos_token_id = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "qwen")
    chat_tokenizer.save_pretrained(tmp_path / "qwen")
    return tmp_path / "qwen"


@pytest.mark.parametrize("which", ["tiny-chat", "sliding-qwen2", "lora-run"])
def test_greedy_output_is_transformers_greedy_of_each_prompt_alone(which, tmp_path, chat_tokenizer):
    if which == "tiny-chat":
        path = TINY_CHAT
    elif which == "sliding-qwen2":
        path = sliding_qwen(tmp_path, chat_tokenizer)
    else:
        from toy_runs import toy_config

        from tunekit.train.loop import train

        # a short LoRA run on the shipped model: a peft model with its adapter active
        path = train(toy_config(tmp_path, TINY_CHAT, train={"max_steps": 6, "lr": 2e-2})).run_dir
    model, tokenizer = load_for_inference(path)
    stop = end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    prompts = [list(render_prompt([{"role": "user", "content": q}], tokenizer)) for q in QUESTIONS]
    got = generate(model, prompts, stop_ids=stop, pad_id=pad, max_new_tokens=24, batch_size=3)
    with torch.no_grad():
        expected = [transformers_greedy(model, p, stop, pad, 24) for p in prompts]
    assert [g.ids for g in got] == expected
    assert [g.stopped for g in got] == [len(e) < 24 for e in expected]
    assert any(g.stopped for g in got) or which != "tiny-chat"  # the shipped model ends its turns


def test_chat_reply_is_the_engines_greedy_answer():
    model, tokenizer = load_for_inference(TINY_CHAT)
    messages = [{"role": "user", "content": "Pancakes: 1 cup flour, 2 eggs"}]
    stop = end_of_turn_ids(tokenizer)
    expected = transformers_greedy(model, list(render_prompt(messages, tokenizer)), stop, stop[0], 32)
    assert reply(model, tokenizer, messages, max_new_tokens=32) == tokenizer.decode(expected,
                                                                                     skip_special_tokens=True).strip()


def test_tunekit_chat_prints_the_answer_and_no_library_progress_bars():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "tunekit.cli", "chat", str(TINY_CHAT), "Hello!", "--max-new-tokens",
                           "16"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    model, tokenizer = load_for_inference(TINY_CHAT)
    assert done.stdout.strip() == reply(model, tokenizer, [{"role": "user", "content": "Hello!"}], max_new_tokens=16)
    assert "Loading weights" not in done.stderr + done.stdout and "it/s" not in done.stderr
