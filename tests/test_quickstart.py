"""The quickstart: its data generator, the shipped tiny model, and the run end to end.

The default suite runs a short LoRA (a few steps) and checks that the validation loss falls from the
base's; the `slow` test runs the quickstart as shipped and checks the exact-match gain the README quotes.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from example_modules import load_example, read_jsonl

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart"
TINY = REPO / "models" / "tiny-chat"
COPY_FLOOR = 24  # of 30: see the test that uses it


# --------------------------------------------------------------------------------------------------
# Data


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    make_data = load_example("quickstart", "make_data")
    train, valid = make_data.make_split(800, 100, seed=0)
    make_data.write_jsonl(tmp_path / "train.jsonl", train)
    make_data.write_jsonl(tmp_path / "valid.jsonl", valid)
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / name).read_bytes() == (QUICKSTART / name).read_bytes(), name


def test_answers_are_the_generic_names_in_order():
    make_data = load_example("quickstart", "make_data")
    rows = read_jsonl(QUICKSTART / "train.jsonl") + read_jsonl(QUICKSTART / "valid.jsonl")
    assert len(rows) == 900
    for row in rows:
        system, user, assistant = row["messages"]
        assert [system["role"], user["role"], assistant["role"]] == ["system", "user", "assistant"]
        names = json.loads(assistant["content"])
        lines = [line[2:] for line in user["content"].splitlines() if line.startswith("- ")]
        assert len(names) == len(lines) >= 2
        for name, line in zip(names, lines, strict=True):
            surfaces, _ = make_data.INGREDIENTS[name]
            assert any(surface in line for surface in surfaces), (name, line)


def test_validation_never_repeats_a_training_recipe():
    def key(row):
        return row["messages"][2]["content"]

    train = {key(r) for r in read_jsonl(QUICKSTART / "train.jsonl")}
    valid = [key(r) for r in read_jsonl(QUICKSTART / "valid.jsonl")]
    assert not train & set(valid)
    assert len(set(valid)) == len(valid)


def test_generator_seed_changes_the_data():
    make_data = load_example("quickstart", "make_data")
    a, _ = make_data.make_split(50, 5, seed=0)
    b, _ = make_data.make_split(50, 5, seed=1)
    assert a != b


# --------------------------------------------------------------------------------------------------
# The shipped tiny model and its corpus


def load_make_tiny_model():
    spec = importlib.util.spec_from_file_location("make_tiny_model", REPO / "scripts" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_model_files_and_size():
    names = {p.name for p in TINY.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in TINY.glob("*.safetensors")) <= 16_000_000


def test_shipped_model_loads_with_plain_transformers():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TINY)
    tok = AutoTokenizer.from_pretrained(TINY)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_shipped_tokenizer_speaks_chatml():
    from transformers import AutoTokenizer

    from tunekit.data.render import end_of_turn_ids

    tok = AutoTokenizer.from_pretrained(TINY)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>"
    assert end_of_turn_ids(tok)[0] == im_end
    assert tok("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"][::2] == [
        tok.convert_tokens_to_ids("<|im_start|>"), im_end]


def test_corpus_is_deterministic_and_leaves_out_the_quickstart_task():
    make_tiny_model = load_make_tiny_model()
    make_data = load_example("quickstart", "make_data")
    assert make_tiny_model.make_corpus(300, seed=0) == make_tiny_model.make_corpus(300, seed=0)
    assert make_tiny_model.make_corpus(300, seed=0) != make_tiny_model.make_corpus(300, seed=1)
    docs = make_tiny_model.make_corpus(130000, seed=0)  # the corpus of the shipped model
    corpus = "\n".join(docs)
    assert make_data.SYSTEM not in corpus
    assert "generic" not in corpus
    # Ingredient lines occur only in plain-text recipe cards: no chat ever reads or extracts them.
    cards = [doc for doc in docs if "Ingredients:" in doc]
    assert cards and not [doc for doc in cards if "<|im_start|>" in doc]
    rows = read_jsonl(QUICKSTART / "valid.jsonl")
    # No held-out recipe prompt is in the corpus, nor any answer of 3+ names. Two-name lists of food
    # words do occur by chance in the corpus's "turn this list into a JSON list" chats.
    assert not [row for row in rows if row["messages"][1]["content"] in corpus]
    answers = [row["messages"][2]["content"] for row in rows]
    assert not [a for a in answers if len(json.loads(a)) >= 3 and a in corpus]


def test_stage2_corpus_asks_to_copy_what_stage1_never_shows():
    """Stage 2's replies hold made-up names, random numbers and codes, each written in the user's message
    exactly as in the reply (JSON numbers only where JSON writes them the same), so copying predicts them."""
    make_tiny_model = load_make_tiny_model()
    docs = make_tiny_model.make_copy_corpus(400, seed=0)
    assert docs == make_tiny_model.make_copy_corpus(400, seed=0) != make_tiny_model.make_copy_corpus(400, seed=1)
    rng = __import__("random").Random(3)
    for name, (task, _) in make_tiny_model.NOVEL_TASKS.items():
        for _ in range(200):
            user, reply = task(rng)
            written = {w.rstrip(".") for w in re.split(r"[\s,;]+", user)}  # the message's words, as written
            values = json.loads(reply) if reply[:1] in "[{" else reply.split()
            for value in values.values() if isinstance(values, dict) else values:
                # a string as it is; a JSON number as JSON writes it, a word of its own ("0.5" is not in "0.50")
                assert value in user if isinstance(value, str) else json.dumps(value) in written, (name, value, user)
    stage1 = set("\n".join(make_tiny_model.make_corpus(2000, seed=0)).split())
    novel = [make_tiny_model.novel_name(rng) for _ in range(500)]
    assert sum(name in stage1 for name in novel) < 10  # new words, not stage 1's lists
    make_data = load_example("quickstart", "make_data")
    assert make_data.SYSTEM not in "\n".join(docs) and "generic" not in "\n".join(docs)


def test_shipped_model_copies_names_and_numbers_it_has_never_seen():
    """Stage 2's skill, on values drawn with another seed than its corpus: repeated back token by token.
    Measured on the shipped model: 29 of 30 (before stage 2: 0 of 30)."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tiny_model = load_make_tiny_model()
    tok = AutoTokenizer.from_pretrained(TINY)
    model = AutoModelForCausalLM.from_pretrained(TINY).eval()
    rng = random.Random(12345)
    hits = 0
    for _ in range(30):
        words = [make_tiny_model.novel_value(rng) for _ in range(rng.randint(1, 4))]
        ids = tok.apply_chat_template([{"role": "user", "content": "Copy exactly: " + " ".join(words)}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        hits += tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == " ".join(words)
    assert hits >= COPY_FLOOR


def test_chat_command_stops_at_end_of_turn():
    from typer.testing import CliRunner

    from tunekit.cli import app

    result = CliRunner().invoke(app, ["chat", str(TINY), "Hello!", "--max-new-tokens", "30"])
    assert result.exit_code == 0, result.output
    reply = result.stdout.strip()
    assert reply and "<|im_end|>" not in reply and "<|im_start|>" not in reply


def test_chat_command_reads_stdin_when_no_prompt_is_given():
    from typer.testing import CliRunner

    from tunekit.cli import app

    runner = CliRunner()
    piped = runner.invoke(app, ["chat", str(TINY), "--max-new-tokens", "20"], input="Hello!\n")
    direct = runner.invoke(app, ["chat", str(TINY), "Hello!", "--max-new-tokens", "20"])
    assert piped.exit_code == 0, piped.output
    assert piped.stdout == direct.stdout != ""


def test_chat_command_names_a_missing_dir(tmp_path):
    from typer.testing import CliRunner

    from tunekit.cli import app

    result = CliRunner().invoke(app, ["chat", str(tmp_path / "nope"), "Hello!"])
    assert result.exit_code == 1
    assert "nope" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------------------------------
# The quickstart run


def _evaluate(run_dir: Path, limit: int):
    from tunekit.eval.evaluate import evaluate

    result = evaluate(run_dir, QUICKSTART / "valid.jsonl", baselines=["base"], limit=limit, max_new_tokens=48,
                      batch_size=16, device="cpu")
    names = [c.name for c in result.candidates]
    tuned = next(c for c in result.candidates if c.kind != "base")
    base = next(c for c in result.candidates if c.kind == "base")
    return tuned.metrics, base.metrics, names


def test_quickstart_short_run_learns(tmp_path):
    """A few LoRA steps of the quickstart config: outputs exist, validation loss falls, JSON gets valid."""
    from tunekit.config import load_config
    from tunekit.train.loop import train

    cfg = load_config(QUICKSTART / "config.yaml", ["train.max_steps=10", f"output.dir={tmp_path / 'run'}"])
    result = train(cfg)
    run_dir = Path(result.run_dir)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/adapter_model.safetensors",
                 "final/adapter_config.json"):
        assert (run_dir / name).is_file(), name
    summary = result.summary
    assert summary["steps"] == 10
    assert summary["final_valid_loss"] < 0.7 * summary["initial_valid_loss"]
    tuned, base, _ = _evaluate(run_dir, limit=20)
    assert tuned["loss"] < base["loss"]
    assert tuned["json_valid"] >= base["json_valid"]


@pytest.mark.slow
def test_quickstart_as_shipped(tmp_path):
    """The commands of scripts/quickstart.sh (after setup): the numbers the README quotes."""
    from typer.testing import CliRunner

    from tunekit.cli import app

    runner = CliRunner()
    run_dir = tmp_path / "quickstart"
    check = runner.invoke(app, ["data", "check", str(QUICKSTART / "train.jsonl"), "--validation",
                                str(QUICKSTART / "valid.jsonl"), "--model", str(TINY), "--max-len", "256"])
    assert check.exit_code == 0, check.output
    trained = runner.invoke(app, ["train", str(QUICKSTART / "config.yaml"), f"output.dir={run_dir}"])
    assert trained.exit_code == 0, trained.output
    tuned, base, _ = _evaluate(run_dir, limit=100)
    # Measured with the shipped model (README): base 0% exact match, tuned 91%. The test holds the
    # quickstart's goal (>= 80%), so a regression in masking, training or generation fails it.
    assert base["exact_match"] <= 0.05
    assert tuned["exact_match"] >= 0.80
    assert tuned["json_valid"] >= 0.95
