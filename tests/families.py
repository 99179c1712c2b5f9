"""Tiny random-init models of each supported model family, built from transformers' own config classes.

`FAMILIES` names them; `build_family(name, dest, base_tokenizer)` saves one (fp32 weights + a tokenizer with
the family's special tokens and chat template) and returns the dir. The template is the family's real one from
../shared/chat_templates when it is beside the clone, else a compact template written here in the family's
format (so the matrix covers every family without shared/): `template_source(name)` says which.

Nothing here touches the network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from conftest import SHARED_TEMPLATES

# Qwen3's template, reduced to what decides its behaviour: ChatML turns, the reasoning of the last assistant
# turns after the last user message written as <think>...</think> (earlier turns lose theirs), and the
# generation prompt with an empty think block when enable_thinking is false.
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content or '' -%}{%- set reasoning = m.reasoning_content or '' -%}"
    "{%- if not reasoning and '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{%- if loop.index0 > ns.last_query -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

# Compact templates in each family's format, used when ../shared/chat_templates is not beside the clone.
BUILT_TEMPLATES = {
    "llama-3-instruct": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
        "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "qwen2.5-instruct": (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "gemma-it": (
        "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"),
    "mistral-instruct": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] | trim "
        "+ ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] | trim + eos_token }}{% endif %}"
        "{% endfor %}"),
    "phi-3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] | trim + '<|end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"),
}


@dataclass(frozen=True)
class Family:
    name: str  # the matrix's name for it
    model_type: str  # config.json's model_type
    template: str  # a ../shared/chat_templates name, or "qwen3" (built here)
    end_of_turn: str  # the token that ends an assistant reply in this template
    moe: bool = False


FAMILIES = {f.name: f for f in [
    Family("llama3", "llama", "llama-3-instruct", "<|eot_id|>"),
    Family("qwen2", "qwen2", "qwen2.5-instruct", "<|im_end|>"),
    Family("qwen3", "qwen3", "qwen3", "<|im_end|>"),
    Family("gemma2", "gemma2", "gemma-it", "<end_of_turn>"),
    Family("gemma3", "gemma3_text", "gemma-it", "<end_of_turn>"),
    Family("mistral", "mistral", "mistral-instruct", "</s>"),
    Family("phi3", "phi3", "phi-3", "<|end|>"),
    Family("qwen3_moe", "qwen3_moe", "qwen3", "<|im_end|>", moe=True),
    Family("mixtral", "mixtral", "mistral-instruct", "</s>", moe=True),
]}


def template_source(name: str) -> str:
    """'shared' when the family's real template is read from ../shared/chat_templates, else 'built'."""
    template = FAMILIES[name].template
    return "shared" if template != "qwen3" and (SHARED_TEMPLATES / f"{template}.jinja").is_file() else "built"


def family_template(name: str) -> str:
    template = FAMILIES[name].template
    if template == "qwen3":
        return QWEN3_TEMPLATE
    path = SHARED_TEMPLATES / f"{template}.jinja"
    return path.read_text(encoding="utf-8") if path.is_file() else BUILT_TEMPLATES[template]


def family_tokenizer(name: str, base_tokenizer):
    """A copy of the fixture's BPE tokenizer with the family's template (and <think> tokens for Qwen3)."""
    tok = copy.deepcopy(base_tokenizer)
    if FAMILIES[name].template == "qwen3":
        tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]},
                               replace_extra_special_tokens=False)
    tok.chat_template = family_template(name)
    return tok


def family_config(name: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, **overrides):
    """transformers' own config class of the family, tiny: hidden 64, 2 layers, 4 heads of 16 (2 KV heads); the
    MoE families with 4 experts, 2 per token."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False)
    head = dict(head_dim=hidden // 4)
    family = FAMILIES[name]
    config = {
        "llama": lambda: tf.LlamaConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(**common, **head),
        "gemma2": lambda: tf.Gemma2Config(**{**common, "tie_word_embeddings": True}, **head,
                                          query_pre_attn_scalar=hidden // 4),
        "gemma3_text": lambda: tf.Gemma3TextConfig(**{**common, "tie_word_embeddings": True}, **head,
                                                   query_pre_attn_scalar=hidden // 4),
        "mistral": lambda: tf.MistralConfig(**common, **head),
        "phi3": lambda: tf.Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**common, **head, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=hidden, decoder_sparse_step=1),
        "mixtral": lambda: tf.MixtralConfig(**common, **head, num_local_experts=4, num_experts_per_tok=2),
    }[family.model_type]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_family(name: str, dest: Path, base_tokenizer, *, seed: int = 0, **overrides) -> Path:
    """Save a random-init tiny model of the family (fp32) with its tokenizer into `dest`; return `dest`."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = family_tokenizer(name, base_tokenizer)
    config = family_config(name, len(tok), **overrides)
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.convert_tokens_to_ids(FAMILIES[name].end_of_turn)
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return Path(dest)
