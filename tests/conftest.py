"""Shared fixtures: a BPE tokenizer trained in seconds and tiny Llama / Qwen2-shaped models.

Nothing here touches the network. The chat templates come from ../shared/chat_templates when that
folder is beside the clone (CI has it); tests that need it skip with a reason otherwise.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_TEMPLATES = REPO.parent / "shared" / "chat_templates"

# Every special / control string used by the templates in shared/chat_templates, so that any of them
# can be set on the same tokenizer and its markers stay single tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<pad>", "<s>", "</s>", "<unk>",
    "<|im_start|>", "<|im_end|>",
    "<start_of_turn>", "<end_of_turn>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
    "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<tool_call>", "</tool_call>",
]

_WORDS = (
    "the a an of to and in is it you that he was for on are with as I his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said each she "
    "which do their time if will way about many then them write would like so these her long make thing "
    "see him two has look more day could go come did number sound no most people my over know water than "
    "call first who may down side been now find any new work part take get place made live where after "
    "back little only round man year came show every good me give our under name very through just form "
    "sentence great think say help low line differ turn cause much mean before move right boy old too same "
    "tell does set three want air well also play small end put home read hand port large spell add even "
    "land here must big high such follow act why ask men change went light kind off need house picture try "
    "us again animal point mother world near build self earth father flour sugar salt butter egg milk "
    "garlic onion tomato pepper chicken rice bake boil stir cup tablespoon teaspoon chopped minced weather "
    "Paris London city temperature function call result json name arguments tool answer question"
).split()
_UNICODE = ["café", "naïve", "über", "日本語", "中文", "😀", "🚀", "Ελληνικά", "русский", "ñandú", "€", "→"]


def corpus_lines(n: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic training text for the tokenizer: words, digits, JSON, unicode."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 16))]
        if i % 5 == 0:
            words.append(rng.choice(_UNICODE))
        if i % 7 == 0:
            call = {"name": rng.choice(_WORDS), "arguments": {"city": rng.choice(_WORDS), "n": rng.randint(0, 999)}}
            words.append(json.dumps(call))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", "\n", ""]))
    return lines


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (every string is encodable) wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in {"<s>", "</s>", "<unk>", "<pad>"}],
    )


def chatml_template() -> str:
    """A plain ChatML template (no {% generation %} markers), usable without ../shared."""
    return (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
        "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


@pytest.fixture(scope="session", autouse=True)
def data_cache_in_tmp(tmp_path_factory):
    """The rendered-data cache of every test (and of the commands tests run) lives in a temporary folder."""
    import os

    os.environ["TUNEKIT_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="session")
def base_tokenizer():
    """The trained BPE tokenizer with no chat template (copy it before changing it)."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer(base_tokenizer):
    """The tokenizer with a ChatML template and <|im_end|> as end of turn."""
    import copy

    tok = copy.deepcopy(base_tokenizer)
    tok.chat_template = chatml_template()
    return tok


def shared_template(name: str) -> str:
    path = SHARED_TEMPLATES / f"{name}.jinja"
    if not path.is_file():
        pytest.skip(f"../shared/chat_templates/{name}.jinja is not beside this clone (CI has it)")
    return path.read_text(encoding="utf-8")


def shared_template_names() -> list[str]:
    if not SHARED_TEMPLATES.is_dir():
        return []
    return sorted(p.stem for p in SHARED_TEMPLATES.glob("*.jinja"))


@pytest.fixture
def tokenizer_with_template(base_tokenizer):
    """Factory: a copy of the tokenizer with one of ../shared/chat_templates set."""
    import copy

    def make(name: str):
        tok = copy.deepcopy(base_tokenizer)
        tok.chat_template = shared_template(name)
        return tok

    return make


def tiny_model_config(kind: str, vocab_size: int, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=False)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(kind)


def save_tiny_model(path: Path, kind: str, tokenizer, seed: int = 0) -> Path:
    """Build a random-init tiny model (fp32), save it with the tokenizer, return the dir."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_model_config(kind, vocab_size=len(tokenizer))
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, chat_tokenizer) -> Path:
    """A saved tiny Llama-shaped model (hidden 64, 2 layers) + ChatML tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", chat_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, chat_tokenizer) -> Path:
    """A saved tiny Qwen2-shaped model (hidden 64, 2 layers) + ChatML tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", chat_tokenizer)


def with_template(base_tokenizer, template: str):
    """A copy of `base_tokenizer` whose chat template is `template`."""
    import copy

    tok = copy.deepcopy(base_tokenizer)
    tok.chat_template = template
    return tok


def greedy(path, messages, max_new_tokens: int, tools=None) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of transformers' own greedy `generate` of the model at `path` (a
    run dir, checkpoint or model dir) on one prompt alone: the reference tunekit's engine is held to (tests
    compare what `tunekit serve` answers with it; test_generate compares the engine itself)."""
    import torch

    from tunekit.data.render import end_of_turn_ids, render_prompt
    from tunekit.model import load_for_inference

    model, tokenizer = load_for_inference(path)
    prompt = list(render_prompt({"messages": messages, "tools": tools}, tokenizer))
    stop = end_of_turn_ids(tokenizer)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
    cut = next((i for i, t in enumerate(out) if t in stop), None)
    new = out if cut is None else out[:cut]
    text = tokenizer.decode(new, skip_special_tokens=False)
    return text, len(prompt), len(new) + int(cut is not None)  # the end-of-turn token is generated too


# ------------------------------------------------------------------------------------- support matrix
# Tests of model families record what they proved as (family, column) -> cell with the `matrix` fixture; a cell
# counts only when its test passes. tests/test_families.py::test_support_matrix_doc_is_current renders
# docs/models.md from them, so the doc says what this run of the tests proved.

MATRIX: dict[tuple[str, str], str] = {}


@pytest.fixture
def matrix(request):
    """`matrix(family, column, cell)`: what this test proves, recorded when it passes."""
    cells = []
    request.node.user_properties.append(("matrix", cells))

    def record(family: str, column: str, cell: str) -> None:
        cells.append((family, column, cell))

    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.passed:
        for key, cells in item.user_properties:
            if key == "matrix":
                for family, column, cell in cells:
                    MATRIX[(family, column)] = cell
