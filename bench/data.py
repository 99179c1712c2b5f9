"""Everything a benchmark run trains on, built deterministically from a seed in seconds.

- a byte-level BPE tokenizer trained on the bench's own synthetic text, with a ChatML template that has
  `{% generation %}` markers (TRL's `assistant_only_loss` needs them; tunekit masks by prefix rendering and
  checks against them);
- a synthetic chat set: 1-4 turns, a log-normal spread of lengths, a quarter of the examples with tools,
  tool calls and tool responses, in OpenAI chat format (JSONL);
- a random-init Llama-shaped model saved as a model dir with that tokenizer.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from bench.presets import Preset

SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                  "<tool_response>", "</tool_response>"]

# ChatML with tools. The assistant turn's trained part (content, tool calls and <|im_end|>) is wrapped in
# {% generation %} so that `return_assistant_tokens_mask` marks it; the "\n" after <|im_end|> is outside, as
# tunekit leaves it untrained too. Written for both data paths: tunekit passes tool-call arguments as dicts
# and omits absent keys; TRL reads the JSONL through Arrow, which fills absent keys with None and keeps
# arguments as the JSON strings of the file. Both render to the same text.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\nYou can call these tools:\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- if message['tool_calls'] %}{%- for call in message['tool_calls'] %}"
    "{%- set args = call['function']['arguments'] %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{%- if args is string %}{{- args }}{%- else %}{{- args | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>tool\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_SYLLABLES = ("ka lo mi ne ra tu se vo pi da ge hu zo be fi ya wu ce jo qui str ent ion ar er an "
              "or th in al ou ing ed es ly pre con").split()
_TOOLS = [
    {"name": "get_weather", "description": "Current weather for a city.",
     "params": {"city": "string", "unit": "string"}},
    {"name": "search_docs", "description": "Search the knowledge base.",
     "params": {"query": "string", "limit": "integer"}},
    {"name": "convert_units", "description": "Convert a quantity between units.",
     "params": {"value": "number", "from_unit": "string", "to_unit": "string"}},
]


def _words(seed: int, n: int = 3000) -> list[str]:
    """A deterministic pseudo-word lexicon (1-4 syllables), drawn with a Zipf-like frequency later."""
    rng = random.Random(seed)
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.choice([1, 2, 2, 3, 3, 4]))))
    words = sorted(words)
    rng.shuffle(words)  # frequency rank independent of spelling
    return words


class TextGen:
    """Sentences of pseudo-words with Zipf-distributed frequencies, numbers and punctuation."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.words = _words(1234)  # the lexicon is fixed; `seed` only changes the draws
        weights = [1.0 / (rank + 1) for rank in range(len(self.words))]
        total = sum(weights)
        self.cum = []
        acc = 0.0
        for w in weights:
            acc += w / total
            self.cum.append(acc)

    def word(self) -> str:
        import bisect

        return self.words[min(bisect.bisect_left(self.cum, self.rng.random()), len(self.words) - 1)]

    def text(self, n_words: int) -> str:
        out = []
        for i in range(max(1, n_words)):
            w = self.word()
            if i == 0 or out[-1].endswith("."):
                w = w.capitalize()
            if self.rng.random() < 0.03:
                w = str(self.rng.randint(0, 9999))
            out.append(w)
            if self.rng.random() < 0.08:
                out[-1] += self.rng.choice([".", ".", ",", "?", ":"])
            if self.rng.random() < 0.01:
                out[-1] += "\n"
        return " ".join(out).replace("\n ", "\n")


def build_tokenizer(vocab_size: int, seed: int = 0):
    """Train a byte-level BPE on the bench's synthetic text (a few seconds) and set the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    gen = TextGen(seed + 99)
    corpus = [gen.text(gen.rng.randint(5, 60)) for _ in range(6000)]
    # Tool specs and calls appear in a quarter of the examples: give their JSON merges too.
    corpus += [json.dumps(spec) for spec in _tool_specs()] * 50
    corpus += [json.dumps({"name": t["name"], "arguments": json.loads(_arguments(t, gen))}) for t in _TOOLS * 100]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in {"<|im_end|>", "<pad>"}],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _tool_specs() -> list[dict]:
    """The tools in OpenAI format (same for every tool example, so the rendered tool block is stable)."""
    specs = []
    for t in _TOOLS:
        props = {name: {"type": kind} for name, kind in t["params"].items()}
        specs.append({"type": "function", "function": {
            "name": t["name"], "description": t["description"],
            "parameters": {"type": "object", "properties": props, "required": list(props)}}})
    return specs


def _arguments(tool: dict, gen: TextGen) -> str:
    values = {"string": lambda: gen.word(), "integer": lambda: gen.rng.randint(1, 50),
              "number": lambda: round(gen.rng.uniform(0, 1000), 2)}
    # The JSON string as OpenAI writes it; the template renders dict arguments with the same separators.
    return json.dumps({name: values[kind]() for name, kind in tool["params"].items()}, ensure_ascii=False)


def make_example(gen: TextGen, target_tokens: int) -> dict:
    """One conversation of about `target_tokens` tokens (≈1.2 tokens per pseudo-word with the bench BPE)."""
    rng = gen.rng
    turns = rng.choice([1, 1, 2, 2, 3, 4])
    with_tools = rng.random() < 0.25
    # The tool block, call and response take about 300 tokens of the budget.
    budget_words = max(8, int((target_tokens - (300 if with_tools else 0)) / 1.2))
    messages: list[dict] = []
    if rng.random() < 0.6:
        messages.append({"role": "system", "content": gen.text(rng.randint(5, 25))})
    # The answers carry most of the length (as in real SFT sets); the prompts are shorter.
    per_turn = budget_words / turns
    for turn in range(turns):
        messages.append({"role": "user", "content": gen.text(max(3, int(per_turn * rng.uniform(0.1, 0.4))))})
        if with_tools and turn == 0:
            tool = rng.choice(_TOOLS)
            call_id = f"call_{rng.randint(0, 10**8):08d}"
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": tool["name"], "arguments": _arguments(tool, gen)}}]})
            messages.append({"role": "tool", "tool_call_id": call_id, "name": tool["name"],
                             "content": json.dumps({"result": gen.text(rng.randint(3, 20))})})
        messages.append({"role": "assistant", "content": gen.text(max(2, int(per_turn * rng.uniform(0.5, 0.9))))})
    example: dict = {"messages": messages}
    if with_tools:
        example["tools"] = _tool_specs()
    return example


def render_with_mask(example: dict, tokenizer) -> tuple[list[int], list[int]]:
    """input_ids and the assistant mask (1 = trained) from the template's generation markers."""
    out = tokenizer.apply_chat_template(example["messages"], tools=example.get("tools"), tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def make_dataset(preset: Preset, tokenizer, n: int, seed: int) -> list[dict]:
    """`n` conversations whose rendered length is log-normal around `preset.median_tokens`, all <= seq_len
    (longer draws are redrawn, so no run truncates or drops anything and all train the same tokens)."""
    gen = TextGen(seed)
    examples = []
    while len(examples) < n:
        target = int(math.exp(gen.rng.gauss(math.log(preset.median_tokens), 0.7)))
        example = make_example(gen, min(target, preset.seq_len))
        ids, _ = render_with_mask(example, tokenizer)
        if len(ids) <= preset.seq_len:
            examples.append(example)
    return examples


def write_jsonl(examples: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def for_trl(example: dict) -> dict:
    """The row TRL reads: messages as-is, `tools` as a JSON string (TRL json-loads it), so Arrow does not merge
    the different tool schemas into one struct with None-filled keys."""
    row = {"messages": example["messages"]}
    row["tools"] = json.dumps(example["tools"]) if "tools" in example else None
    return row


def build_model_dir(preset: Preset, tokenizer, path: Path, seed: int = 0) -> Path:
    """Save a random-init Llama with the preset's shape (fp32 on CPU, bf16 for GPU presets) and the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=preset.vocab, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads,
        max_position_embeddings=max(preset.seq_len, 2048), tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if preset.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def prepare(preset: Preset, workdir: Path, seed: int = 0) -> dict:
    """Tokenizer, model dir, train.jsonl and eval.jsonl under `workdir`; returns their paths and stats."""
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(preset.tokenizer_vocab, seed)
    train = make_dataset(preset, tokenizer, preset.n_train, seed)
    evals = make_dataset(preset, tokenizer, preset.n_eval, seed + 1)
    write_jsonl(train, workdir / "train.jsonl")
    write_jsonl(evals, workdir / "eval.jsonl")
    model_dir = build_model_dir(preset, tokenizer, workdir / "model", seed)
    lengths, trained = [], 0
    for ex in train:
        ids, mask = render_with_mask(ex, tokenizer)
        lengths.append(len(ids))
        trained += sum(mask)
    lengths.sort()
    return {
        "model_dir": str(model_dir), "train": str(workdir / "train.jsonl"), "eval": str(workdir / "eval.jsonl"),
        "n_train": len(train), "tokens": sum(lengths), "trained_tokens": trained,
        "length_p50": lengths[len(lengths) // 2], "length_p90": lengths[int(len(lengths) * 0.9)],
        "length_max": lengths[-1], "with_tools": sum("tools" in ex for ex in train),
    }
