"""Every model family end to end on tiny random-init models built from transformers' own config classes
(tests/families.py): data check and preview, LoRA, full and QLoRA training, several processes, merged export,
evaluation, `tunekit chat` and serving through the openai SDK. Each test records what it proved in the support
matrix (conftest `matrix`); the last test renders docs/models.md from it.

GGUF and Ollama columns come from tests/test_export_families.py (which runs before this file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MATRIX, REPO
from families import FAMILIES, build_family, family_tokenizer, template_source
from toy_runs import toy_config, write_toy_chat

from tunekit.data.check import check_file
from tunekit.data.render import end_of_turn_ids, render_example, template_warnings
from tunekit.train.loop import train

NAMES = list(FAMILIES)
COLUMNS = ["data", "lora", "full", "qlora", "nproc2", "merged", "eval", "chat", "serve", "gguf", "ollama"]
DOC = REPO / "docs" / "models.md"


@pytest.fixture(scope="module")
def models(tmp_path_factory, base_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root / name, base_tokenizer) for name in NAMES}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("family-data")
    write_toy_chat(folder / "train.jsonl", 24)
    write_toy_chat(folder / "valid.jsonl", 6, seed=1)
    return folder


def _config(data: Path, base: Path, out: Path, **sections):
    sections.setdefault("train", {})
    sections["train"] = {"max_steps": 10, **sections["train"]}
    sections["data"] = {"max_len": 128}  # the shared templates keep their indentation (and Qwen's system prompt)
    return toy_config(data, base, out=str(out), **sections)


@pytest.fixture(scope="module")
def lora_runs(models, data, tmp_path_factory) -> dict[str, Path]:
    """One LoRA run per family (10 steps), shared by the tests that read a run."""
    root = tmp_path_factory.mktemp("family-runs")
    return {name: train(_config(data, models[name], root / name)).run_dir for name in NAMES}


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def _falls(losses: list[float]) -> bool:
    k = max(1, len(losses) // 3)
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


# --------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("family", NAMES)
def test_data_check_and_trained_tokens(family, base_tokenizer, data, matrix):
    """The data check passes with the family's template, and the trained tokens of an example are the
    assistant's reply and the family's end-of-turn token, nothing of the prompt."""
    tok = family_tokenizer(family, base_tokenizer)
    report = check_file(data / "train.jsonl", validation=data / "valid.jsonl", tokenizer=tok, cache=False,
                        num_workers=1)
    assert report.errors == 0, [str(p.message) for p in report.problems]
    assert not [w for w in template_warnings(tok) if "not one special token" in w]  # generation stops at it
    eot = tok.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    assert end_of_turn_ids(tok)[0] == eot
    example = {"messages": [{"role": "user", "content": "say maple"},
                            {"role": "assistant", "content": "maple maple maple"}]}
    (seq,) = render_example(example, tok)
    trained = [t for t, label in zip(seq.input_ids, seq.labels, strict=True) if label != -100]
    text = tok.decode(trained)
    assert "maple maple maple" in text and "say" not in text, text
    assert eot in trained, text
    matrix(family, "data", f"yes ({template_source(family)} template)")


# --------------------------------------------------------------------------------------------- training


def _linear_leaves(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.get_decoder().named_modules()
            if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("family", NAMES)
def test_lora_trains_every_linear_layer_and_no_router(family, models, lora_runs, matrix):
    """LoRA targets every linear layer the family has (Phi-3's fused qkv_proj and gate_up_proj included), the
    fused expert weights of an MoE, never its router; the loss falls."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = lora_runs[family]
    assert _falls(_losses(run)), _losses(run)
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(models[family])
    linear = _linear_leaves(base)
    weights = load_file(run / "final" / "adapter_model.safetensors")
    if FAMILIES[family].moe:
        linear -= {"gate"}  # the router (an nn.Linear in some versions of a family)
        assert sorted(adapter["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
        assert not any(".gate." in k or k.endswith(".gate.weight") for k in weights), sorted(weights)
        assert any(".experts." in k for k in weights)
    assert set(adapter["target_modules"]) == linear
    if family == "phi3":
        assert {"qkv_proj", "gate_up_proj"} <= set(adapter["target_modules"])
    matrix(family, "lora", "yes" + (" (experts; router frozen)" if FAMILIES[family].moe else ""))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_the_router_is_trained_only_when_asked(family, models, data, tmp_path):
    from tunekit.model import apply_method, load_base

    cfg = _config(data, models[family], tmp_path / "run", lora={"r": 4, "train_router": True})
    model = apply_method(load_base(cfg), cfg)
    assert "gate.weight" in model.peft_config["default"].target_parameters
    routers = [n for n, p in model.named_parameters() if p.requires_grad and ".mlp.gate." in n]
    assert routers, "no LoRA weights on the router"


@pytest.mark.parametrize("family", NAMES)
def test_full_fine_tune(family, models, data, tmp_path, matrix):
    result = train(_config(data, models[family], tmp_path / "full", method="full",
                           train={"max_steps": 8, "lr": 1e-3}))
    assert _falls(_losses(result.run_dir)), _losses(result.run_dir)
    matrix(family, "full", "yes")


@pytest.mark.parametrize("family", NAMES)
def test_qlora(family, models, data, tmp_path, matrix):
    pytest.importorskip("bitsandbytes")
    result = train(_config(data, models[family], tmp_path / "qlora", method="qlora", train={"max_steps": 6}))
    assert _falls(_losses(result.run_dir)), _losses(result.run_dir)
    matrix(family, "qlora", "yes (CPU)")


@pytest.mark.parametrize("family", ["gemma2", "qwen3_moe"])
def test_two_processes(family, models, data, tmp_path, matrix):
    """`--nproc 2` (torchrun, gloo on CPU) trains the family: DDP for LoRA, FSDP2 for full."""
    cfg_path = tmp_path / "config.yaml"
    cfg = _config(data, models[family], tmp_path / "run", train={"max_steps": 4})
    import yaml

    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")), encoding="utf-8")
    for method in ("lora", "full"):
        done = subprocess.run([sys.executable, "-m", "tunekit.cli", "train", str(cfg_path), "--nproc", "2",
                               f"method={method}", f"output.dir={tmp_path / method}"],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        summary = json.loads((tmp_path / method / "summary.json").read_text())
        assert summary["processes"] == 2 and summary["steps"] == 4
    matrix(family, "nproc2", "yes (DDP LoRA, FSDP2 full)")


# --------------------------------------------------------------------------------------------- using a run


@pytest.mark.parametrize("family", NAMES)
def test_merged_export_equals_the_run(family, lora_runs, tmp_path, matrix):
    from tunekit.export.export import export
    from tunekit.model import load_causal_lm, load_for_inference

    out = export(lora_runs[family], fmt="merged", out=tmp_path / "merged").out
    run_model, tok = load_for_inference(lora_runs[family])
    merged = load_causal_lm(out, torch.device("cpu"))
    ids = torch.tensor([tok.encode("say maple and then some more words of text")])
    with torch.no_grad():
        a, b = run_model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-4
    matrix(family, "merged", "yes")


def _parts(text: str, tok) -> tuple[str, str]:
    """(reasoning, answer) of a reply: the think block split off for a thinking template (Qwen3)."""
    from tunekit.data.render import think_markers
    from tunekit.generate.chat import split_reasoning

    markers = think_markers(tok)
    if markers is None:
        return "", text.strip()
    reasoning, content = split_reasoning(text, markers)
    return (reasoning or "").strip(), content.strip()


@pytest.mark.parametrize("family", NAMES)
def test_eval_and_chat(family, lora_runs, data, matrix):
    """The evaluation of the run against its base, and `tunekit chat`'s reply equal to transformers' greedy."""
    from conftest import greedy

    from tunekit.eval.evaluate import evaluate
    from tunekit.generate.chat import load_chat, reply

    result = evaluate(lora_runs[family], data / "valid.jsonl", max_new_tokens=8, limit=3)
    assert len(result.candidates) == 2 and all(len(c.predictions) == 3 for c in result.candidates)
    matrix(family, "eval", "yes")
    messages = [{"role": "user", "content": "say tiger"}]
    model, tok = load_chat(lora_runs[family])
    text = reply(model, tok, messages, max_new_tokens=8)
    expected, _, _ = greedy(lora_runs[family], messages, 8)
    assert _parts(text, tok) == _parts(expected, tok)  # the reply as printed (Qwen3's think block split off)
    matrix(family, "chat", "yes")


# --------------------------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def client(lora_runs):
    """An openai client of one server serving every family's LoRA run."""
    from live_server import serving
    from openai import OpenAI

    with serving(models=[f"{name}={run}" for name, run in lora_runs.items()]) as (url, _):
        yield OpenAI(base_url=url, api_key="unused", max_retries=0)


@pytest.mark.parametrize("family", NAMES)
def test_serving_stream_equals_non_stream_and_transformers(family, lora_runs, client, matrix):
    from conftest import greedy

    from tunekit.generate.kvcache import cache_path
    from tunekit.generate.models import load_models, parse_model_arg

    messages = [{"role": "user", "content": "say lemon"}]
    whole = client.chat.completions.create(model=family, messages=messages, max_tokens=8, temperature=0)
    pieces = client.chat.completions.create(model=family, messages=messages, max_tokens=8, temperature=0,
                                            stream=True)
    deltas = [c.choices[0].delta for c in pieces if c.choices]
    streamed = ("".join(getattr(d, "reasoning_content", None) or "" for d in deltas),
                "".join(d.content or "" for d in deltas))
    message = whole.choices[0].message
    got = (getattr(message, "reasoning_content", None) or "", message.content or "")
    expected, _, _ = greedy(lora_runs[family], messages, 8)
    served = load_models([parse_model_arg(f"{family}={lora_runs[family]}")])[family]
    assert got == streamed
    if FAMILIES[family].template == "qwen3":  # the think block goes to reasoning_content
        assert (got[0].strip(), got[1].strip()) == _parts(expected, served.tokenizer)
    else:
        assert got == ("", expected)
    fast, path = cache_path(served.weights.model, served.pad_id)
    matrix(family, "serve", "fast path" + (" (within the sliding window)" if "window" in path else "")
           if fast else path.removeprefix("KV cache: "))


# --------------------------------------------------------------------------------------------- sliding windows


@pytest.fixture(scope="module")
def windowed(tmp_path_factory, base_tokenizer) -> Path:
    """Mistral with a sliding window of 12 tokens (every layer windowed)."""
    return build_family("mistral", tmp_path_factory.mktemp("mistral-window"), base_tokenizer, sliding_window=12)


def test_sliding_window_served_like_transformers_inside_and_beyond_the_window(windowed):
    """Prompts shorter and longer than the window: the engine's tokens equal transformers' own greedy generate
    (which applies the window), the short ones on the fast path, the long ones on transformers' cache."""
    from tunekit.data.render import render_prompt
    from tunekit.generate.engine import generate
    from tunekit.generate.kvcache import cache_path, fits, window
    from tunekit.model import load_causal_lm, load_tokenizer

    model = load_causal_lm(windowed, torch.device("cpu"))
    tok = load_tokenizer(windowed)
    assert window(model) == 12 and cache_path(model, tok.pad_token_id)[0]
    short = [tok.bos_token_id, 40, 41]  # 3 + 6 new tokens fit in 12
    long = render_prompt([{"role": "user", "content": "say maple and tell me about the river and the stone"}], tok)
    assert fits(12, len(short), 6) and not fits(12, len(long), 6)
    stop = tok.eos_token_id
    got = generate(model, [short, long], stop_ids=[stop], pad_id=tok.pad_token_id, max_new_tokens=6, batch_size=2)
    for prompt, out in zip([short, long], got, strict=True):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=stop)[0, len(prompt):].tolist()
        assert out.ids == [t for t in ref if t != stop] and len(out.ids) == len(ref) - out.stopped


def test_the_server_says_which_kv_cache_each_model_uses_at_load(models, caplog):
    import logging

    from tunekit.generate.models import load_models, parse_model_arg

    with caplog.at_level(logging.INFO, logger="tunekit.generate"):
        load_models([parse_model_arg(f"m={models['mistral']}"), parse_model_arg(f"q={models['qwen2']}")])
    lines = [r.getMessage() for r in caplog.records if r.name == "tunekit.generate"]
    assert lines == ["m: KV cache: slots (fast path) while prompt + max_tokens <= the sliding window (4096), "
                     "padded (transformers' own cache) beyond it", "q: KV cache: slots (fast path)"]


def test_packed_rows_honour_the_sliding_window(windowed):
    """Two documents longer than the window packed in one row give the hidden states of each alone."""
    from tunekit.data.pack import collate_packed
    from tunekit.data.types import Sequence
    from tunekit.model import load_causal_lm

    model = load_causal_lm(windowed, torch.device("cpu"))
    docs = [Sequence(list(range(5, 25)), list(range(5, 25))), Sequence(list(range(30, 48)), list(range(30, 48)))]
    batch = collate_packed([docs], pad_id=0)  # one row holding both
    with torch.no_grad():
        together = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([d.input_ids]), use_cache=False).logits[0] for d in docs]
    torch.testing.assert_close(together[:20], alone[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together[20:38], alone[1], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- refusals


def test_an_attention_the_family_does_not_support_is_refused_before_weights_load(models, data, tmp_path):
    from tunekit.errors import ConfigError

    cfg = _config(data, models["gemma2"], tmp_path / "run", model={"base": str(models["gemma2"]),
                                                                   "attn_implementation": "sdpa"})
    with pytest.raises(ConfigError) as err:
        train(cfg)
    (problem,) = [p for p in err.value.problems if p.where == "model.attn_implementation"]
    assert "Gemma2ForCausalLM" in problem.message and "eager" in problem.hint
    assert not (tmp_path / "run").exists()


def test_a_model_without_a_causal_lm_is_refused_naming_its_type(tmp_path, data, base_tokenizer):
    """An encoder (no causal LM class in transformers) is refused before anything loads, naming its type."""
    from transformers import DistilBertConfig, DistilBertModel

    from tunekit.errors import ConfigError

    DistilBertModel(DistilBertConfig(vocab_size=len(base_tokenizer), dim=32, n_layers=1, n_heads=2,
                                     hidden_dim=64)).save_pretrained(tmp_path / "encoder")
    base_tokenizer.save_pretrained(tmp_path / "encoder")
    with pytest.raises(ConfigError) as err:
        train(_config(data, tmp_path / "encoder", tmp_path / "run"))
    assert any("model_type 'distilbert'" in p.message for p in err.value.problems), err.value


def test_a_template_writing_a_token_the_tokenizer_lacks_is_named_once(tmp_path, base_tokenizer, data):
    """Mistral's template with a tokenizer that has no BOS: one problem naming bos_token, not an error per line,
    and the validation file is not reported valid."""
    tok = family_tokenizer("mistral", base_tokenizer)
    tok.bos_token = None
    report = check_file(data / "train.jsonl", validation=data / "valid.jsonl", tokenizer=tok, cache=False,
                        num_workers=1)
    errors = [p for p in report.problems if p.severity == "error"]
    assert len(errors) == 1 and "bos_token" in errors[0].message and "tokenizer_config.json" in errors[0].hint


def test_validation_lines_are_rendered_like_training_lines(tmp_path, base_tokenizer, data):
    """A validation line the template refuses is an error of the validation file (gemma's template raises on
    a conversation that does not alternate user and assistant)."""
    tok = family_tokenizer("gemma2", base_tokenizer)
    bad = tmp_path / "valid.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                            {"role": "assistant", "content": "c"}]}) + "\n")
    if template_source("gemma2") == "built":
        pytest.skip("the built gemma template does not check that roles alternate (the shared one does)")
    report = check_file(data / "train.jsonl", validation=bad, tokenizer=tok, cache=False, num_workers=1)
    errors = [p for p in report.problems if p.severity == "error"]
    assert [(e.file, e.line, e.code) for e in errors] == [(str(bad), 1, "render_failed")]


def test_an_end_of_turn_marker_that_is_not_a_special_token_is_warned(base_tokenizer):
    import copy

    tok = copy.deepcopy(base_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '[[END]]\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    (warning,) = [w for w in template_warnings(tok) if "special token" in w]
    assert "'[[END]]'" in warning and "max_tokens" in warning


# --------------------------------------------------------------------------------------------- the doc


def render_matrix(cells: dict[tuple[str, str], str]) -> str:
    """docs/models.md from the recorded cells."""
    head = ["| family | model_type | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    rows = [f"| {name} | {FAMILIES[name].model_type} | " + " | ".join(cells.get((name, c), "not tested")
                                                                        for c in COLUMNS) + " |" for name in NAMES]
    return DOC_HEAD + "\n".join(head + rows) + "\n" + DOC_TAIL


DOC_HEAD = """# Supported model families

Generated by `tests/test_families.py` from the results of the tests (`TUNEKIT_WRITE_MATRIX=1 pytest
tests/test_export_families.py tests/test_families.py` rewrites it; the test fails when this file differs from
what the tests proved). Each family is a tiny random-init model built from transformers' own config class (hidden
64, 2 layers; the mixture-of-experts families with 4 experts, 2 per token) with the family's chat template and
special tokens, so a cell says what tunekit does with that architecture, not how well a real checkpoint answers.

"""

DOC_TAIL = """
Columns: **data** the data check and the trained tokens (the reply and the family's end-of-turn token); **lora**
and **full** a few steps whose loss falls (LoRA on every linear layer, fused ones included; on an MoE the fused
expert weights too, the router frozen unless `lora.train_router: true`); **qlora** bitsandbytes 4-bit on CPU;
**nproc2** `--nproc 2` (DDP for LoRA, FSDP2 for full; run for two families); **merged** the exported merged model's
logits equal the run's; **eval** `tunekit eval` against the base; **chat** `tunekit chat` answers as transformers'
greedy generate; **serve** streamed = non-streamed = transformers' greedy through the openai SDK, and which KV
cache the engine uses; **gguf** and **ollama** see tests/test_export_families.py.

Attention: `model.attn_implementation: auto` picks flash-attention 2 on CUDA when it is installed and the family
supports it, else SDPA, else eager (Gemma-2, whose soft-capped attention logits SDPA cannot compute). A choice the
family does not support is refused before any weight loads.
"""


def test_support_matrix_doc_is_current():
    if any(template_source(name) == "built" for name in NAMES if FAMILIES[name].template != "qwen3"):
        pytest.skip("docs/models.md is written with the real templates of ../shared/chat_templates (CI has them)")
    wanted = {(name, c) for name in NAMES for c in COLUMNS if c != "nproc2"}  # gguf, ollama: test_export_families
    if not wanted <= set(MATRIX):
        pytest.skip("not every family test ran in this session (the doc is checked on a whole run)")
    text = render_matrix(MATRIX)
    if os.environ.get("TUNEKIT_WRITE_MATRIX"):
        DOC.write_text(text, encoding="utf-8")
    assert DOC.read_text(encoding="utf-8") == text, (
        "docs/models.md differs from what the tests proved: rewrite it with TUNEKIT_WRITE_MATRIX=1 pytest "
        "tests/test_export_families.py tests/test_families.py")
