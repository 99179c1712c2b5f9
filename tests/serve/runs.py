"""Tiny runs the server tests serve: two LoRA runs on one base, and a tool-calling model (seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

from toy_runs import toy_config

from tunekit.train.loop import train

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"]}}}
TOOL_QUESTION = "weather in Paris?"
TOOL_ARGUMENTS = {"city": "Paris"}


def lora_run(tmp_path: Path, base: Path, out: str, seed: int) -> Path:
    """A LoRA run on the toy "say WORD" task, long enough that its answers differ from the base's."""
    cfg = toy_config(tmp_path, base, out=out,
                     train={"max_steps": 12, "lr": 2e-2, "seed": seed, "batch_size": 4, "micro_batch_size": 4})
    return train(cfg).run_dir


def hermes_base(path: Path, tokenizer) -> Path:
    """A random tiny Llama with 1024 positions (the hermes tool preamble alone is ~600 tokens here)."""
    import torch
    from conftest import tiny_model_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_model_config("llama", vocab_size=len(tokenizer))
    config.max_position_embeddings = 1024
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tokenizer.pad_token_id
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tool_call_run(tmp_path: Path, base: Path) -> Path:
    """A full fine-tune of `base` (see hermes_base) that learned to answer TOOL_QUESTION with one
    get_weather call."""
    data = tmp_path / "tools.jsonl"
    example = {"messages": [
        {"role": "user", "content": TOOL_QUESTION},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps(TOOL_ARGUMENTS)}}]},
    ], "tools": [WEATHER_TOOL]}
    data.write_text("".join(json.dumps(example) + "\n" for _ in range(16)), encoding="utf-8")
    cfg = toy_config(tmp_path, base, out="tools-run", method="full",
                     data={"train": str(data), "max_len": 1024, "validation_fraction": 0.0},
                     train={"epochs": 30, "max_steps": 80, "lr": 3e-3, "batch_size": 4, "micro_batch_size": 4})
    return train(cfg).run_dir
